"""The compaction pipeline (score, select, fit) and mend's attention kernel, each against a
computation written out here by hand."""

import math

import pytest
import torch
from scipy.optimize import nnls

from mend.core import attention, compaction
from mend.core.compaction import Reading, select
from mend.core.compaction.attention_cut import AttentionCut
from mend.core.compaction.kvzip import KVzip
from mend.core.compaction.matching import AttentionMatching
from mend.core.kv_compress import KVCompressor
from mend.core.text import DemoFormat, encode
from mend.errors import InputError
from tests.support import DEMOS

FMT = DemoFormat("\n", "\n\n")
OPTIONS = ["positive", "negative"]


class _Layer(torch.nn.Module):
    """What the kernel reads off an attention layer."""
    layer_idx = 0
    num_key_value_groups = 2
    is_causal = True


def _reading(r=1, kv_heads=1, groups=2, s=5, q=4, d=3, seed=0, **kw) -> Reading:
    g = torch.Generator().manual_seed(seed)
    heads = kv_heads * groups
    return Reading(keys=torch.randn(r, kv_heads, s, d, generator=g, dtype=torch.float64),
                   values=torch.randn(r, kv_heads, s, d, generator=g, dtype=torch.float64),
                   mask=kw.get("mask", torch.ones(r, s, dtype=torch.long)),
                   queries=torch.randn(r, heads, s, d, generator=g, dtype=torch.float64),
                   scaling=0.7,
                   ref_queries=torch.randn(r, heads, q, d, generator=g, dtype=torch.float64),
                   ref_keys=torch.randn(r, kv_heads, q, d, generator=g, dtype=torch.float64),
                   ref_mask=kw.get("ref_mask", torch.ones(r, q, dtype=torch.long)))


# -- the attention kernel --------------------------------------------------------------------


def test_the_kernel_adds_the_bias_to_the_first_keys_of_each_group():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 3, 8, generator=g), torch.randn(1, 2, 5, 8, generator=g),
               torch.randn(1, 2, 5, 8, generator=g))
    bias = torch.tensor([[[1.5, -2.0], [0.25, 3.0]]])  # (B, kv_heads, P = 2)
    got, _ = attention._attend(_Layer(), q, k, v, None, scaling=0.5, key_bias=[bias])
    # By hand: query head h reads key/value head h // 2; the 3 queries are the last 3 of 5.
    want = torch.empty(1, 3, 4, 8)
    for h in range(4):
        logits = q[0, h] @ k[0, h // 2].T * 0.5
        logits[:, :2] += bias[0, h // 2]
        logits = logits.masked_fill(torch.ones(3, 5).triu(3).bool(), float("-inf"))
        want[0, :, h] = logits.softmax(-1) @ v[0, h // 2]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    causal = ~torch.ones(1, 1, 3, 5).triu(3).bool()  # sdpa's mask, as the kernel's mask builds it
    plain, _ = attention._attend(_Layer(), q, k, v, causal, scaling=0.5)
    none, _ = attention._attend(_Layer(), q, k, v, causal, scaling=0.5,
                                key_bias=[torch.zeros_like(bias)])
    torch.testing.assert_close(none, plain, atol=1e-6, rtol=1e-6)


def test_under_an_eager_model_the_kernel_attends_by_the_formula_alike():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 3, 8, generator=g), torch.randn(2, 2, 6, 8, generator=g),
               torch.randn(2, 2, 6, 8, generator=g))
    mask = ~torch.ones(1, 1, 3, 6).triu(4).bool()
    bias = [torch.randn(2, 2, 2, generator=g)]
    sdpa, _ = attention._attend(_Layer(), q, k, v, mask, scaling=0.3, key_bias=bias)
    token = attention._INNER.set("eager")
    try:
        eager, weights = attention._attend(_Layer(), q, k, v, mask, scaling=0.3, key_bias=bias)
    finally:
        attention._INNER.reset(token)
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=1e-5)
    assert weights.shape == (2, 4, 3, 6) and weights[..., 0, 4:].abs().max() == 0


