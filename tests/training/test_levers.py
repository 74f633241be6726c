"""The training levers of issue 14: precision chosen by measurement, per-group learning
rates, and the autoencoding objective, each against a hand computation."""

import pytest
import torch
import torch.nn.functional as F

from mend.core.text import encode
from mend.data import Example
from mend.errors import ConfigError
from mend.methods.mend import MendObjective, ObjectiveConfig
from mend.training import precision
from mend.training.config import TrainConfig
from mend.training.optim import param_groups


@pytest.mark.parametrize("bf16, fp32, expected", [(400e9, 130e9, "bf16"), (1e9, 130e9, "no")])
def test_auto_precision_follows_the_measured_matmul_rates(monkeypatch, bf16, fp32, expected):
    rates = {torch.bfloat16: bf16, torch.float32: fp32}
    monkeypatch.setattr(precision, "matmul_rate", lambda dtype, *a, **k: rates[dtype])
    precision.resolve.cache_clear()
    precision.cpu_rates.cache_clear()
    try:
        chosen, why = precision.resolve("auto", "cpu")
    finally:
        precision.resolve.cache_clear()
        precision.cpu_rates.cache_clear()
    assert chosen == expected and "GFLOP/s" in why
    assert precision.resolve("bf16", "cpu") == ("bf16", "as configured")


@pytest.mark.parametrize("bf16, fp32, warns", [(1e9, 176e9, True), (300e9, 200e9, False)])
def test_bf16_on_a_cpu_that_emulates_it_is_named_with_the_fix(monkeypatch, bf16, fp32, warns):
    monkeypatch.setattr(precision, "cpu_rates", lambda: (fp32, bf16))
    asks = ["train.mixed_precision=bf16", "the model's weights stored in bfloat16"]
    why = precision.bf16_warning(asks, "cpu")
    if warns:
        assert "176x slower" in why and "train.mixed_precision=bf16 and the model's" in why
        assert "train.mixed_precision=auto" in why
    else:
        assert why is None
    assert precision.bf16_warning([], "cpu") is None
    assert precision.bf16_warning(asks, "cuda") is None


def test_lr_multipliers_group_parameters_by_name_prefix():
    module = torch.nn.Module()
    module.placeholders = torch.nn.Parameter(torch.zeros(2))
    module.projection = torch.nn.Linear(2, 2)
    module.encoder = torch.nn.Linear(2, 2)
    cfg = TrainConfig(lr=1e-3, lr_multipliers={"placeholders": 10, "projection.0": 3,
                                               "projection": 5})
    with pytest.raises(ConfigError, match="starts no trainable parameter's name"):
        param_groups(cfg, module)
    cfg = TrainConfig(lr=1e-3, lr_multipliers={"placeholders": 10, "projection": 5})
    groups = param_groups(cfg, module)
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 1e-2, 5e-3])  # the base first
    assert [len(g["params"]) for g in groups] == [2, 1, 2]
    with pytest.raises(ConfigError, match="must all be > 0"):
        TrainConfig(lr_multipliers={"placeholders": 0})


def test_reconstruct_is_the_nll_of_the_context_read_after_the_vectors(make_distiller):
    d = make_distiller("llama", "gpt2", num_placeholders=3)
    tok = d.llm.tokenizer
    context = encode(tok, [" great movie! positive dull plot negative"])[0]
    inp = encode(tok, [" a delightful story"])[0]
    objective = MendObjective(d, ObjectiveConfig(distill=0.0, reconstruct=1.0))
    batch = objective.collate([Example(tok.decode(context), context, inp, len(inp))])
    out = objective.loss(d, batch)
    # By hand: the LLM reads [vectors | context] (GPT-2 has no bos); the last vector
    # predicts the first context token, and each context token the next.
    vectors = d(batch["demo_ids"], batch["demo_mask"])
    embeds = torch.cat([vectors, d.llm.embed(torch.tensor([context]))], 1)
    logits = d.llm.model(inputs_embeds=embeds).logits[0, 2:-1]  # predictors of context[0:]
    expected = F.cross_entropy(logits.float(), torch.tensor(context)).detach()
    assert out["reconstruct"] == pytest.approx(float(expected), rel=1e-4)
    assert float(out["loss"]) == pytest.approx(float(expected), rel=1e-4)
    assert "distill" not in out


