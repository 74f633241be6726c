"""What a compressor is judged against: the recovered share of ICL's gain, ICL cut to the same
memory, the training-free KV cache at the same memory, and refinement at compress time."""

import pytest
import torch

from mend import Distiller, MendConfig
from mend.core.kv_compress import KVCompressor
from mend.core.losses import chunked_kl_distill
from mend.core.prefix_lm import PrefixLM
from mend.core.text import DemoFormat, encode, pad
from mend.data.metaicl import ContextBuilder, ContextConfig
from mend.errors import InputError
from mend.evaluation.metrics import recovered_share
from mend.reporting.results import memory, recovered
from tests.support import DEMOS, write_metaicl

OPTIONS = ["positive", "negative"]
FMT = DemoFormat("\n", "\n\n")


def _icl_scores(llm: PrefixLM, context: list[int], queries: list[str]) -> list[float]:
    """ICL's NLLs of each query's options, flattened (as :func:`_flat` flattens a score)."""
    q = encode(llm.tokenizer, [FMT.query(x) for x in queries])
    o = [encode(llm.tokenizer, [FMT.option(x) for x in OPTIONS])] * len(q)
    emb, mask = llm.embed_context([context])
    return _flat([s.tolist() for s in llm.score_options(q, o, prefix=emb, prefix_mask=mask)])


def _flat(scores: list[list[float]]) -> list[float]:
    return [x for row in scores for x in row]


# -- recovered share -------------------------------------------------------------------------


def test_recovered_share_by_hand():
    zs = {"a": 0.30, "b": 0.50, "c": 0.40}
    icl = {"a": 0.90, "b": 0.51, "c": 0.80}  # b: ICL gains 1 point, not counted
    mend = {"a": 0.60, "b": 0.70, "c": 0.50}
    out = recovered_share(mend, zs, icl)
    assert out["counted"] == ["a", "c"]
    assert out["tasks"]["a"]["share"] == pytest.approx(0.3 / 0.6)
    assert out["tasks"]["b"]["share"] == pytest.approx(0.2 / 0.01)
    assert not out["tasks"]["b"]["counted"]
    # From averaged scores over a and c: (0.55 - 0.35) / (0.85 - 0.35) = 0.4, not the mean of
    # the per-task shares (0.5 and 0.25).
    assert out["share"] == pytest.approx(0.4)
    assert recovered_share(mend, zs, {"a": 0.3, "b": 0.5, "c": 0.4})["share"] is None


def test_recovered_share_of_results_files():
    def result(scores):
        return {"results": {"tasks": {t: {"score": {"mean": v}} for t, v in scores.items()}}}
    out = recovered(result({"a": 0.5}), result({"a": 0.2}), result({"a": 0.8}))
    assert out["share"] == pytest.approx(0.5)


def test_memory_is_tokens_over_positions():
    counts = {"contexts": 2, "context_tokens_given": 300, "prefix_positions": 34}
    assert memory(counts) == {"context_tokens": 150, "prefix_positions": 17,
                              "compression": pytest.approx(150 / 17)}
    assert memory({"contexts": 0}) is None


# -- ICL at equal memory ---------------------------------------------------------------------


def test_icl_at_equal_memory_keeps_whole_demonstrations_then_cuts_the_first(llm):
    model = llm("gpt2")
    tok = model.tokenizer
    sizes = [len(p) for p in encode(tok, FMT.pieces(DEMOS))]
    builder = ContextBuilder(tok, FMT, bos=[], max_positions=None, context=ContextConfig(
        max_context_tokens=sizes[0] + sizes[1]))
    kept, ids = builder.context(DEMOS, reserve=0)
    assert kept == DEMOS[:2] and len(ids) == sizes[0] + sizes[1]
    # A budget smaller than the first demonstration: its first tokens, as text and ids.
    small = ContextBuilder(tok, FMT, bos=[], max_positions=None,
                           context=ContextConfig(max_context_tokens=sizes[0] - 1))
    kept, ids = small.context(DEMOS, reserve=0)
    assert ids == encode(tok, FMT.pieces(DEMOS))[0][:sizes[0] - 1]
    assert kept == [tok.decode(ids)]
    assert small.counters.counts["first_demo_tokens_cut"] == 1
    assert small.counters.counts["demos_dropped"] == len(DEMOS) - 1
    assert small.counters.counts["context_tokens_given"] == sum(sizes)


# -- the training-free KV baseline -----------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_kv_compress_keeping_every_position_is_icl(llm, arch):
    model = llm(arch)
    context = KVCompressor(model, FMT, 1).tokenize([DEMOS])[0]
    full = KVCompressor(model, FMT, num_placeholders=len(context) + 2)
    queries = ["a joyless film", "the cat sat"]
    got = _flat(full.score(full.compress(DEMOS), queries, OPTIONS))
    assert got == pytest.approx(_icl_scores(model, context, queries), abs=1e-4)


def test_kv_compress_holds_one_plus_l_positions_and_serves_like_a_distiller(llm):
    model = llm("qwen2")  # fewer key/value heads than query heads
    compressor = KVCompressor(model, FMT, num_placeholders=4)
    ctx = compressor.compress_batch([DEMOS, DEMOS[:1]])
    for k, v in ctx.prefill.cache:
        assert k.shape[:3] == v.shape[:3] == (2, model.model.config.num_key_value_heads, 5)
    context = compressor.tokenize([DEMOS])[0]
    # The queries continue after the whole context, where ICL's would.
    assert ctx.prefill.offset.tolist()[0] == len(model.bos) + len(context)
    cut = _flat(compressor.score(ctx[0], ["a joyless film"], OPTIONS))
    assert cut != pytest.approx(_icl_scores(model, context, ["a joyless film"]), abs=1e-6)
    assert len(compressor.generate(ctx[0], ["a joyless film"], max_new_tokens=3)) == 1


