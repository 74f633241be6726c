"""Placeholders seeded from the demonstrations' own tokens (``seeded_placeholders``): at step 0
the prefix is the LLM's own cache of the tokens they copy, and training (the LoRA, the gates
that let them read further) moves it from there."""

import pytest
import torch

from mend import Distiller, MendConfig
from mend.core import seeding
from mend.core.text import positions
from mend.errors import CheckpointError, ConfigError
from tests.support import DEMOS, train_a_few


@pytest.fixture
def seeded(tiny_model):
    def make(arch: str = "llama", m: int = 3, total: int = 3, **kwargs) -> Distiller:
        path = tiny_model(arch, 48)
        kwargs = {"num_placeholders": total, "seeded_placeholders": m, "output": "kv",
                  "train_mode": "lora", "io_sep": "\n", "demo_sep": "\n\n", **kwargs}
        torch.manual_seed(0)
        return Distiller.from_config(MendConfig(distiller=path, llm=path, **kwargs))
    return make


def test_the_layout_of_seeded_and_learned_placeholders():
    # Row: [pad, bos, a, b, c | seeded at column 3 (b) | one learned]
    mask = torch.tensor([[0, 1, 1, 1, 1]])
    full, wide, ids = seeding.layout(mask, torch.tensor([[3]]), torch.tensor([[True]]), 1)
    full, wide = full[0, 0].int(), wide[0, 0].int()
    assert full[5].tolist() == [0, 1, 1, 0, 0, 1, 0]  # what b saw before it, and itself
    assert full[6].tolist() == [0, 1, 1, 1, 1, 1, 1]  # everything real before it
    assert full[3].tolist() == [0, 1, 1, 1, 0, 0, 0]  # the demonstrations stay causal
    assert full[0].tolist() == [1, 0, 0, 0, 0, 0, 0]  # padding sees itself only
    assert wide.tolist() == [[0, 1, 1, 1, 1, 1, 0]]   # the gate opens every real token
    assert ids.tolist() == [[0, 0, 1, 2, 3, 2, 4]]    # b's position; the learned one after all


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("m,total", [(3, 3), (2, 4)])
def test_at_step_0_seeded_placeholders_are_the_llms_cache_of_their_tokens(seeded, arch, m, total):
    d = seeded(arch, m, total)
    sets = [DEMOS * 3, DEMOS[:1]]
    ids, mask, width = d.tokenize(sets)
    assert width < ids.shape[1]  # the repeat pass the tokens are picked from follows
    with torch.no_grad():
        head = d(ids, mask, width)
        index, valid = seeding.pick(d.encoder, d.encoder.get_input_embeddings()(ids), mask,
                                    width, m)
        ids, mask = ids[:, :width], mask[:, :width]
        own = d.llm.body(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
                         use_cache=True).past_key_values
    assert valid.all() and (index > mask.argmax(-1, keepdim=True)).all()  # never bos
    cols = torch.cat([mask.argmax(-1, keepdim=True), index], 1)
    for (k, v), layer in zip(head.cache, own.layers):
        pick = cols[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])
        torch.testing.assert_close(k[:, :, :m + 1], layer.keys.gather(2, pick))
        torch.testing.assert_close(v[:, :, :m + 1], layer.values.gather(2, pick))
    # The query reads on after the demonstrations and the learned placeholders.
    assert head.offset.tolist() == (mask.sum(-1) + total - m).tolist()
    assert head.mask.shape == (2, total + 1) and head.mask.bool().all()


def test_a_context_shorter_than_the_seeds_masks_the_slots_it_cannot_fill(seeded):
    d = seeded(m=8, total=8)
    head = d.compress([("ok", "yes")]).prefill
    _, mask, width = d.tokenize([[("ok", "yes")]])
    real = int(mask[:, :width].sum()) - 1  # demonstration tokens after bos
    assert real < 8 and int(head.mask.sum()) == 1 + real
    assert all(torch.isfinite(k).all() for k, _ in head.cache)
    assert torch.isfinite(torch.tensor(d.score(d.compress([("ok", "yes")]), ["a film"],
                                               [["yes", "no"]]))).all()


def test_training_moves_the_gates_and_the_adapters(seeded):
    d = seeded(m=2, total=3)
    trainable = {n for n, p in d.named_parameters() if p.requires_grad}
    assert "gates.weight" in trainable and "placeholders" in trainable
    assert all("lora_" in n for n in trainable - {"gates.weight", "placeholders"})
    before = d.compress(DEMOS * 2).prefill

    def gates_learn():  # they start at zero and still get a gradient: the wide mask's output
        assert d.gates.weight.grad is not None and d.gates.weight.grad.abs().sum() > 0

    losses = train_a_few(d, after_backward=gates_learn)
    assert losses[-1] < losses[0]
    assert d.gates().abs().sum() > 0
    after = d.compress(DEMOS * 2).prefill
    assert not torch.equal(after.cache[1][1], before.cache[1][1])


def test_one_adam_step_opens_a_gate_by_its_gain_times_the_learning_rate(seeded):
    # Adam's first step moves a weight by the learning rate, whatever its gradient's size;
    # the gain makes that a gate's step, so gates open at LoRA's learning rate.
    d = seeded(m=2, total=2)
    train_a_few(d, steps=1)
    moved = d.gates().detach().abs()
    moved = moved[moved > 0]
    assert len(moved) > 0
    torch.testing.assert_close(moved, torch.full_like(moved, seeding.Gates.GAIN * 1e-2),
                               rtol=1e-3, atol=0)


def test_a_seeded_checkpoint_reloads_its_gates(seeded, tmp_path):
    d = seeded(m=2, total=3)
    with torch.no_grad():
        d.gates.weight.add_(0.3)
    d.save_pretrained(tmp_path / "ckpt")
    again = Distiller.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(again.gates.weight, d.gates.weight)
    a, b = d.compress(DEMOS).prefill, again.compress(DEMOS).prefill
    for (k, v), (k2, v2) in zip(a.cache, b.cache):
        torch.testing.assert_close(k, k2)
        torch.testing.assert_close(v, v2)
    plain = seeded(m=0, total=1)  # its one learned placeholder fits; it has no gates
    with pytest.raises(CheckpointError, match="gates"):
        plain.load_trainable_state_dict(d.trainable_state_dict())


def test_seeding_needs_kv_output_and_at_most_l_seeds():
    with pytest.raises(ConfigError, match="seeded_placeholders"):
        MendConfig(distiller="x", llm="x", output="compacted", num_placeholders=4,
                   seeded_placeholders=2)
    with pytest.raises(ConfigError, match="seeded_placeholders"):
        MendConfig(distiller="x", llm="x", output="kv", num_placeholders=4, seeded_placeholders=5)


def test_the_repeat_pass_the_seeds_are_picked_from_counts_against_the_distillers_positions(
        seeded):
    # The tiny model takes 2048 positions: 1500 fit once, not twice.
    assert seeded(m=0, total=3, max_distiller_length=1500).gates is None
    with pytest.raises(ConfigError, match="twice: the demonstrations and their repeat"):
        seeded(m=2, total=3, max_distiller_length=1500)
