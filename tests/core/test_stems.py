"""Scoring a query's options from its stem, read once, against one row per option."""

import functools
import itertools

import pytest
import torch

from mend.core import scoring
from mend.core.kv_compress import KVCompressor
from mend.core.text import DemoFormat, encode
from tests.support import DEMOS

FMT = DemoFormat("\n", "\n")


def test_stems_are_the_start_a_querys_rows_share_leaving_each_a_token():
    rows = [(0, [5, 6, 1, 2], 2), (0, [5, 6, 1, 3, 4], 3),  # share [5, 6, 1]
            (1, [7, 8], 1), (1, [7, 8, 9], 2),              # [7, 8] is a whole row: keep [7]
            (2, [3, 4], 1)]                                 # alone: all but its last token
    assert scoring._stems(rows) == [(0, (5, 6, 1))] * 2 + [(1, (7,))] * 2 + [(2, (3,))]


def test_stems_pay_only_where_they_save_tokens_and_passes():
    long_prompts = [(q, list(range(100, 130)) + [q, 1, 2 + o], 2)
                    for q in range(32) for o in range(2)]
    assert _pays(long_prompts)  # 32 x 31 read once, not twice
    one_query = [(0, [5, 6, 1, 2, 3], 2), (0, [5, 6, 1, 4, 3], 2)]
    assert not _pays(one_query)  # a second pass costs more than 4 tokens
    no_stem = [(0, [1, 2], 1), (0, [3, 2], 1)]  # channel pairs that share nothing
    assert not _pays(no_stem)


def _pays(rows) -> bool:
    return scoring._stems_pay(rows, scoring._stems(rows), 32)


def _both_ways(monkeypatch, model, score):
    """``score()`` by stems (checking that path is taken) and by one row per option."""
    taken = []
    real = scoring.Scoring._score_by_stem
    monkeypatch.setattr(scoring, "_stems_pay", lambda rows, stems, batch_size: True)
    monkeypatch.setattr(scoring.Scoring, "_score_by_stem",
                        lambda *a, **k: taken.append(1) or real(*a, **k))
    by_stem = score()
    monkeypatch.setattr(scoring, "_stems_pay", lambda rows, stems, batch_size: False)
    by_row = score()
    assert taken, "the stem path was not taken"
    return by_stem, by_row


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_stem_scores_match_row_scores_after_every_kind_of_head(llm, monkeypatch, arch):
    model = llm(arch)
    queries = encode(model.tokenizer, [FMT.query(x) for x in ["a joyless film", "the cat sat on"
                                                                " the mat, slowly"]])
    # Options of one, two and several tokens after the same separator; and options whose
    # every token but the separator is one (the stem's last position scores them alone).
    several = encode(model.tokenizer, [FMT.option(x) for x in ["positive", "neg",
                                                              "a long option, truly"]])
    single = encode(model.tokenizer, [FMT.option(x) for x in ["a", "b"]])
    assert {len(o) for o in single} == {len(single[0])} and len(single[0]) >= 2
    context = KVCompressor(model, FMT, 1).tokenize([DEMOS, DEMOS[:2]])
    emb, mask = model.embed_context(context)
    matching = KVCompressor(model, FMT, 3, compaction="attention_matching")
    heads = {"shared prefix": dict(prefix=emb[:1], prefix_mask=mask[:1]),
             "a prefix per query": dict(prefix=emb, prefix_mask=mask),
             "a prefill with a key bias": dict(prefill=matching.compress(DEMOS).prefill)}
    for (name, head), options in itertools.product(heads.items(), [several, single]):
        score = functools.partial(model.score_options, queries, [options] * 2, batch_size=2,
                                  **head)
        by_stem, by_row = _both_ways(monkeypatch, model, score)
        for s, r in zip(by_stem, by_row):
            torch.testing.assert_close(s, r, atol=1e-5, rtol=1e-4, msg=f"{arch}, {name}")


def test_stem_scores_match_for_channel_pairs(llm, monkeypatch):
    model = llm("llama")
    target = encode(model.tokenizer, [FMT.option("a joyless film")])[0]
    prompts = encode(model.tokenizer, [FMT.query(x) for x in ["positive", "negative"]])
    groups = [[(p, target) for p in prompts]] * 2  # options before the query, which is scored
    emb, mask = model.embed_context(KVCompressor(model, FMT, 1).tokenize([DEMOS]))
    by_stem, by_row = _both_ways(monkeypatch, model, lambda: model.score_pairs(
        groups, prefix=emb, prefix_mask=mask))
    for s, r in zip(by_stem, by_row):
        torch.testing.assert_close(s, r, atol=1e-5, rtol=1e-4)
