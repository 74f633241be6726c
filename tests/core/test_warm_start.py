"""The warm-started distiller (``output: compacted``): at step 0 it is the training-free
compaction of the LLM's own cache, and training moves it from there."""

import typing

import pytest
import torch

from mend import Distiller, MendConfig
from mend.core import compaction
from mend.core.config import CompactionName
from mend.core.kv_compress import KVCompressor
from mend.errors import ConfigError, InputError
from tests.support import DEMOS, one_batch, train_a_few

OPTIONS = ["positive", "negative"]


@pytest.fixture
def warm(tiny_model):
    def make(arch: str = "llama", **kwargs) -> Distiller:
        path = tiny_model(arch, 48)
        kwargs = {"num_placeholders": 3, "output": "compacted", "train_mode": "lora",
                  "io_sep": "\n", "demo_sep": "\n\n", **kwargs}
        torch.manual_seed(0)
        return Distiller.from_config(MendConfig(distiller=path, llm=path, **kwargs))
    return make


def test_the_config_names_every_compaction_and_no_other():
    assert typing.get_args(CompactionName) == tuple(compaction.COMPACTIONS)


@pytest.mark.parametrize("name", list(compaction.COMPACTIONS))
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_at_step_0_it_is_the_training_free_compaction(warm, name, arch):
    d = warm(arch, compaction=name)
    compressor = KVCompressor(d.llm, d.format, 3, compaction=name)
    sets = [DEMOS * 3, DEMOS[:2]]
    mine, theirs = d.compress_batch(sets).prefill, compressor.compress_batch(sets).prefill
    assert torch.equal(mine.mask, theirs.mask) and torch.equal(mine.offset, theirs.offset)
    for (k, v), (k2, v2) in zip(mine.cache, theirs.cache):
        assert torch.equal(k, k2) and torch.equal(v, v2)
    assert (mine.bias is None) == (theirs.bias is None)
    if mine.bias is not None:
        assert all(torch.equal(b, b2) for b, b2 in zip(mine.bias, theirs.bias))
    queries = ["a joyless film", "the cat sat on the mat"]
    assert d.score(d.compress(sets[0]), queries, OPTIONS) == compressor.score(
        compressor.compress(sets[0]), queries, OPTIONS)


def test_training_moves_it_from_the_compaction_and_only_its_adapters_train(warm):
    d = warm()
    _, batch = one_batch(d)
    assert batch["demo_width"] < batch["demo_ids"].shape[1]  # the repeat pass follows
    before = d.compress(DEMOS * 2).prefill
    trainable = [n for n, p in d.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    def every_b_learns():  # LoRA's B starts at zero, so A gets no gradient at first; B does
        assert all(p.grad is not None and p.grad.abs().sum() > 0
                   for n, p in d.named_parameters() if "lora_B" in n)

    losses = train_a_few(d, after_backward=every_b_learns)
    assert losses[-1] < losses[0]
    after = d.compress(DEMOS * 2).prefill
    assert not torch.equal(after.cache[0][1], before.cache[0][1])


def test_a_compacted_checkpoint_reloads_the_same_context(warm, tmp_path):
    d = warm()
    with torch.no_grad():
        for p in d.parameters():
            if p.requires_grad:
                p.add_(0.01)
    d.save_pretrained(tmp_path / "ckpt")
    again = Distiller.from_pretrained(tmp_path / "ckpt")
    a, b = d.compress(DEMOS).prefill, again.compress(DEMOS).prefill
    for (k, v), (k2, v2) in zip(a.cache, b.cache):
        torch.testing.assert_close(k, k2)
        torch.testing.assert_close(v, v2)


def test_compacted_needs_the_llms_cache_shape(tiny_model):
    with pytest.raises(InputError, match="output: compacted hands"):
        Distiller.from_config(MendConfig(distiller=tiny_model("llama", 32),
                                         llm=tiny_model("llama", 48), output="compacted"))
    with pytest.raises(ConfigError, match="vector_norm"):
        MendConfig(distiller="x", llm="x", output="compacted", vector_norm="match")
    with pytest.raises(ConfigError, match="compaction"):
        MendConfig(distiller="x", llm="x", output="compacted", compaction="snap")


def test_a_warm_started_distiller_compacts_to_any_budget_at_evaluation(warm, tmp_path):
    from mend.methods import MethodConfig, build_method
    warm().save_pretrained(tmp_path / "warm")
    method = build_method(MethodConfig("mend", checkpoint=str(tmp_path / "warm"),
                                       num_placeholders=2))
    prefix = method.prefix([DEMOS * 3], [[]])
    assert prefix.cache[0][0].shape[2] == 3  # bos and 2
    warm(output="kv").save_pretrained(tmp_path / "kv")
    with pytest.raises(ConfigError, match="only a warm-started distiller"):
        build_method(MethodConfig("mend", checkpoint=str(tmp_path / "kv"), num_placeholders=2))
    with pytest.raises(ConfigError, match="only a warm-started distiller"):
        build_method(MethodConfig("mend", checkpoint=str(tmp_path / "kv"), compaction="kvzip"))


def test_a_warm_started_distiller_is_scored_with_another_compaction(warm, tmp_path):
    # Trained with attention_cut (the fixture's default), scored with Attention Matching's fit
    # on top: at step 0 that is the training-free attention_matching, bit for bit.
    from mend.methods import MethodConfig, build_method
    warm().save_pretrained(tmp_path / "warm")
    method = build_method(MethodConfig("mend", checkpoint=str(tmp_path / "warm"),
                                       compaction="attention_matching"))
    assert method.distiller.config.compaction == "attention_matching"
    sets = [DEMOS * 3]
    mine = method.prefix(sets, [[]])
    theirs = KVCompressor(method.distiller.llm, method.distiller.format, 3,
                          compaction="attention_matching").compress_batch(sets).prefill
    assert mine.bias is not None
    for (k, v), (k2, v2) in zip(mine.cache, theirs.cache):
        assert torch.allclose(k, k2, atol=1e-5) and torch.allclose(v, v2, atol=1e-5)
    assert all(torch.allclose(b, b2, atol=1e-5) for b, b2 in zip(mine.bias, theirs.bias))
