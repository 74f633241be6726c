"""Distiller on tiny random models: shapes, invariances, training, checkpoints, bad input."""

import json

import pytest
import torch

from mend import Distiller, MendConfig
from mend.core.distiller import CONFIG_FILE, WEIGHTS_FILE
from mend.core.losses import kl_distill
from mend.core.text import encode
from mend.errors import BackboneError, CheckpointError, ConfigError, InputError, TruncationWarning
from mend.tiny import ARCHS
from tests.support import DEMOS

OPTIONS = ["positive", "negative"]


def test_shapes_and_dtypes(make_distiller):
    d = make_distiller("llama", "gpt2", num_placeholders=5, llm_dtype="bfloat16")
    ctx = d.compress(DEMOS)
    assert ctx.vectors.shape == (1, 5, 48) and ctx.vectors.dtype == torch.bfloat16
    assert d.placeholders.shape == (5, 32) and d.placeholders.dtype == torch.float32
    assert isinstance(d.projection[0], torch.nn.Linear) and d.projection[0].out_features == 48
    batch = d.compress_batch([DEMOS, DEMOS[:1], "one plain string"])
    assert len(batch) == 3 and batch[1].vectors.shape == (1, 5, 48)
    scores = d.score(batch, ["a joyless film", "great", "ok"], options=OPTIONS)
    assert len(scores) == 3 and all(len(s) == 2 for s in scores)
    assert all(isinstance(x, float) and x > 0 for s in scores for x in s)


@pytest.mark.parametrize("arch", ARCHS)
def test_compress_is_padding_invariant(make_distiller, arch):
    d = make_distiller(arch, "llama", distiller_hidden=32, llm_hidden=32)
    sets = [DEMOS[:1], DEMOS, ["a single plain string demonstration that is longer"]]
    batch = d.compress_batch(sets).vectors
    for i, demos in enumerate(sets):
        alone = d.compress(demos).vectors
        assert torch.allclose(batch[i:i + 1], alone, atol=1e-5), (arch, i)
    # Different demonstrations do give different vectors.
    assert not torch.allclose(batch[0], batch[1], atol=1e-3)


def test_zero_placeholders_leave_the_llm_unchanged(make_distiller):
    d = make_distiller("llama", "llama", num_placeholders=0)
    ctx = d.compress(DEMOS)
    assert ctx.vectors.shape == (1, 0, 48)
    ids = torch.tensor(encode(d.llm.tokenizer, [" a joyless film"]))
    expected = d.llm.model(torch.cat([torch.tensor([d.llm.bos]), ids], 1)).logits[:, 1:]
    assert torch.allclose(d.llm.logits(ids, prefix=ctx.vectors), expected, atol=1e-5)
    zero_shot = d.llm.score_options(encode(d.llm.tokenizer, [" a joyless film"]),
                                    [encode(d.llm.tokenizer, [" positive", " negative"])])
    assert d.score(ctx, ["a joyless film"], OPTIONS)[0] == pytest.approx(
        zero_shot[0].tolist(), abs=1e-5)


@pytest.mark.parametrize("mode, llm_dtype", [("full", "float32"), ("lora", "float32"),
                                             ("full", "bfloat16")])
def test_one_step_trains_the_distiller_and_never_the_llm(make_distiller, mode, llm_dtype):
    d = make_distiller("gpt2", "llama", train_mode=mode, llm_dtype=llm_dtype)
    trainable = {n: p.detach().clone() for n, p in d.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in d.llm.model.named_parameters()}
    assert "placeholders" in trainable and not any(p.requires_grad for p in
                                                   d.llm.model.parameters())
    if mode == "lora":
        assert all("lora_" in n or not n.startswith("encoder.") for n in trainable)
    opt = torch.optim.AdamW([p for p in d.parameters() if p.requires_grad], lr=1e-2)
    ids, mask, _ = d.tokenize([DEMOS])
    inputs = torch.tensor(encode(d.llm.tokenizer, [" a joyless film negative"]))
    with torch.no_grad():
        context = encode(d.llm.tokenizer, d.format.pieces(DEMOS))
        teacher = d.llm.logits(inputs, prefix=d.llm.embed(torch.tensor([sum(context, [])])))
    student = d.llm.logits(inputs, prefix=d(ids, mask))
    loss = kl_distill(student, teacher)
    loss.backward()
    opt.step()
    changed = [n for n, p in d.named_parameters() if p.requires_grad
               and not torch.equal(p.detach(), trainable[n])]
    assert "placeholders" in changed and any(n.startswith("encoder.") for n in changed)
    assert set(changed) == set(trainable), set(trainable) - set(changed)
    assert all(torch.equal(p, frozen[n]) for n, p in d.llm.model.named_parameters())