@pytest.mark.parametrize("inner", ["sdpa", "eager"])
def test_reopen_blends_the_last_queries_with_their_wide_masks_attention_by_hand(inner):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 4, 8, generator=g), torch.randn(1, 1, 4, 8, generator=g),
               torch.randn(1, 1, 4, 8, generator=g))
    narrow = torch.ones(4, 4).tril().bool()[None, None].clone()
    narrow[..., 3, 1:3] = False  # the last query sees keys 0 and 3 only
    wide = torch.ones(1, 1, 1, 4, dtype=torch.bool)  # and, reopened, every key
    gates = torch.tensor([0.0, 0.25])  # head 0 stays as it was, head 1 a quarter open
    token = attention._INNER.set(inner)
    try:
        plain, _ = attention._attend(_Layer(), q, k, v, narrow, scaling=0.5)
        got, _ = attention._attend(_Layer(), q, k, v, narrow, scaling=0.5,
                                   reopen=(wide, [gates]))
    finally:
        attention._INNER.reset(token)
    torch.testing.assert_close(got[:, :3], plain[:, :3])  # the other queries: untouched
    for h, gate in enumerate(gates.tolist()):  # by hand: seen + gate * (everything - seen)
        logits = q[0, h, 3] @ k[0, 0].T * 0.5
        seen = logits.masked_fill(~narrow[0, 0, 3], float("-inf")).softmax(-1) @ v[0, 0]
        everything = logits.softmax(-1) @ v[0, 0]
        torch.testing.assert_close(got[0, 3, h], seen + gate * (everything - seen),
                                   atol=1e-5, rtol=1e-5)


def test_the_tap_sees_each_layer_queries_and_the_keys_the_cache_holds(llm):
    model = llm("qwen2")
    ids = torch.tensor([encode(model.tokenizer, ["the cat sat on the mat"])[0]])
    seen = {}

    def tap(layer, query, key, value, scaling):
        seen[layer] = (query.shape, key, value, scaling)

    with attention.kernel(model.model):
        model.body(input_ids=ids, layer_tap=tap)
    plain = model.body(input_ids=ids, use_cache=True).past_key_values
    assert model.model.config._attn_implementation == "sdpa"  # restored after the block
    for i, layer in enumerate(plain.layers):
        shape, key, value, scaling = seen[i]
        assert shape[1] == model.model.config.num_attention_heads
        torch.testing.assert_close(key, layer.keys)
        torch.testing.assert_close(value, layer.values)
        assert scaling == pytest.approx(key.shape[-1] ** -0.5)


# -- scorers ---------------------------------------------------------------------------------


