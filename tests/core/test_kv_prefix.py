"""``output: kv``: the distiller's keys and values as the LLM's cache, through the same API."""

import pytest
import torch

from mend import Distiller, MendConfig
from mend.core.text import encode
from mend.errors import ConfigError, InputError
from mend.methods.mend import MendObjective, ObjectiveConfig
from tests.support import DEMOS, write_metaicl

OPTIONS = ["positive", "negative"]


@pytest.fixture
def kv_distiller(tiny_model):
    """A distiller that *is* the LLM (the same tiny Llama, trained fully), in kv mode."""
    def make(**kwargs):
        path = tiny_model("llama", 48)
        torch.manual_seed(0)
        return Distiller.from_config(MendConfig(distiller=path, llm=path, num_placeholders=3,
                                                output="kv", max_distiller_length=128,
                                                **kwargs))
    return make


def test_a_kv_prefix_of_nothing_but_placeholders_is_the_llm_reading_them(kv_distiller):
    """With no demonstration, the distiller reads ``[bos | placeholders]``, exactly what the
    LLM reads given the placeholders as vectors: the cache it hands over must continue the
    same way as the LLM reading them itself (positions, masks and cache building)."""
    from mend.core.distiller import DistilledContext

    d = kv_distiller().eval()
    bos = torch.tensor([d.llm.bos])
    with torch.no_grad():
        ctx = DistilledContext(None, d(bos, torch.ones_like(bos)))  # what compress would do
    assert ctx.prefill.cache[0][0].shape[2] == 1 + 3  # bos and the 3 placeholders
    ids = torch.tensor(encode(d.llm.tokenizer, [" a joyless film"]))
    vectors = d.placeholders.unsqueeze(0)
    with torch.no_grad():
        expected = d.llm.hidden(ids, prefix=vectors, with_prefix_last=True)
        got = d.llm.hidden(ids, prefix=ctx.prefill, with_prefix_last=True)
    assert torch.allclose(got, expected, atol=1e-5)
    q, o = encode(d.llm.tokenizer, [" a joyless film"]), [encode(d.llm.tokenizer,
                                                                 [" positive", " negative"])]
    plain = d.llm.score_options(q, o, prefix=vectors)[0]
    assert d.score(ctx, ["a joyless film"], OPTIONS)[0] == pytest.approx(plain.tolist(), abs=1e-5)


def test_kv_prefixes_are_padding_invariant_and_read_the_demonstrations(kv_distiller):
    d = kv_distiller()
    sets = [DEMOS[:1], DEMOS, ["a single plain string demonstration that is longer"]]
    batch = d.compress_batch(sets)
    queries = ["a joyless film"] * 3
    together = d.score(batch, queries, OPTIONS)
    for i, demos in enumerate(sets):
        alone = d.score(d.compress(demos), queries[:1], OPTIONS)[0]
        assert together[i] == pytest.approx(alone, abs=1e-4), i
        assert d.score(batch[i], queries[:1], OPTIONS)[0] == pytest.approx(alone, abs=1e-4)
    # Another set gives other keys and values, so other scores.
    assert together[0] != pytest.approx(together[1], abs=1e-4)
    assert len(d.generate(batch[:1], ["a joyless film"], max_new_tokens=3)[0]) >= 0
    with pytest.raises(InputError, match="generation is greedy"):
        d.generate(batch[:1], ["a joyless film"], max_new_tokens=3, do_sample=True)


def test_training_through_the_kv_prefix_moves_lora_and_placeholders(kv_distiller):
    from mend.data import Example

    d = kv_distiller(train_mode="lora", lora_r=4)
    objective = MendObjective(d, ObjectiveConfig(distill=1.0, pred=1.0))
    tok = d.llm.tokenizer
    context, inp = encode(tok, [" great movie! positive dull plot negative"])[0], encode(
        tok, [" a delightful story positive"])[0]
    batch = objective.collate([Example(tok.decode(context), context, inp, len(inp) - 1)] * 2)
    before = {n: p.detach().clone() for n, p in d.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in d.llm.model.named_parameters()}
    out = objective.loss(d, batch)
    out["loss"].backward()
    grads = {n: p.grad for n, p in d.named_parameters() if p.requires_grad}
    assert grads["placeholders"].abs().sum() > 0
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
    torch.optim.SGD([p for p in d.parameters() if p.requires_grad], lr=1.0).step()
    assert any(not torch.equal(before[n], p) for n, p in d.named_parameters() if n in before)
    assert all(torch.equal(frozen[n], p) for n, p in d.llm.model.named_parameters())