@pytest.mark.parametrize("settings", [
    dict(train_mode="full"),
    dict(train_mode="lora", placeholder_init="vocab", projection="always"),
])
def test_save_then_load_gives_identical_scores(make_distiller, tmp_path, settings):
    d = make_distiller("llama", "gpt2", **settings)
    with torch.no_grad():  # move every trainable weight away from its fresh initialisation
        for p in d.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    import os
    mask = os.umask(0o022)  # files get the umask's mode, not their temporary files' 0600
    try:
        d.save_pretrained(tmp_path / "ckpt")
    finally:
        os.umask(mask)
    assert {(tmp_path / "ckpt" / f).stat().st_mode & 0o777 for f in (CONFIG_FILE, WEIGHTS_FILE)
            } == {0o644}
    saved = json.loads((tmp_path / "ckpt" / CONFIG_FILE).read_text())["config"]
    assert saved["distiller"] == d.config.distiller and saved["llm"] == d.config.llm
    loaded = Distiller.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == d.config
    queries = ["a joyless film", "what a delightful story"]
    assert loaded.score(loaded.compress(DEMOS), queries, OPTIONS) == d.score(
        d.compress(DEMOS), queries, OPTIONS)
    assert not list(tmp_path.glob("ckpt/*.tmp"))
    if settings["train_mode"] == "lora":  # only adapters, placeholders and projection
        full = sum(p.numel() for p in d.encoder.parameters())
        from safetensors.torch import load_file
        saved_numel = sum(t.numel() for t in load_file(tmp_path / "ckpt" / WEIGHTS_FILE).values())
        assert saved_numel < full / 2


def test_merged_adapters_give_the_same_vectors_and_refuse_to_save(make_distiller, tmp_path):
    d = make_distiller("llama", "gpt2", train_mode="lora", projection="always").eval()
    with torch.no_grad():  # LoRA's B starts at zero: move it so the adapters change something
        for name, p in d.encoder.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.1)
    before = d.compress_batch([DEMOS, DEMOS[:1]]).vectors
    d.merge_adapters()
    assert d.merged and not any("lora" in n for n, _ in d.encoder.named_parameters())
    assert torch.allclose(d.compress_batch([DEMOS, DEMOS[:1]]).vectors, before, atol=1e-5)
    with pytest.raises(CheckpointError, match="merged for inference"):
        d.save_pretrained(tmp_path / "merged")


def test_save_in_bfloat16_halves_the_file_and_loads_the_rounded_weights(make_distiller,
                                                                        tmp_path):
    d = make_distiller("llama", "gpt2", train_mode="lora", projection="always")
    d.save_pretrained(tmp_path / "fp32")
    d.save_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    sizes = [(tmp_path / name / WEIGHTS_FILE).stat().st_size for name in ("fp32", "bf16")]
    assert sizes[1] < 0.6 * sizes[0]
    loaded = Distiller.from_pretrained(tmp_path / "bf16")
    assert loaded.placeholders.dtype == torch.float32  # cast back to the model's dtype
    rounded = {k: v.to(torch.bfloat16).float() for k, v in d.trainable_state_dict().items()}
    got = loaded.trainable_state_dict()
    assert got.keys() == rounded.keys() and all(torch.equal(got[k], rounded[k]) for k in got)


def test_different_tokenizers_and_hidden_sizes_work_together(make_distiller):
    d = make_distiller("qwen2", "gemma3", distiller_hidden=32, llm_hidden=64)
    assert d.tokenizer.get_vocab() != d.llm.tokenizer.get_vocab()
    assert d._bos == [] and d.llm.bos == [d.llm.tokenizer.bos_token_id]  # byte-level vs SP
    ctx = d.compress(DEMOS)
    assert ctx.vectors.shape == (1, 4, 64)
    texts = d.generate(ctx, ["a joyless film"], max_new_tokens=3)
    assert len(texts) == 1 and isinstance(texts[0], str)


def test_over_long_demonstrations_are_truncated_with_a_count(make_distiller):
    d = make_distiller("gpt2", "gpt2", num_placeholders=4, max_distiller_length=24)
    long_demos = [("word " * 5, "positive")] * 6
    with pytest.warns(TruncationWarning, match=r"budget of 20 tokens.*dropped \d+ demonstration"):
        ids, mask, _ = d.tokenize([long_demos, DEMOS[:1]])
    assert mask.sum(1).max().item() <= 20
    with pytest.warns(TruncationWarning, match="1 of 1 demonstration set"):
        assert d.compress(long_demos).vectors.shape == (1, 4, 48)