def test_select_keeps_bos_and_never_puts_padding_after_a_real_position():
    scores = torch.tensor([[[9.0, 0.0, 1.0, 5.0, 3.0]], [[9.0, 9.0, 0.0, 2.0, 1.0]]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    picked = select(scores, mask, keep=3)
    assert picked[0, 0].tolist() == [0, 3, 4]
    # Row 1 has three real positions: all kept (bos, at column 2, though it scores lowest).
    assert picked[1, 0].tolist() == [2, 3, 4]
    assert select(scores, mask, keep=4)[1, 0].tolist()[1:] == [2, 3, 4]


def test_attention_cut_sums_the_window_attention_by_hand():
    reading = _reading(s=5, groups=2)
    got = AttentionCut(window=2, pool=1)(reading)
    want = torch.zeros(1, 1, 5, dtype=torch.float64)
    for h in range(2):
        for row in (3, 4):  # the last two positions, each seeing columns up to itself
            logits = reading.queries[0, h, row] @ reading.keys[0, 0, :row + 1].T * 0.7
            want[0, 0, :row + 1] += logits.softmax(-1)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_attention_cut_matches_the_eager_kernels_attention_weights(llm):
    """The scorer reads the same attention the eager kernel returns."""
    model = llm("qwen2")
    ids = torch.tensor([encode(model.tokenizer, [" ".join(["the cat sat"] * 4)])[0]])
    readings = {}

    def tap(layer, query, key, value, scaling):
        readings[layer] = Reading(key, value, torch.ones_like(ids), query, scaling)

    with attention.kernel(model.model):
        model.body(input_ids=ids, layer_tap=tap)
    model.model.set_attn_implementation("eager")
    weights = model.body(input_ids=ids, output_attentions=True).attentions
    model.model.set_attn_implementation("sdpa")
    kv_heads = model.model.config.num_key_value_heads
    for layer, w in enumerate(weights):
        want = w[:, :, -4:].sum(2)
        want = want.view(1, kv_heads, -1, want.shape[-1]).sum(2)
        torch.testing.assert_close(AttentionCut(window=4, pool=1)(readings[layer]), want,
                                   atol=1e-5, rtol=1e-4)


def test_kvzip_takes_the_largest_repeat_attention_by_hand():
    reading = _reading(s=4, q=3, groups=2, ref_mask=torch.tensor([[1, 1, 0]]))
    got = KVzip()(reading)
    want = torch.zeros(4, dtype=torch.float64)
    for h in range(2):
        for i in range(2):  # the padding query (i = 2) pays nothing
            q = reading.ref_queries[0, h, i]
            logits = torch.cat([q @ reading.keys[0, 0].T, q @ reading.ref_keys[0, 0, :i + 1].T])
            want = torch.maximum(want, (logits * 0.7).softmax(-1)[:4])
    torch.testing.assert_close(got[0, 0].double(), want, atol=1e-6, rtol=1e-6)


# -- Attention Matching ----------------------------------------------------------------------


def test_matching_a_duplicated_key_gives_it_twice_the_weight_and_the_mean_value():
    """Context keys ``[a, a, b]``: keeping ``a`` once and ``b`` reproduces every query's mass
    and output exactly with ``w = (2, 1)`` and the value ``(v0 + v1) / 2`` at ``a``."""
    reading = _reading(s=3, q=6, d=4)
    reading.keys[:, :, 1] = reading.keys[:, :, 0]
    index = torch.tensor([[[0, 2]]])
    values, bias = AttentionMatching(ridge=0.0)(reading, index)
    assert bias[0, 0].tolist() == pytest.approx([math.log(2.0), 0.0], abs=1e-6)
    v = reading.values[0, 0]
    torch.testing.assert_close(values[0, 0], torch.stack([(v[0] + v[1]) / 2, v[2]]),
                               atol=1e-6, rtol=1e-6)


def test_matching_every_key_leaves_the_cache_as_it_was():
    reading = _reading(s=4, q=5)
    values, bias = AttentionMatching()(reading, torch.arange(4).view(1, 1, 4))
    torch.testing.assert_close(bias, torch.zeros_like(bias), atol=1e-6, rtol=0)
    torch.testing.assert_close(values, reading.values, atol=1e-6, rtol=1e-6)


def test_matching_bias_is_the_nonnegative_least_squares_of_the_normalised_mass():
    reading = _reading(s=6, q=5, groups=2)
    index = torch.tensor([[[0, 3, 5]]])
    _, bias = AttentionMatching()(reading, index)
    queries = reading.ref_queries[0].reshape(-1, 3)  # both heads' queries, one group
    logits = queries @ reading.keys[0, 0].T * 0.7
    a = (logits[:, [0, 3, 5]] - logits.logsumexp(-1, keepdim=True)).exp()
    w, _ = nnls(a.numpy(), torch.ones(len(a), dtype=torch.float64).numpy())
    assert bias[0, 0].exp().tolist() == pytest.approx(list(w.clip(1e-12)), rel=1e-4)


def test_gradients_pass_through_the_fit():
    reading = _reading(s=6, q=5)
    for name in ("keys", "values", "ref_queries"):
        getattr(reading, name).requires_grad_(True)
    values, bias = AttentionMatching()(reading, torch.tensor([[[0, 2, 5]]]))
    (values.sum() + bias.sum()).backward()
    for name in ("keys", "values", "ref_queries"):
        grad = getattr(reading, name).grad
        assert grad is not None and grad.abs().sum() > 0 and torch.isfinite(grad).all()


def test_the_bias_gradient_is_the_active_set_least_squares_one():
    """Finite differences of the fitted weights in the keys agree with autograd."""
    reading = _reading(s=5, q=6, seed=3)
    index = torch.tensor([[[0, 2, 4]]])
    keys = reading.keys.clone().requires_grad_(True)

    def weights(k):
        reading.keys = k
        return AttentionMatching()(reading, index)[1].double().exp()

    w = weights(keys)
    active = w[0, 0] > 1e-9
    (grad,) = torch.autograd.grad(w[0, 0, active].sum(), keys)
    eps, bump = 1e-4, torch.zeros_like(keys)  # scipy solves to about 1e-9
    bump[0, 0, 2, 1] = eps
    with torch.no_grad():
        numeric = (weights(keys + bump)[0, 0, active].sum()
                   - weights(keys - bump)[0, 0, active].sum()) / (2 * eps)
    assert grad[0, 0, 2, 1].item() == pytest.approx(numeric.item(), rel=1e-2)


# -- the compressor --------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(compaction.COMPACTIONS))
def test_every_compaction_keeping_every_position_is_icl(llm, name):
    model = llm("qwen2")
    context = KVCompressor(model, FMT, 1).tokenize([DEMOS])[0]
    full = KVCompressor(model, FMT, len(context) + 2, compaction=name)
    queries = ["a joyless film", "the cat sat"]
    got = full.score(full.compress(DEMOS), queries, OPTIONS)
    emb, mask = model.embed_context([context])
    q = encode(model.tokenizer, [FMT.query(x) for x in queries])
    o = [encode(model.tokenizer, [FMT.option(x) for x in OPTIONS])] * 2
    want = [s.tolist() for s in model.score_options(q, o, prefix=emb, prefix_mask=mask)]
    assert got == [pytest.approx(w, abs=1e-4) for w in want]


@pytest.mark.parametrize("name", ["kvzip", "attention_matching"])
def test_a_compacted_batch_is_each_set_compacted_alone(llm, name):
    model = llm("llama")
    compressor = KVCompressor(model, FMT, 3, compaction=name)
    both = compressor.compress_batch([DEMOS, DEMOS[:2]])
    for row, demos in enumerate([DEMOS, DEMOS[:2]]):
        alone = compressor.compress(demos)
        kept, own = both.prefill.mask[row].bool(), alone.prefill.mask[0].bool()
        for batched, single in zip(both.prefill.cache, alone.prefill.cache):
            for x, y in zip(batched, single):  # keys, then values
                torch.testing.assert_close(x[row][:, kept], y[0][:, own], atol=1e-4, rtol=1e-3)
        if both.prefill.bias is not None:
            torch.testing.assert_close(both.prefill.bias[0][row][:, kept],
                                       alone.prefill.bias[0][0][:, own], atol=1e-4, rtol=1e-3)


def test_matching_moves_scores_towards_icl_and_its_bias_is_served(llm):
    model = llm("llama")
    context = KVCompressor(model, FMT, 1).tokenize([DEMOS * 4])[0]
    emb, mask = model.embed_context([context])
    q = encode(model.tokenizer, [FMT.query("a joyless film")])
    o = [encode(model.tokenizer, [FMT.option(x) for x in OPTIONS])]
    icl = model.score_options(q, o, prefix=emb, prefix_mask=mask)[0]
    errors = {}
    for name in ("attention_cut", "attention_matching"):
        compressor = KVCompressor(model, FMT, 4, compaction=name)
        ctx = compressor.compress(DEMOS * 4)
        errors[name] = (torch.tensor(compressor.score(ctx, ["a joyless film"], OPTIONS)[0])
                        - icl).abs().max().item()
        if name == "attention_matching":
            ctx.prefill.bias = None  # the same keys and values, served without their bias
            unbiased = torch.tensor(compressor.score(ctx, ["a joyless film"], OPTIONS)[0])
            assert (unbiased - icl).abs().max().item() != pytest.approx(errors[name], abs=1e-6)
    assert errors["attention_matching"] < errors["attention_cut"]


def test_an_unknown_compaction_names_the_choices(llm):
    with pytest.raises(InputError, match="attention_matching"):
        KVCompressor(llm("llama"), FMT, 4, compaction="snap")
