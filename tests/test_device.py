"""What can break when mend leaves the CPU: compress, score and generate in both outputs, a
bf16 training step, a checkpoint saved on a device and loaded on the CPU, and the content
controls. Each test runs on every device under test (``tests/conftest.py``): the CPU here,
and also the GPU with ``MEND_TEST_DEVICE=cuda``, each checked against the CPU's answer."""

import pytest
import torch

from mend import Distiller
from mend.core.text import encode
from mend.data import Example
from mend.data.pretrain import TextDataConfig
from mend.evaluation.diagnostics import ContentConfig, content_gain, held_out_examples
from mend.methods.mend import MendObjective, ObjectiveConfig
from tests.evaluation.test_diagnostics import write_articles

pytestmark = pytest.mark.device

DEMOS = [("great movie", "positive"), ("dull plot", "negative"), ("loved it", "positive")]
QUERIES, OPTIONS = ["what a film", "boring"], ["positive", "negative"]


def flat(scores: list[list[float]]) -> list[float]:
    return [x for row in scores for x in row]


@pytest.fixture(params=["embeddings", "kv"])
def saved(request, make_distiller, tmp_path):
    """A tiny distiller of either output, saved from the CPU; its directory."""
    # One family on both sides, since output: kv hands the distiller's cache to the LLM.
    make_distiller("gpt2", "gpt2", distiller_hidden=48, llm_hidden=48,
                   output=request.param).save_pretrained(tmp_path / "d")
    return tmp_path / "d"


def test_compress_score_and_generate_agree_with_the_cpu(saved, device):
    cpu = Distiller.from_pretrained(saved, device="cpu")
    there = Distiller.from_pretrained(saved, device=device)
    expected = cpu.score(cpu.compress(DEMOS), QUERIES, OPTIONS)
    ctx = there.compress(DEMOS)
    got = there.score(ctx, QUERIES, OPTIONS)
    # TF32 matmuls on a GPU round differently from the CPU's fp32.
    assert flat(got) == pytest.approx(flat(expected), rel=2e-3, abs=2e-3)
    texts = there.generate(ctx, QUERIES, max_new_tokens=3)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    # Reused for a batch of queries, the one context broadcasts on the device too.
    assert flat(there.score(ctx, QUERIES * 2, OPTIONS)[2:]) == pytest.approx(flat(got),
                                                                             rel=1e-4, abs=1e-4)


def batch_of(d: Distiller) -> dict:
    """Two pretraining examples: the text's first part distilled, the rest predicted."""
    tok = d.llm.tokenizer
    rows = encode(tok, [" the river ran past the old stone mill and on to the sea",
                        " a violin played in the orchard while the falcon circled"])
    examples = [Example(tok.decode(r[:8]), r[:8], r[8:], 0) for r in rows]
    return MendObjective(d, ObjectiveConfig(distill=1.0)).collate(examples)


def test_a_bf16_training_step_moves_the_distiller_and_saves_for_the_cpu(saved, device,
                                                                        tmp_path):
    d = Distiller.from_pretrained(saved, device=device)
    objective = MendObjective(d, ObjectiveConfig(distill=1.0))
    batch = batch_of(d)
    before = {k: v.detach().clone() for k, v in d.trainable_state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in d.parameters() if p.requires_grad], lr=1e-2)
    d.train()
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        loss = objective.loss(d, batch)["loss"]
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    after = d.trainable_state_dict()
    assert all(after[k].dtype == torch.float32 for k in after)  # the master weights stay fp32
    assert any(not torch.equal(before[k], after[k].detach().cpu()) for k in before)
    # Saved from the device, loaded on the CPU: the same weights, the same scores.
    d.eval()
    d.save_pretrained(tmp_path / "trained")
    back = Distiller.from_pretrained(tmp_path / "trained", device="cpu")
    for k, v in back.trainable_state_dict().items():
        assert v.device.type == "cpu" and torch.equal(v, after[k].detach().cpu())
    assert flat(back.score(back.compress(DEMOS), QUERIES, OPTIONS)) == pytest.approx(
        flat(d.score(d.compress(DEMOS), QUERIES, OPTIONS)), rel=2e-3, abs=2e-3)


def test_the_content_controls_agree_with_the_cpu(saved, device, tmp_path):
    cfg = ContentConfig(data=TextDataConfig(path=str(write_articles(tmp_path / "t.tokens.gz")),
                                            documents="wikitext", max_length=40, min_length=16),
                        windows=4, batch_size=2)
    results = []
    for where in ("cpu", device):
        d = Distiller.from_pretrained(saved, device=where)
        results.append(content_gain(d, held_out_examples(cfg, d.llm.tokenizer, d.llm.bos), 2))
    cpu, there = results
    for key in ("kl_own", "kl_swap", "kl_none"):
        assert there[key] == pytest.approx(cpu[key], rel=2e-3, abs=1e-4)
    assert there["windows"] == 4
