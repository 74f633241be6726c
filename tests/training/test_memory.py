"""Memory per GPU before a run (mend.training.memory): accelerate's parameter sizes against
hand counts, the engines' arithmetic, and the activation measurement's depth rule."""

from pathlib import Path

import pytest
import torch

from mend import tiny
from mend.config import replace
from mend.core.config import MendConfig
from mend.data.pretrain import TextDataConfig
from mend.training import memory


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    cfg = MendConfig(distiller=str(tiny.build(root / "llama", "llama", "metaspace")),
                     llm=str(tiny.build(root / "gpt2", "gpt2", "bytelevel", hidden=48)),
                     num_placeholders=4, max_distiller_length=256)
    return cfg, TextDataConfig(path="unused", max_length=64, min_length=16)


def test_parameter_sizes_are_the_models_own(pair):
    from transformers import AutoModel, AutoModelForCausalLM
    cfg, _ = pair
    llm = AutoModelForCausalLM.from_pretrained(cfg.llm)  # GPT-2 ties its head to wte
    sizes = memory.sizes(cfg.llm, with_head=True)
    assert sizes.total == 4 * sum(p.numel() for p in llm.parameters())  # tied counted once
    layers = [4 * sum(p.numel() for p in block.parameters()) for block in llm.transformer.h]
    assert sizes.largest_layer == max(layers) and sizes.root == sizes.total - sum(layers)
    encoder = AutoModel.from_pretrained(cfg.distiller)
    d = memory.sizes(cfg.distiller, with_head=False)
    # The distiller's rotary frequencies are a buffer, which accelerate counts too.
    buffers = sum(b.numel() * b.element_size() for b in encoder.buffers())
    assert d.total == 4 * sum(p.numel() for p in encoder.parameters()) + buffers
    assert d.scaled("bfloat16").total == d.total // 2 and d.scaled("int8").total == d.total // 4


def test_engines_divide_and_gather_as_documented(pair, monkeypatch):
    cfg, data = pair
    monkeypatch.setattr(memory, "activation_bytes", lambda *a: 1000)
    d, llm = memory.sizes(cfg.distiller, False), memory.sizes(cfg.llm, True)
    trained = d.total + 4 * (4 * 32 + 32 * 48 + 48)  # distiller, placeholders, projection
    assert memory.trainable_bytes(cfg, d) == trained
    ddp = memory.estimate(cfg, data, 2, "ddp", 1)
    assert (ddp.parameters, ddp.gathered, ddp.gradients, ddp.optimizer, ddp.activations) == (
        d.total + llm.total, 0, 2 * trained, 2 * trained, 2000)
    fsdp = memory.estimate(cfg, data, 2, "fsdp", 4)
    assert fsdp.parameters == (d.total + llm.total) // 4
    assert fsdp.gathered == d.root + llm.root + 2 * max(d.largest_layer, llm.largest_layer)
    assert (fsdp.gradients, fsdp.optimizer) == (trained // 4, 2 * trained // 4)
    assert memory.estimate(cfg, data, 2, "8bit", 1).parameters == d.total + llm.total // 4
    assert fsdp.total == sum((fsdp.parameters, fsdp.gathered, fsdp.gradients, fsdp.optimizer,
                              fsdp.activations))
    lora = replace(cfg, train_mode="lora", lora_r=2)
    assert memory.trainable_bytes(lora, d) < trained / 4  # adapters only


def test_saved_bytes_counts_what_autograd_keeps_and_not_weights():
    x = torch.randn(10, 8, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(8, 8))
    with memory.saved_bytes([]) as saved:
        torch.exp(x @ weight).sum()  # matmul keeps x (a leaf) and the weight; exp its output
    assert saved[0] == 10 * 8 * 4 + 10 * 8 * 4  # x and exp's output; the weight is a weight


def test_activations_per_layer_extrapolate_to_the_real_depth(pair):
    """Both tiny models have 2 layers: the estimate from 1- and 2-layer probes must equal a
    probe at the real depth."""
    cfg, data = pair
    direct = memory._probe(cfg, memory.lengths(cfg, data), 2, 2, "no", False)
    assert memory.activation_bytes(cfg, data) == direct
    checkpointed = memory.activation_bytes(cfg, data, "no", True)
    assert 0 < checkpointed < direct


def test_mend_memory_prints_every_engine(pair, tmp_path, capsys):
    import json

    from mend.cli import main
    cfg, _ = pair
    out = tmp_path / "rows.json"
    config = Path(__file__).resolve().parents[2] / "configs/pretrain/smollm2-wikitext-cpu.yaml"
    assert main(["memory", "--config", str(config),
                 "--processes", "4", "--output", str(out), f"model.distiller={cfg.distiller}",
                 f"model.llm={cfg.llm}", "data.max_length=64", "model.num_placeholders=4",
                 # the tiny pair differs in shape, so it cannot hand over keys and values
                 "model.max_distiller_length=256", "model.output=embeddings"]) == 0
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())
    assert [r["engine"] for r in rows] == ["ddp", "fsdp", "8bit"] and rows[1]["processes"] == 4
    assert "| ddp |" in printed and "total (GiB)" in printed
