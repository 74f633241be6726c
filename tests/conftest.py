"""Shared fixtures: tiny random models saved as real transformers directories."""

from __future__ import annotations


import pytest
import torch

from mend import Distiller, MendConfig, tiny

# The tokenizer family each tiny architecture is paired with, like its real counterpart.
STYLE = {"gpt2": "bytelevel", "opt": "bytelevel", "qwen2": "bytelevel",
         "llama": "metaspace", "gemma3": "metaspace"}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """``tiny_model(arch, hidden=32, style=None) -> directory`` of a saved tiny model."""
    root = tmp_path_factory.mktemp("tiny")

    def make(arch: str, hidden: int = 32, style: str | None = None) -> str:
        style = style or STYLE[arch]
        return str(tiny.build(root / f"{arch}-{hidden}-{style}", arch, style, hidden=hidden))
    return make


@pytest.fixture
def make_distiller(tiny_model):
    """``make_distiller(distiller_arch, llm_arch, **config) -> Distiller`` with tiny models."""
    def make(distiller: str = "llama", llm: str = "gpt2", distiller_hidden: int = 32,
             llm_hidden: int = 48, **kwargs) -> Distiller:
        kwargs.setdefault("num_placeholders", 4)
        kwargs.setdefault("max_distiller_length", 256)
        # Build (or find) the models first: building seeds the RNG, so seeding before it would
        # give a different distiller on a test's first call than on its later ones.
        paths = tiny_model(distiller, distiller_hidden), tiny_model(llm, llm_hidden)
        torch.manual_seed(0)
        cfg = MendConfig(distiller=paths[0], llm=paths[1], **kwargs)
        return Distiller.from_config(cfg)
    return make
