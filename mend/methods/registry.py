"""Every method by name. A method's module registers it in one line::

    register_method("icl", load=ICL.load, needs="llm")

``method:`` in any config is checked against this registry. Which methods ``mend finetune``
trains, and with which recipe, is the recipes' own table (``mend.recipes.finetune.RECIPES``):
a method knows nothing of the jobs above it. Adding a method is its module plus a YAML file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from mend.errors import ConfigError


@dataclass(frozen=True)
class MethodSpec:
    name: str
    load: Callable[..., Any]
    """``load(cfg: MethodConfig, device) -> Method``: the models it needs, ready to score."""
    needs: Literal["llm", "checkpoint"]
    """What a config must name: a frozen ``llm`` (zero-shot, ICL) or a trained ``checkpoint``."""


_REGISTRY: dict[str, MethodSpec] = {}

# Baselines that are not prefix methods have their own commands (they were once methods).
BASELINES = {"pattern_icl": "mend nli icl", "pbft": "mend nli pbft",
             "context_distillation": "mend nli cd", "pattern_lm": "mend nli eval",
             "step_by_step": "mend sbs train (or mend sbs eval)"}


def register_method(name: str, *, load: Callable[..., Any], needs: Literal["llm", "checkpoint"]
                    ) -> None:
    if name in _REGISTRY:
        raise ValueError(f"method {name!r} is registered twice")
    _REGISTRY[name] = MethodSpec(name, load, needs)


def get_method(name: str) -> MethodSpec:
    if name in BASELINES:
        raise ConfigError(f"`{name}` is a baseline with its own command: {BASELINES[name]} "
                          f"--config FILE (and no `method:` key).")
    if name not in _REGISTRY:
        raise ConfigError(f"Unknown method `{name}`; choose from {', '.join(_REGISTRY)}.")
    return _REGISTRY[name]


def method_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)
