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


needs_bnb = pytest.mark.skipif(not __import__("importlib").util.find_spec("bitsandbytes"),
                               reason="bitsandbytes is not installed (pip install 'mend[8bit]')")


@needs_bnb
def test_the_8bit_llm_loads_scores_refines_and_trains(tiny_model, device):
    """LLM.int8() wherever bitsandbytes runs it, the CPU included: its scores within 8-bit's
    error of the float LLM's, refinement through it, and a training step whose gradients
    reach the distiller through it and point where the float LLM's do."""
    from mend import MendConfig
    path = tiny_model("llama", 48)
    cfg = dict(distiller=path, llm=path, output="kv", num_placeholders=3, train_mode="lora")
    torch.manual_seed(0)
    eight = Distiller.from_config(MendConfig(**cfg, llm_8bit=True, llm_dtype="bfloat16"),
                                  device=device)
    assert eight.llm.model.is_loaded_in_8bit
    torch.manual_seed(0)
    full = Distiller.from_config(MendConfig(**cfg, llm_dtype="bfloat16"), device=device)
    got = flat(eight.score(eight.compress(DEMOS), QUERIES, OPTIONS))
    assert got == pytest.approx(flat(full.score(full.compress(DEMOS), QUERIES, OPTIONS)),
                                abs=0.1)
    refined = eight.compress(DEMOS, refine_steps=2)
    assert not torch.equal(refined.prefill.cache[0][0], eight.compress(DEMOS).prefill.cache[0][0])
    grads = []
    for d in (eight, full):
        with torch.no_grad():
            for name, p in d.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.linspace(-0.02, 0.02, p.numel()).view_as(p))
        objective = MendObjective(d, ObjectiveConfig(distill=1.0))
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            loss = objective.loss(d, batch_of(d))["loss"]
        loss.backward()
        grads.append(torch.cat([p.grad.float().flatten() for p in d.parameters()
                                if p.requires_grad]))
    # 8-bit's noise is large beside the small difference of two near distributions that a
    # KL's gradient is (bench/eightbit.py measures the cosine: about 0.3 to 0.5), but it
    # points the same way, and the distiller learns through it.
    assert grads[0].abs().sum() > 0
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0
    objective = MendObjective(eight, ObjectiveConfig(distill=1.0))
    optimizer = torch.optim.AdamW([p for p in eight.parameters() if p.requires_grad], lr=1e-3)
    batch, losses = batch_of(eight), []
    for _ in range(4):
        optimizer.zero_grad()
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            loss = objective.loss(eight, batch)["loss"]
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
