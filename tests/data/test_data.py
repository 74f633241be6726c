"""Data pipelines: windows and the beta split, MetaICL loading, k-shot sampling, truncation,
and resumable, sharded batches."""

import itertools
import json
import random

import pytest

from mend import tiny
from mend.core.text import DemoFormat, encode
from mend.counters import Counters
from mend.data import batches, shuffled
from mend.data.metaicl import (
    ContextBuilder,
    ContextConfig,
    FinetuneData,
    MetaICLConfig,
    load_partition,
    sample_demos,
)
from mend.data.pretrain import PretrainData, TextDataConfig, documents, wikitext_articles
from mend.errors import ConfigError
from tests.support import SHARED, write_metaicl


@pytest.fixture(scope="module")
def tok():
    return tiny.tokenizer("bytelevel")


def test_windows_and_the_beta_split_count_tokens(tmp_path, tok):
    words = [f"w{i}" for i in range(300)]
    (tmp_path / "docs.jsonl").write_text(
        json.dumps({"text": " ".join(words)}) + "\n" + json.dumps({"text": "too short"}) + "\n")
    n = len(tok(" ".join(words), add_special_tokens=False)["input_ids"])
    cfg = TextDataConfig(path=str(tmp_path / "docs.jsonl"), max_length=100, min_length=20,
                         beta=0.8)
    counters = Counters()
    data = PretrainData(cfg, tok, bos=[], seed=0, counters=counters)
    windows = list(data.windows(epoch=0))
    # Full 100-token windows, then the remainder if it is at least min_length long.
    expected = [100] * (n // 100) + ([n % 100] if n % 100 >= 20 else [])
    assert sorted(map(len, windows), reverse=True) == expected
    assert counters.counts["documents"] == 2
    assert counters.counts["windows_skipped_short"] == 1 + (0 < n % 100 < 20)
    full = next(w for w in windows if len(w) == 100)
    example = data.split(full)
    assert len(example.context) == 80 and len(example.input) == 20  # floor(0.8 * 100)
    assert example.context + example.input == full
    assert example.demos == tok.decode(full[:80]) and example.targets_from == 20
    assert list(data.windows(0)) == windows and list(data.windows(1)) != windows
    # bos counts against max_length: windows shrink to leave room for it.
    with_bos = PretrainData(cfg, tok, bos=[7], seed=0)
    assert max(map(len, with_bos.windows(0))) == 99
    assert len(list(PretrainData(TextDataConfig(path=cfg.path, max_length=100, min_length=20,
                                                windows_per_document=1), tok, [], 0)
                    .windows(0))) == 1


def test_wikitext_articles_are_joined_and_unescaped():
    lines = [" ", " = First = ", " ", " Some text @-@ here , 1 @,@ 000 . ", " = = Section = = ",
             " More . ", " = Second = ", " Other . "]
    docs = list(wikitext_articles(lines))
    assert len(docs) == 2
    assert docs[0] == "= First =\nSome text-here , 1,000 .\n= = Section = =\nMore ."
    assert docs[1] == "= Second =\nOther ."


def test_local_sources_and_their_errors(tmp_path):
    (tmp_path / "a.txt").write_text("line one\nline two\n")
    assert list(documents(TextDataConfig(path=str(tmp_path)))) == ["line one", "line two"]
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ConfigError, match="mixes file formats"):
        list(documents(TextDataConfig(path=str(tmp_path))))
    with pytest.raises(ConfigError, match="no field `text`.*data.text_field"):
        list(documents(TextDataConfig(path=str(tmp_path / "b.jsonl"))))
    with pytest.raises(ConfigError, match="does not exist"):
        list(documents(TextDataConfig(path="./nowhere/at/all")))
    with pytest.raises(ConfigError, match="beta"):
        TextDataConfig(beta=1.0)


