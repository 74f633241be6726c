"""Shared fixtures: tiny random models saved as real transformers directories, and the
devices under test.

Every test runs on the CPU, on any machine: mend's own default (the GPU when there is one)
is pinned to the CPU here through accelerate's ``ACCELERATE_USE_CPU``, which subprocesses
inherit. The tests marked ``device`` take a ``device`` argument instead and run once per
device under test: the CPU, plus the GPU that ``MEND_TEST_DEVICE=cuda`` names.
"""

from __future__ import annotations

import os

import pytest
import torch

from mend import Distiller, MendConfig, tiny

TEST_DEVICE = os.environ.get("MEND_TEST_DEVICE", "cpu")
os.environ.setdefault("ACCELERATE_USE_CPU", "true")


def devices() -> list[str]:
    """The devices the ``device``-marked tests run on."""
    if TEST_DEVICE == "cpu":
        return ["cpu"]
    if TEST_DEVICE != "cuda":
        raise pytest.UsageError(f"MEND_TEST_DEVICE={TEST_DEVICE!r}: use cpu or cuda.")
    if not torch.cuda.is_available():
        raise pytest.UsageError("MEND_TEST_DEVICE=cuda, but torch sees no CUDA device here.")
    return ["cpu", "cuda"]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each test's training runs as its own job would, in a fresh process: accelerate fixes one
    mixed precision per process at its first Accelerator, and a test suite trains many."""
    yield
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state()  # test scaffolding only: mend itself never resets it


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames and metafunc.definition.get_closest_marker("device"):
        metafunc.parametrize("device", devices())

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


@pytest.fixture
def llm(tiny_model):
    """``llm(arch) -> PrefixLM``: a tiny frozen LLM (hidden size 48) as the methods wrap it."""
    from mend.core.backbones import load_model, load_tokenizer
    from mend.core.prefix_lm import PrefixLM

    def make(arch: str = "llama") -> PrefixLM:
        path = tiny_model(arch, 48)
        return PrefixLM(load_model(path), load_tokenizer(path))
    return make