def test_bad_inputs_give_clear_errors(make_distiller, tmp_path, tiny_model):
    d = make_distiller("llama", "gpt2")
    with pytest.raises(InputError, match="No demonstrations"):
        d.compress([])
    with pytest.raises(InputError, match="wrap it in a list"):
        d.compress(("great", "positive"))
    ctx = d.compress_batch([DEMOS, DEMOS])
    with pytest.raises(InputError, match="needs 1 \\(shared\\) or one per query"):
        d.score(ctx, ["a", "b", "c"], OPTIONS)
    with pytest.raises(InputError, match="non-empty list of strings"):
        d.score(ctx[0], "not a list", OPTIONS)
    with pytest.raises(InputError, match="2 queries but 3 option lists"):
        d.score(ctx[0], ["a", "b"], [OPTIONS] * 3)
    with pytest.raises(CheckpointError, match="not a mend checkpoint"):
        Distiller.from_pretrained(tmp_path)
    with pytest.raises(InputError, match="projection='none' forbids"):
        make_distiller("llama", "gpt2", projection="none")
    with pytest.raises(ConfigError, match="Unknown config key `num_placeholder`"):
        Distiller.from_pretrained(_saved(d, tmp_path), num_placeholder=3)


def test_mismatched_hidden_size_on_load_is_named(make_distiller, tmp_path, tiny_model):
    d = make_distiller("llama", "gpt2", llm_hidden=48)
    with pytest.raises(CheckpointError, match="LLM's hidden size \\(64\\)"):
        Distiller.from_pretrained(_saved(d, tmp_path), llm=tiny_model("gpt2", 64))


def test_8bit_where_bitsandbytes_cannot_run_it_fails_clearly_or_falls_back(tiny_model,
                                                                           monkeypatch):
    from mend.core import backbones
    monkeypatch.setattr(backbones, "_int8_problem",
                        lambda device: f"bitsandbytes 0.1 cannot run LLM.int8() on {device}")
    cfg = dict(distiller=tiny_model("llama"), llm=tiny_model("gpt2", 48), num_placeholders=2,
               max_distiller_length=64, llm_8bit=True)
    with pytest.raises(BackboneError, match="cannot run LLM.int8.. on cpu.*allow_8bit_fallback"):
        Distiller.from_config(MendConfig(**cfg))
    with pytest.warns(UserWarning, match="allow_8bit_fallback is set"):
        d = Distiller.from_config(MendConfig(**cfg, allow_8bit_fallback=True))
    assert d.llm.dtype == torch.float32


def _saved(d: Distiller, tmp_path):
    d.save_pretrained(tmp_path / "saved")
    return tmp_path / "saved"


def test_every_trainable_weight_lives_on_the_models_device(tiny_model):
    """Placeholders and projection follow the distiller onto its device (caught on a GPU,
    where a projection built on the default CPU device broke evaluation)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from mend.core.backbones import load_tokenizer
    from mend.core.prefix_lm import PrefixLM
    cfg = MendConfig(distiller=tiny_model("llama"), llm=tiny_model("gpt2", 48),
                     num_placeholders=3, max_distiller_length=64, train_mode="lora")
    with torch.device("meta"):  # every tensor built in here is on "meta", unless forced off it
        encoder = AutoModel.from_config(AutoConfig.from_pretrained(cfg.distiller))
        llm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.llm))
    d = Distiller(cfg, encoder, load_tokenizer(cfg.distiller),
                  PrefixLM(llm, load_tokenizer(cfg.llm)))
    assert {p.device.type for p in d.parameters()} == {"meta"}


def test_damaged_checkpoint_files_are_named_with_what_to_do(make_distiller, tmp_path):
    d = make_distiller("llama", "gpt2")
    saved = _saved(d, tmp_path)
    weights = saved / WEIGHTS_FILE
    good = weights.read_bytes()
    weights.write_bytes(good[:5])  # a truncated copy: safetensors says "header too small"
    with pytest.raises(CheckpointError, match=f"{WEIGHTS_FILE} cannot be read.*save the "
                                              f"checkpoint again"):
        Distiller.from_pretrained(saved)
    weights.write_bytes(good[:len(good) // 2])  # cut inside the tensor data
    with pytest.raises(CheckpointError, match="truncated or damaged"):
        Distiller.from_pretrained(saved)
    weights.write_bytes(good)
    config = saved / CONFIG_FILE
    config.write_text(config.read_text()[:-20])  # broken JSON
    with pytest.raises(CheckpointError, match=f"{CONFIG_FILE} is not valid JSON"):
        Distiller.from_pretrained(saved)
    config.write_text(json.dumps({"kind": "mend"}))  # valid JSON, no config in it
    with pytest.raises(CheckpointError, match="has no `config` entry"):
        Distiller.from_pretrained(saved)


def test_vector_norm_match_starts_at_the_llms_embedding_scale(make_distiller):
    d = make_distiller("llama", "gpt2", vector_norm="match")
    v = d.compress(DEMOS).vectors
    emb = d.llm.model.get_input_embeddings().weight
    rms = emb.pow(2).mean().sqrt()  # RMS over every token and dimension (4096 > vocab here)
    assert v.pow(2).mean(-1).sqrt() == pytest.approx(torch.full(v.shape[:2], float(rms)),
                                                     rel=1e-3)
    plain = make_distiller("llama", "gpt2").compress(DEMOS).vectors
    assert not torch.allclose(plain.pow(2).mean(-1).sqrt(), v.pow(2).mean(-1).sqrt(), rtol=0.1)