def test_k_shot_sampling_never_includes_the_query():
    rng = random.Random(0)
    for pool, k in [(5, 16), (17, 16), (40, 16), (1000, 16)]:
        for query in range(0, pool, max(1, pool // 7)):
            picked = sample_demos(pool, k, exclude=query, rng=rng)
            assert query not in picked
            assert len(picked) == len(set(picked)) == min(k, pool - 1)


def test_input_truncation_cuts_from_the_end_and_never_the_label(tok):
    builder = ContextBuilder(tok, DemoFormat(), bos=[], max_positions=None,
                             context=ContextConfig(max_input_tokens=3, max_context_tokens=1000))
    long_input = "the film was great and long"
    cut = builder.cut_input(long_input, "demo")
    assert encode(tok, [cut])[0] == encode(tok, [long_input])[0][:3]
    kept, ids = builder.context([(long_input, "positive and a long label")], reserve=0)
    assert kept == [(cut, "positive and a long label")]
    assert tok.decode(ids).endswith(" positive and a long label")
    counts = builder.counters.counts
    assert {k: counts[k] for k in ("demo_inputs_cut", "demo_tokens_cut")} == {
        "demo_inputs_cut": 2, "demo_tokens_cut": 2 * (len(encode(tok, [long_input])[0]) - 3)}


def test_context_budget_drops_later_demonstrations(tok):
    fmt = DemoFormat()
    demos = [("a", "b"), ("c", "d"), ("e", "f")]
    sizes = [len(p) for p in encode(tok, fmt.pieces(demos))]
    builder = ContextBuilder(tok, fmt, bos=[1], max_positions=None, context=ContextConfig(
        max_input_tokens=100, max_context_tokens=sizes[0] + sizes[1]))
    kept, ids = builder.context(demos, reserve=0)
    assert kept == demos[:2] and len(ids) == sizes[0] + sizes[1]
    assert builder.counters.counts["demos_dropped"] == 1
    # The LLM's positions lower the budget: bos + context + reserved input must fit.
    tight = ContextBuilder(tok, fmt, bos=[1], max_positions=1 + sizes[0] + 5,
                           context=ContextConfig(max_input_tokens=100, max_context_tokens=1000))
    assert tight.context(demos, reserve=5)[0] == demos[:1]


def test_partition_loading_warns_once_per_missing_task(tmp_path):
    root = write_metaicl(tmp_path, train=["t1", "t2", "gone"], test=["t3", "t3"])
    with pytest.warns(UserWarning, match="`gone`") as record:
        train, test = load_partition(root, "part")
    assert [t.name for t in train] == ["t1", "t2"] and [t.name for t in test] == ["t3"]
    assert len(record) == 1
    with pytest.raises(ConfigError, match="Known partitions: part"):
        load_partition(root, "nope")


def test_finetune_examples_are_deterministic_and_exclude_the_query(tmp_path, tok):
    root = write_metaicl(tmp_path, train=["t1", "t2"], test=["t3"])
    train, _ = load_partition(root, "part")
    builder = ContextBuilder(tok, DemoFormat(), [], ContextConfig(k=4), None)
    data = FinetuneData(MetaICLConfig(root=str(root)), train, builder, seed=1)
    assert data.keys(0) == data.keys(0) and data.keys(0) != data.keys(1)
    for key in data.keys(0)[:10]:
        ex = data.example(key)
        task, i, _ = key
        query = data.pools[task][i]
        assert len(ex.demos) == 4 and (query["input"], query["output"]) not in ex.demos
        assert tok.decode(ex.input[ex.targets_from:]) == " " + query["output"]
        assert data.example(key) == ex


def test_batches_resume_and_shard_exactly():
    def items(epoch):
        return [(epoch, i) for i in range(7)]
    stream = batches(items, 3, list)
    first = [next(stream) for _ in range(6)]  # crosses epoch boundaries (3 batches/epoch)
    resumed = batches(items, 3, list, start=4)
    assert [next(resumed) for _ in range(2)] == first[4:6]
    ranks = [batches(items, 3, list, rank=r, world=2) for r in range(2)]
    interleaved = [next(ranks[g % 2]) for g in range(6)]
    assert interleaved == first
    counters = Counters()

    def counted(epoch):
        for item in items(epoch):
            counters.add("items")
            yield item
    mine = batches(counted, 3, list, start=2, rank=0, world=2, counters=counters)
    next(mine)  # global batch 2: skipped batches 0 and 1 are not counted
    assert counters.counts["items"] == 1  # batch 2 of epoch 0 is the single item (0, 6)
    assert list(shuffled(range(10), 3, buffer=4)) == list(shuffled(range(10), 3, buffer=4))
    assert sorted(shuffled(range(10), 3, buffer=4)) == list(range(10))


@pytest.mark.skipif(not (SHARED / "data").is_dir(), reason="../shared/data is absent")
def test_shared_data_loads():
    docs = documents(TextDataConfig(path=str(SHARED / "data/text/wikitext-2"),
                                    documents="wikitext"))
    first = next(iter(docs))
    assert first.startswith("= ") and "@-@" not in first
    with pytest.warns(UserWarning, match="is not under"):
        train, test = load_partition(SHARED / "data/metaicl", "non_nli_to_nli")
    assert len(test) == 8 and len(train) == 43
    mnli = next(t for t in test if t.name == "glue-mnli")
    assert mnli.is_classification and len(mnli.rows("train", 100)) == 16


def test_a_training_mixture_never_reads_a_held_out_task_or_row(tmp_path, tok, monkeypatch):
    """The union of several partitions' meta-train tasks, holding out every partition that is
    evaluated (the demo's tasks included): no held-out task, and no row whose input is one of
    theirs, reaches a training example."""
    from mend.data.metaicl import held_out, load_partitions

    monkeypatch.setenv("MEND_CACHE", str(tmp_path / "cache"))
    root = SHARED / "data" / "metaicl"
    if not root.is_dir():
        pytest.skip(f"the MetaICL data is not at {root}")
    evaluated = ("class_to_class", "non_nli_to_nli", "qa_to_qa", "demo")
    cfg = MetaICLConfig(root=str(root), partition=evaluated + ("hr_to_lr", "non_qa_to_qa"),
                        holdout=evaluated, max_examples_per_task=64)
    with pytest.warns(UserWarning):  # tasks the data lacks are named, not fatal
        train, _ = load_partitions(cfg.root, cfg.partitions)
        banned_tasks, banned_inputs = held_out(cfg.root, cfg.holdout)
    builder = ContextBuilder(tok, DemoFormat(), bos=[], max_positions=None,
                             context=ContextConfig(k=4, k_min=1, max_input_tokens=32))
    data = FinetuneData(cfg, train, builder, seed=0)
    # Some train tasks of the union are test tasks of an evaluated partition: held out.
    assert {t.name for t in train} & banned_tasks
    assert not set(data.pools) & banned_tasks and len(data.pools) > 20
    assert {"country_capital", "sentence_agent"} <= banned_tasks  # the demo's evaluated tasks
    # Its meta-training tasks are trained on, but for country_continent, whose inputs are
    # country_capital's countries: held out row by row.
    assert {"tool_vehicle", "sentence_patient", "number_parity"} <= set(data.pools)
    assert "country_continent" not in data.pools
    assert not {r["input"] for rows in data.pools.values() for r in rows} & banned_inputs
    # K drawn per example between k_min and k.
    ks = {len(e.demos) for e in itertools.islice(
        filter(None, map(data.example, data.keys(0))), 200)}
    assert ks == {1, 2, 3, 4}


def test_selection_reads_the_named_partition_or_never_the_demo(tmp_path, monkeypatch):
    from mend.recipes.finetune import SelectionConfig, tasks

    monkeypatch.setenv("MEND_CACHE", str(tmp_path / "cache"))
    root = write_metaicl(tmp_path / "data", train=["t1", "t2"], test=["t3"])
    write_metaicl(root, train=["t3"], test=["t4"], partition="other")
    data = MetaICLConfig(root=str(root), partition=("part", "other", "demo"))
    train, test = tasks(data, SelectionConfig())
    assert {"t1", "t2", "t3", "country_continent"} <= {t.name for t in train}
    assert {t.name for t in test} == {"t3", "t4"}  # the demo's test rows select nothing
    assert [t.name for t in tasks(data, SelectionConfig(partition="other"))[1]] == ["t4"]
    with pytest.raises(ConfigError, match="no meta-train task"):
        tasks(MetaICLConfig(root=str(write_metaicl(tmp_path / "empty", [], ["t1"])),
                            partition="part"),
              SelectionConfig())