# -- refinement at compress time -------------------------------------------------------------


def _loo_loss(llm: PrefixLM, prefix, demos) -> float:
    """The leave-one-out KL that refinement lowers, computed here from its definition."""
    texts = FMT.demo_texts(demos)
    total = 0.0
    for j, text in enumerate(texts):
        ids, mask = pad(encode(llm.tokenizer, [FMT.query(text)]), llm.tokenizer.pad_token_id)
        ctx = sum(encode(llm.tokenizer, FMT.pieces(texts[:j] + texts[j + 1:])), [])
        emb, emb_mask = llm.embed_context([ctx])
        with torch.no_grad():
            teacher = llm.hidden(ids, mask, emb, emb_mask, with_prefix_last=True)[:, :-1]
            student = llm.hidden(ids, mask, prefix=prefix, with_prefix_last=True)[:, :-1]
            total += float(chunked_kl_distill(llm.project, student, teacher, mask))
    return total / len(texts)


@pytest.mark.parametrize("output", ["kv", "embeddings"])
def test_refinement_lowers_the_leave_one_out_kl(tiny_model, output):
    path = tiny_model("llama", 48)
    torch.manual_seed(0)
    d = Distiller.from_config(MendConfig(distiller=path, llm=path, num_placeholders=3,
                                         output=output, io_sep="\n", demo_sep="\n\n"))
    before = d.compress(DEMOS)
    after = d.compress(DEMOS, refine_steps=15)
    assert type(after.prefix) is type(before.prefix)
    if output == "kv":
        assert after.prefill.cache[0][0].shape == before.prefill.cache[0][0].shape
    else:
        assert after.vectors.shape == before.vectors.shape
    assert _loo_loss(d.llm, after.prefix, DEMOS) < 0.9 * _loo_loss(d.llm, before.prefix, DEMOS)
    # Only the prefix moved: the distiller makes the same context as before.
    assert torch.equal(d.compress(DEMOS).prefill.cache[0][0] if output == "kv" else
                       d.compress(DEMOS).vectors,
                       before.prefill.cache[0][0] if output == "kv" else before.vectors)
    with pytest.raises(InputError, match="two or more"):
        d.compress(DEMOS[:1], refine_steps=2)


def test_the_kv_baseline_refines_the_same_way(llm):
    model = llm("llama")
    compressor = KVCompressor(model, FMT, num_placeholders=3)
    before, after = compressor.compress(DEMOS), compressor.compress(DEMOS, refine_steps=15)
    assert after.prefill.cache[0][0].shape == before.prefill.cache[0][0].shape
    assert torch.equal(after.prefill.offset, before.prefill.offset)
    assert _loo_loss(model, after.prefix, DEMOS) < 0.9 * _loo_loss(model, before.prefix, DEMOS)


def test_refinement_starts_from_attention_matchings_biases_and_refines_them(llm):
    from mend.core.refine import refine

    model = llm("llama")
    compressor = KVCompressor(model, FMT, num_placeholders=3, compaction="attention_matching")
    before = compressor.compress(DEMOS).prefill
    assert before.bias is not None
    # With a zero step size refinement returns the compaction it started from, biases and all.
    same = refine(model, FMT, before, DEMOS, steps=1, lr=0.0)
    assert all(torch.equal(b, b2) for b, b2 in zip(same.bias, before.bias))
    after = compressor.compress(DEMOS, refine_steps=15).prefill
    assert any(not torch.equal(b, b2) for b, b2 in zip(after.bias, before.bias))
    # The fit already sits near the leave-one-out teacher (about 7e-4 here): lower, not 10% lower.
    assert _loo_loss(model, after, DEMOS) < _loo_loss(model, before, DEMOS)


# -- the harness counts and reports it -------------------------------------------------------


def test_eval_reports_memory_and_the_kv_baseline_has_a_swap_control(tmp_path, tiny_model):
    from mend.evaluation.harness import EvalDataConfig
    from mend.recipes.evaluate import EvalConfig, evaluate

    root = write_metaicl(tmp_path / "data", train=["t1"], test=["t2", "t3"])
    data = EvalDataConfig(root=str(root), partition="part", seeds=(100,), limit=4)
    llm_path = tiny_model("llama", 48)
    runs = {}
    for method, budget in (("icl", 900), ("icl", 8), ("kv_compress", 900)):
        cfg = EvalConfig(method=method, llm=llm_path, data=data, num_placeholders=7,
                         context=ContextConfig(k=4, max_context_tokens=budget), device="cpu")
        runs[(method, budget)] = evaluate(cfg)
    full, cut, kv = runs[("icl", 900)], runs[("icl", 8)], runs[("kv_compress", 900)]
    assert full["memory"]["compression"] == pytest.approx(
        full["memory"]["context_tokens"] / (full["memory"]["context_tokens"] + 1))
    # bos and the whole demonstrations that fit in 8 tokens
    kept = cut["counts"]["context_tokens_kept"] / cut["counts"]["contexts"]
    assert cut["memory"]["prefix_positions"] == 1 + kept and 1 <= kept <= 8
    assert kv["memory"]["prefix_positions"] == 1 + 7
    assert kv["memory"]["context_tokens"] == full["memory"]["context_tokens"]
    assert "content_gap" in kv and kv["swapped"]["num_tasks"] == 2
