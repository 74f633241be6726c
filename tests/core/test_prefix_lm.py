"""PrefixLM against the plain LLM: same logits, scores and generations, all architectures."""

import pytest
import torch
import torch.nn.functional as F

from mend.core.backbones import load_model, load_tokenizer
from mend.core.prefix_lm import PrefixLM
from mend.core.text import bos_ids, encode, pad
from mend.errors import InputError
from mend.tiny import ARCHS

CONTEXTS = ["the film was great positive", "dull negative the plot was too long and weak"]
INPUTS = [" a joyless film", " what a delightful story, full of warmth"]


def prefix_lm(tiny_model, arch) -> PrefixLM:
    path = tiny_model(arch)
    return PrefixLM(load_model(path), load_tokenizer(path))


def plain_logits(lm: PrefixLM, ids: list[int]) -> torch.Tensor:
    return lm.model(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("arch", ARCHS)
def test_empty_prefix_leaves_logits_unchanged(tiny_model, arch):
    lm = prefix_lm(tiny_model, arch)
    text = "the cat sat on the mat"
    expected = lm.model(**lm.tokenizer(text, return_tensors="pt")).logits.float()
    ids = torch.tensor([encode(lm.tokenizer, [text])[0]])
    got = lm.logits(ids, prefix=torch.zeros(1, 0, lm.hidden_size))
    # Without bos the first position has nothing before it, so compare the shared positions.
    assert torch.allclose(got, expected[:, -got.shape[1]:], atol=1e-5)
    assert got.dtype == torch.float32 and not lm.model.training


@pytest.mark.parametrize("arch", ARCHS)
def test_token_context_in_a_padded_batch_matches_unpadded_rows(tiny_model, arch):
    lm = prefix_lm(tiny_model, arch)
    ctx, inp = encode(lm.tokenizer, CONTEXTS), encode(lm.tokenizer, INPUTS)
    prefix, prefix_mask = lm.embed_context(ctx)
    ids, mask = pad(inp, lm.tokenizer.pad_token_id)
    got = lm.logits(ids, mask, prefix, prefix_mask, with_prefix_last=True)
    assert got.shape == (2, ids.shape[1] + 1, lm.model.config.vocab_size)
    for row in range(2):
        full = plain_logits(lm, lm.bos + ctx[row] + inp[row])
        n = len(inp[row])
        # got[row, t] predicts input token t: the plain logits one position earlier.
        assert torch.allclose(got[row, :n + 1], full[-n - 1:], atol=1e-5), arch


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_score_options_is_mean_option_nll(tiny_model, arch):
    lm = prefix_lm(tiny_model, arch)
    ctx = encode(lm.tokenizer, CONTEXTS[:1])
    queries = encode(lm.tokenizer, INPUTS)
    options = [encode(lm.tokenizer, [" positive", " negative", " no"])] * 2
    prefix, prefix_mask = lm.embed_context(ctx)
    scores = lm.score_options(queries, options, prefix, prefix_mask, batch_size=4)
    assert [s.shape for s in scores] == [torch.Size([3])] * 2
    for q, opts in enumerate(options):
        for o, opt in enumerate(opts):
            head = lm.bos + ctx[0] + queries[q]
            logp = F.log_softmax(plain_logits(lm, head + opt), -1)
            nll = -torch.stack([logp[len(head) - 1 + i, t] for i, t in enumerate(opt)]).mean()
            assert scores[q][o].item() == pytest.approx(nll.item(), abs=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_head_scores_match_the_plain_path(tiny_model, arch):
    lm = prefix_lm(tiny_model, arch)
    prefix, prefix_mask = lm.embed_context(encode(lm.tokenizer, CONTEXTS))  # 2 lengths
    queries = encode(lm.tokenizer, INPUTS)
    options = [encode(lm.tokenizer, [" positive", " negative", " a long option, truly"])] * 2
    vectors = torch.randn(1, 5, lm.hidden_size)
    for p, m in [(prefix, prefix_mask), (prefix[1:], prefix_mask[1:]), (vectors, None),
                 (None, None)]:
        fast = lm.score_options(queries, options, p, m, batch_size=4)
        plain = lm.score_options(queries, options, p, m, batch_size=4, reuse_head=False)
        for f, s in zip(fast, plain):
            assert torch.allclose(f, s, atol=1e-5), (arch, f, s)


@pytest.mark.parametrize("arch", ARCHS)
def test_next_token_logits_match_the_plain_forward(tiny_model, arch):
    lm = prefix_lm(tiny_model, arch)
    ctx = encode(lm.tokenizer, CONTEXTS)
    prompts = encode(lm.tokenizer, INPUTS + [" short", " a somewhat longer prompt than that"])
    prefix, prefix_mask = lm.embed_context(ctx)
    for rows in ([0, 0, 0, 0], [0, 1, 0, 1], None):  # shared, one per prompt, no context
        if rows is None:
            got = lm.next_token_logits(prompts, batch_size=3)
            heads = [lm.bos] * len(prompts)
        else:
            index = torch.tensor(rows)
            shared = len(set(rows)) == 1
            p, m = (prefix[:1], prefix_mask[:1]) if shared else (prefix[index],
                                                                 prefix_mask[index])
            got = lm.next_token_logits(prompts, p, m, batch_size=3)
            heads = [lm.bos + ctx[r] for r in rows]
        assert got.shape == (4, lm.model.config.vocab_size)
        for i, prompt in enumerate(prompts):
            if not heads[i] and not prompt:
                continue
            expected = plain_logits(lm, heads[i] + prompt)[-1]
            assert torch.allclose(got[i], expected, atol=1e-4), (arch, rows, i)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "gemma3"])
