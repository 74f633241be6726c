"""Every fast path against the plain path it replaces, on tiny models: the same scores, the
same losses, the same gradients."""

import pytest
import torch
import torch.nn.functional as F

from mend.core.backbones import load_model, load_tokenizer
from mend.core.losses import ce_loss, chunked_ce, chunked_kl_distill, kl_distill
from mend.core.prefix_lm import PrefixLM
from mend.core.text import encode, pad
from mend.data import Example
from mend.errors import InputError
from mend.methods.mend import MendObjective, ObjectiveConfig
from mend.tiny import ARCHS
from tests.support import DEMOS


@pytest.mark.parametrize("arch,softcap", [(a, None) for a in ARCHS] + [("gemma3", 3.0)])
def test_projected_hidden_states_are_the_models_logits(tiny_model, arch, softcap):
    lm = PrefixLM(load_model(tiny_model(arch)), load_tokenizer(tiny_model(arch)))
    if softcap:
        lm.model.config.final_logit_softcapping = softcap  # as Gemma 2 ships (30.0)
    ids, mask = pad(encode(lm.tokenizer, [" a joyless film", " great"]), lm.tokenizer.pad_token_id)
    prefix = torch.randn(2, 3, lm.hidden_size)
    for with_last in (False, True):
        plain = lm.logits(ids, mask, prefix, with_prefix_last=with_last)
        fast = lm.project(lm.hidden(ids, mask, prefix, with_prefix_last=with_last))
        assert fast.shape == plain.shape and fast.dtype == torch.float32
        assert torch.allclose(fast, plain, atol=1e-5), (arch, softcap)
    if softcap:  # the model itself applied the cap, so project must have too
        assert plain.abs().max() <= softcap


def _project(weight: torch.Tensor):
    return lambda h: h @ weight.T


@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_chunked_losses_equal_the_full_logit_losses_in_value_and_gradient(chunk):
    torch.manual_seed(0)
    weight = torch.randn(50, 8)                   # the frozen LM head, V=50, d=8
    student = torch.randn(2, 5, 8, requires_grad=True)
    teacher = torch.randn(2, 5, 8)
    targets = torch.randint(0, 50, (2, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    project = _project(weight)

    def losses(chunked: bool):
        student.grad = None
        if chunked:
            kl = chunked_kl_distill(project, student, teacher, mask, 2.0, chunk)
            ce = chunked_ce(project, student, targets, mask, chunk)
        else:
            kl = kl_distill(project(student), project(teacher), mask, 2.0)
            ce = ce_loss(project(student), targets, mask)
        (kl + ce).backward()
        return kl.detach(), ce.detach(), student.grad.clone()

    for plain, fast in zip(losses(False), losses(True)):
        assert torch.allclose(plain, fast, atol=1e-5)
    empty = torch.zeros(2, 5)
    assert chunked_kl_distill(project, student, teacher, empty, chunk=chunk).item() == 0.0
    assert chunked_ce(project, student, targets, empty, chunk=chunk).item() == 0.0


@pytest.mark.parametrize("llm_arch", ["gpt2", "gemma3"])
def test_mend_objective_fast_paths_give_the_same_loss_and_gradients(make_distiller, llm_arch):
    def run(chunk: int | None, checkpointing: bool):
        d = make_distiller("llama", llm_arch)
        if checkpointing:
            d.gradient_checkpointing_enable()
        d.train()
        objective = MendObjective(d, ObjectiveConfig(distill=1.0, pred=1.0, clm=0.5,
                                                     logits_chunk=chunk))
        tok = d.llm.tokenizer
        ctx = tok(" great movie! positive", add_special_tokens=False)["input_ids"]
        inp = tok(" a joyless film negative", add_special_tokens=False)["input_ids"]
        batch = objective.collate([Example(DEMOS, ctx, inp, 4), Example(DEMOS[:1], ctx, inp, 2)])
        out = objective.loss(d, batch)
        out["loss"].backward()
        return out, {n: p.grad.clone() for n, p in d.named_parameters() if p.grad is not None}

    plain, g_plain = run(None, False)
    assert set(plain) == {"loss", "distill", "pred", "clm"} and g_plain
    # The objective is the weighted sum of its terms: L_pred + 1.0 L_distill + 0.5 CLM.
    assert plain["loss"].item() == pytest.approx(
        (plain["pred"] + plain["distill"] + 0.5 * plain["clm"]).item(), rel=1e-5)
    for chunk, checkpointing in ((None, True), (1024, False), (3, True)):
        fast, g_fast = run(chunk, checkpointing)
        for key in plain:
            assert torch.allclose(plain[key], fast[key], atol=1e-5), (key, chunk, checkpointing)
        assert g_plain.keys() == g_fast.keys()
        assert all(torch.allclose(g_plain[k], g_fast[k], atol=1e-5) for k in g_plain), chunk


@pytest.mark.parametrize("arch", ["gpt2", "gemma3"])
def test_batched_option_scores_equal_a_per_row_reference(tiny_model, arch):
    """score_pairs gathers only the target tokens' predictors; check it against per-row NLLs
    from full logits, with ragged queries, options of different lengths and a batch split."""
    lm = PrefixLM(load_model(tiny_model(arch)), load_tokenizer(tiny_model(arch)))
    queries = encode(lm.tokenizer, [" a joyless film", " what a delightful story, full of it"])
    options = [encode(lm.tokenizer, [" positive", " negative and long", " no"])] * 2
    prefix = torch.randn(1, 4, lm.hidden_size)
    got = lm.score_options(queries, options, prefix, batch_size=4)
    for q, opts in enumerate(options):
        for o, opt in enumerate(opts):
            ids = torch.tensor([queries[q] + opt])
            logits = lm.logits(ids, prefix=prefix, with_prefix_last=True)[0]
            n = len(opt)
            nll = F.cross_entropy(logits[len(queries[q]):len(queries[q]) + n], ids[0, -n:])
            assert got[q][o].item() == pytest.approx(nll.item(), abs=1e-5), (arch, q, o)


def test_a_prefill_serves_later_calls_with_the_same_scores(make_distiller):
    d = make_distiller("llama", "llama")
    ctx = d.compress(DEMOS)
    first = d.score(ctx, ["a joyless film"], ["positive", "negative"])
    assert ctx.prefill is not None
    cache = ctx.prefill.cache
    again = d.score(ctx, ["a joyless film"], ["positive", "negative"])
    assert ctx.prefill.cache is cache and again == first  # reused, and not appended to
    fresh = d.llm.score_options(*_ids(d, "a joyless film"), prefix=ctx.vectors)
    assert torch.allclose(torch.tensor(first[0]), fresh[0], atol=1e-5)
    with pytest.raises(InputError, match="prefix or a prefill"):
        d.llm.score_options(*_ids(d, "x"), prefix=ctx.vectors, prefill=ctx.prefill)


def _ids(d, query):
    tok = d.llm.tokenizer
    return ([encode(tok, [d.format.query(query)])[0]],
            [encode(tok, [d.format.option(o) for o in ("positive", "negative")])])
