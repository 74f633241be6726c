"""The learned scorer (``learned_scorer: true``): it corrects a compaction's choice of
positions and raises the kept keys' logits, starting from no correction."""

import pytest
import torch

from mend import Distiller, MendConfig
from mend.core import compaction
from mend.core.compaction import Reading
from mend.core.compaction.learned import LearnedScorer
from mend.core.kv_compress import KVCompressor
from mend.errors import CheckpointError, ConfigError
from tests.support import DEMOS, train_a_few

OPTIONS = ["positive", "negative"]


@pytest.fixture
def scored(tiny_model):
    def make(**kwargs) -> Distiller:
        path = tiny_model("llama", 48)
        kwargs = {"num_placeholders": 3, "output": "compacted", "train_mode": "lora",
                  "learned_scorer": True, "io_sep": "\n", "demo_sep": "\n\n", **kwargs}
        torch.manual_seed(0)
        return Distiller.from_config(MendConfig(distiller=path, llm=path, **kwargs))
    return make


def reading(s: int = 6, d: int = 4) -> Reading:
    torch.manual_seed(1)
    keys, values = torch.randn(1, 1, s, d), torch.randn(1, 1, s, d)
    return Reading(keys, values, torch.ones(1, s), torch.randn(1, 1, s, d), d ** -0.5)


def test_a_correction_picks_the_positions_and_raises_their_logits_by_hand():
    cut = compaction.get("attention_cut")
    r = reading()
    scores = cut.scorer(r)[0, 0]  # six positions, keep bos and two
    plain, *_ = cut(r, 3)
    low = int(scores[1:].argmin()) + 1  # the worst position but bos
    assert low not in plain[0, 0].tolist()
    correction = torch.zeros(1, 1, 6)
    correction[0, 0, low] = 50.0  # score * e^50 now ranks it first after bos
    index, keys, values, bias = cut(r, 3, correction)
    best_other = int(scores[1:].masked_fill(torch.arange(1, 6) == low, -1).argmax()) + 1
    assert index[0, 0].tolist() == sorted([0, low, best_other])
    expected = [50.0 if i == low else 0.0 for i in index[0, 0].tolist()]
    assert bias[0, 0].tolist() == expected  # no fit: the bias is the correction alone
    assert torch.equal(keys[0, 0], r.keys[0, 0, index[0, 0]])


def test_a_fresh_scorer_corrects_nothing():
    net = LearnedScorer(layers=2, head_dim=4)
    assert torch.equal(net(1, reading()), torch.zeros(1, 1, 6))


@pytest.mark.parametrize("name", ["attention_matching", "kvzip"])
def test_at_step_0_it_is_still_the_training_free_compaction(scored, name):
    d = scored(compaction=name)
    compressor = KVCompressor(d.llm, d.format, 3, compaction=name)
    sets = [DEMOS * 3, DEMOS[:2]]
    mine, theirs = d.compress_batch(sets).prefill, compressor.compress_batch(sets).prefill
    assert torch.equal(mine.mask, theirs.mask)
    for (k, v), (k2, v2) in zip(mine.cache, theirs.cache):
        assert torch.equal(k, k2) and torch.equal(v, v2)
    for i, b in enumerate(mine.bias):  # the fit's bias plus zero, or zero where none is fitted
        assert torch.equal(b, theirs.bias[i] if theirs.bias else torch.zeros_like(b))
    queries = ["a joyless film", "the cat sat on the mat"]
    torch.testing.assert_close(
        torch.tensor(d.score(d.compress(sets[0]), queries, OPTIONS)),
        torch.tensor(compressor.score(compressor.compress(sets[0]), queries, OPTIONS)))


def test_the_scorer_trains_beside_the_adapters_and_reloads(scored, tmp_path):
    d = scored()
    trainable = {n for n, p in d.named_parameters() if p.requires_grad}
    assert any(n.startswith("scorer.") for n in trainable)

    def last_layer_learns():  # it starts at zero: its gradient comes through the kept keys' bias
        assert d.scorer.nets[0][-1].weight.grad.abs().sum() > 0

    train_a_few(d, steps=3, after_backward=last_layer_learns)
    prefix = d.compress(DEMOS * 2).prefill
    assert any(b.abs().sum() > 0 for b in prefix.bias)  # it corrects now
    d.save_pretrained(tmp_path / "ckpt")
    again = Distiller.from_pretrained(tmp_path / "ckpt")
    for b, b2 in zip(prefix.bias, again.compress(DEMOS * 2).prefill.bias):
        torch.testing.assert_close(b, b2)
    without = scored(learned_scorer=False)
    with pytest.raises(CheckpointError, match="learned scorer"):
        without.load_trainable_state_dict(d.trainable_state_dict())


def test_it_needs_a_compaction_to_correct():
    with pytest.raises(ConfigError, match="learned_scorer .* output: compacted"):
        MendConfig(distiller="x", llm="x", output="kv", learned_scorer=True)