def test_generate_after_prefix_matches_plain_generation(tiny_model, arch):
    lm = prefix_lm(tiny_model, arch)
    ctx = encode(lm.tokenizer, CONTEXTS)
    prompts = encode(lm.tokenizer, INPUTS)
    prefix, prefix_mask = lm.embed_context(ctx)
    got = lm.generate(prompts, prefix, prefix_mask, max_new_tokens=6)
    eos = lm.tokenizer.eos_token_id
    for row in range(2):
        ids = torch.tensor([lm.bos + ctx[row] + prompts[row]])
        plain = lm.model.generate(ids, max_new_tokens=6, do_sample=False,
                                  pad_token_id=lm.tokenizer.pad_token_id, eos_token_id=eos)
        new = plain[0, ids.shape[1]:].tolist()
        assert got[row] == (new[:new.index(eos)] if eos in new else new)
    sampled = lm.generate(prompts, prefix, prefix_mask, max_new_tokens=4, do_sample=True)
    assert len(sampled) == 2 and all(len(s) <= 4 for s in sampled)


def test_gradients_reach_the_prefix_but_not_the_llm(tiny_model):
    lm = prefix_lm(tiny_model, "llama")
    prefix = torch.randn(1, 3, lm.hidden_size, requires_grad=True)
    ids = torch.tensor(encode(lm.tokenizer, INPUTS[:1]))
    lm.logits(ids, prefix=prefix).sum().backward()
    assert prefix.grad is not None and prefix.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in lm.model.parameters())


def test_bad_shapes_and_lengths_are_explained(tiny_model):
    lm = prefix_lm(tiny_model, "gpt2")
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(InputError, match="prefix must be"):
        lm.logits(ids, prefix=torch.zeros(1, 2, lm.hidden_size + 1))
    with pytest.raises(InputError, match="at most 2048"):
        lm.logits(torch.ones(1, 2100, dtype=torch.long))
    # Padding is no length: a row of 10 tokens padded to 2100 columns is read.
    mask = torch.zeros(1, 2100, dtype=torch.long)
    mask[:, :10] = 1
    assert torch.isfinite(lm.logits(torch.ones(1, 2100, dtype=torch.long), mask)[0, :10]).all()
    with pytest.raises(InputError, match="needs 1 \\(shared\\) or one per query"):
        lm.score_options([[1], [2]], [[[3]], [[4]]], prefix=torch.zeros(3, 1, lm.hidden_size))
    with pytest.raises(InputError, match="nothing before them"):
        lm.score_options([[]], [[[3]]])  # GPT-2 style: no bos, no prefix, empty query
    with pytest.raises(InputError, match="no options"):
        lm.score_options([[1]], [[]])
    assert bos_ids(lm.tokenizer) == lm.bos == []


def test_every_config_loads_its_frozen_llm_through_one_spec(tiny_model):
    from mend import MendConfig
    from mend.core.config import FrozenLLM
    from mend.methods import MethodConfig, build_method
    from mend.methods.prompt_tuning import PromptTuningConfig
    llm = tiny_model("gpt2", 48)
    spec = FrozenLLM(llm, "bfloat16", False, True, "eager")
    assert FrozenLLM.of(MendConfig(distiller=llm, llm=llm, llm_dtype="bfloat16",
                                   allow_8bit_fallback=True, attn_implementation="eager")) == spec
    assert FrozenLLM.of(PromptTuningConfig(llm=llm, llm_dtype="bfloat16", allow_8bit_fallback=True,
                                           attn_implementation="eager")) == spec
    icl = MethodConfig("icl", llm=llm, llm_dtype="bfloat16", allow_8bit_fallback=True,
                       attn_implementation="eager")
    assert FrozenLLM.of(icl) == spec
    # ICL now loads with the attention it names (it was always sdpa).
    model = build_method(icl).llm.model
    assert model.config._attn_implementation == "eager" and model.dtype == torch.bfloat16