def test_kv_checkpoints_reload_and_serve_the_harness(kv_distiller, tmp_path):
    from mend.config import load_config
    from mend.recipes.evaluate import EvalConfig
    from mend.recipes.evaluate import main as evaluate

    d = kv_distiller(train_mode="lora", lora_r=4)
    d.save_pretrained(tmp_path / "kv")
    again = Distiller.from_pretrained(tmp_path / "kv")
    assert again.score(again.compress(DEMOS), ["ok"], OPTIONS)[0] == pytest.approx(
        d.score(d.compress(DEMOS), ["ok"], OPTIONS)[0], abs=1e-5)
    root = write_metaicl(tmp_path / "data", ["t1"], ["t1", "t2"])
    result = evaluate(load_config(EvalConfig, None, [
        f"data.root={root}", "data.partition=part", "data.seeds=[100]", "data.limit=3",
        "context.k=2", "demos.mode=resample", "demos.pool=seed", f"checkpoint={tmp_path / 'kv'}",
        f"output_dir={tmp_path / 'e'}"]))  # resampled: one key/value prefix per query
    assert result["results"]["num_tasks"] == 2 and "content_gap" in result


def test_kv_output_needs_the_llms_architecture(tiny_model):
    with pytest.raises(InputError, match="same \\(layers, key/value heads, head size\\)"):
        Distiller.from_config(MendConfig(distiller=tiny_model("gpt2", 48),
                                         llm=tiny_model("llama", 48), output="kv"))
    with pytest.raises(ConfigError, match="projection: auto"):
        MendConfig(distiller="a", llm="b", output="kv", projection="always")


def test_serving_a_kv_prefix_costs_the_llm_nothing_up_front(kv_distiller, tmp_path):
    from mend.data.metaicl import ContextBuilder, ContextConfig, load_task
    from mend.evaluation.efficiency import Serving, serving_costs
    from mend.methods.mend import Mend

    d = kv_distiller()
    method = Mend(d.eval())
    root = write_metaicl(tmp_path / "data", ["t1"], ["t1"])
    task = load_task(root, "t1")
    builder = ContextBuilder.for_method(d, ContextConfig(max_input_tokens=64))
    demos = [(r["input"], r["output"]) for r in task.rows("train", 100)[:4]]
    costs = serving_costs({"mend": Serving(method, builder)}, demos, task.rows("test")[:3],
                          "cpu", rounds=1)["mend"]
    once = costs["once"]
    assert once["llm_flops"] == 0 < once["context_flops"]  # only the distiller reads the demos
    from mend.core.kv_cache import shapes
    layers, kv_heads, head_dim = shapes(d.llm.model.config)
    assert once["cache_bytes"] == layers * 2 * kv_heads * (1 + 3) * head_dim * 4
    assert costs["per_query"]["flops"] > 0


def test_gradient_checkpointing_in_kv_mode_warns_and_still_trains(kv_distiller):
    """Checkpointing turns a layer's cache off, and in kv mode the cache is the output: asking
    for it warns, and training still reaches the placeholders."""
    from mend.data import Example

    d = kv_distiller(train_mode="lora", lora_r=4)
    with pytest.warns(UserWarning, match="no effect with output: kv"):
        d.gradient_checkpointing_enable()
    d.train()
    objective = MendObjective(d, ObjectiveConfig(distill=1.0))
    tok = d.llm.tokenizer
    context, inp = encode(tok, [" great movie! positive"])[0], encode(tok, [" dull plot"])[0]
    batch = objective.collate([Example(tok.decode(context), context, inp, len(inp))])
    objective.loss(d, batch)["loss"].backward()
    assert d.placeholders.grad.abs().sum() > 0