def test_distill_on_answer_is_the_kl_at_the_answer_predictors_only(make_distiller):
    d = make_distiller("llama", "gpt2", num_placeholders=3)
    tok = d.llm.tokenizer
    context = encode(tok, [" great movie! positive dull plot negative"])[0]
    query, answer = encode(tok, [" a delightful story"])[0], encode(tok, [" positive"])[0]
    example = Example(tok.decode(context), context, query + answer, len(query))
    objective = MendObjective(d, ObjectiveConfig(distill=1.0, distill_on="answer"))
    batch = objective.collate([example])
    out = objective.loss(d, batch)
    # By hand: teacher [context | query answer] and student [vectors | query answer]; the KL
    # of the distributions that predict the answer tokens, averaged over those tokens.
    ids = torch.tensor([query + answer])
    vectors = d(batch["demo_ids"], batch["demo_mask"])
    student = d.llm.model(inputs_embeds=torch.cat([vectors, d.llm.embed(ids)], 1)).logits
    teacher = d.llm.model(input_ids=torch.tensor([context + query + answer])).logits
    n, first = len(answer), len(query)
    s = student[0, 3 + first - 1:3 + first - 1 + n].float()
    t = teacher[0, len(context) + first - 1:len(context) + first - 1 + n].float()
    expected = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True,
                        reduction="sum") / n
    assert out["distill"] == pytest.approx(float(expected), rel=1e-4)
    everywhere = MendObjective(d, ObjectiveConfig(distill=1.0)).loss(d, batch)["distill"]
    assert float(everywhere) != pytest.approx(float(expected), rel=1e-3)
    with pytest.raises(ConfigError, match="stage 1"):
        from mend.recipes.pretrain import PretrainConfig
        PretrainConfig(model=d.config, objective=ObjectiveConfig(distill_on="answer"))


def _step_grads(path: str, recipe: str, **levers):
    """One training step's loss and trainable gradients under bf16 autocast, as
    bench/train.py takes it (the distiller LoRA on the LLM itself), with ``levers``."""
    from mend import Distiller, MendConfig
    cfg = {"kv": dict(output="kv", placeholder_init="vocab"),
           "compacted": dict(output="compacted")}[recipe]
    torch.manual_seed(0)
    d = Distiller.from_config(MendConfig(distiller=path, llm=path, num_placeholders=3,
                                         train_mode="lora", lora_dropout=0.0, **cfg, **levers))
    with torch.no_grad():  # adapters away from zero, so that every gradient is non-zero
        for name, p in d.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    tok = d.llm.tokenizer
    context = encode(tok, ["the film was great and the actors were wonderful"])[0]
    objective = MendObjective(d, ObjectiveConfig(distill=1.0, pred=1.0))
    query = encode(tok, [" a delightful story positive"])[0]
    batch = objective.collate([Example(tok.decode(context), context, query, len(query) - 1)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = objective.loss(d, batch)["loss"]
    loss.backward()
    grads = torch.cat([p.grad.float().flatten() for p in d.parameters() if p.requires_grad])
    return float(loss.detach()), grads


@pytest.mark.parametrize("recipe", ["kv", "compacted"])
@pytest.mark.parametrize("lever, levers, tolerance", [
    ("bf16-weights", {"distiller_dtype": "bfloat16", "llm_dtype": "bfloat16"}, 2e-2),
    ("eager-attention", {"attn_implementation": "eager"}, 2e-3)])
def test_each_step_lever_keeps_the_loss_and_gradients_of_the_old_path(tiny_model, recipe, lever,
                                                                      levers, tolerance):
    path = tiny_model("llama", 48)
    old_loss, old = _step_grads(path, recipe)
    new_loss, new = _step_grads(path, recipe, **levers)
    assert new_loss == pytest.approx(old_loss, rel=tolerance)
    assert F.cosine_similarity(new, old, dim=0) > 1 - tolerance
    assert (new.norm() / old.norm()).item() == pytest.approx(1.0, rel=5 * tolerance)


def test_no_lora_dropout_is_the_old_step_with_its_dropout_switched_off(tiny_model):
    """The lever removes dropout's random masks; the step is otherwise the old one, whose
    loss without dropout (eval mode) it equals exactly."""
    from mend import Distiller, MendConfig
    path = tiny_model("llama", 48)
    losses = {}
    for dropout, train in ((0.05, False), (0.0, True)):
        torch.manual_seed(0)
        d = Distiller.from_config(MendConfig(distiller=path, llm=path, num_placeholders=3,
                                             output="kv", train_mode="lora",
                                             lora_dropout=dropout)).train(train)
        tok = d.llm.tokenizer
        context = encode(tok, ["the film was great"])[0]
        objective = MendObjective(d, ObjectiveConfig(distill=1.0))
        query = encode(tok, [" a delightful story"])[0]
        batch = objective.collate([Example(tok.decode(context), context, query, len(query))])
        losses[dropout] = float(objective.loss(d, batch)["loss"].detach())
    assert losses[0.0] == losses[0.05]
