"""The two small protocols every method in mend implements.

**Evaluation** (:class:`Method`): a method turns demonstration sets into a *prefix* for the
frozen LLM. The harness does everything else the same way for every method: it builds the
contexts, reads the queries after the prefix and scores the options (see
:mod:`mend.evaluation.harness`).

- zero-shot: no prefix, and the query is read with no separator in front;
- ICL: the embeddings of the demonstrations' LLM tokens;
- MEND and HyperTuning: the vectors a distiller makes of the demonstrations' text;
- prompt tuning: the same learned vectors whatever the demonstrations.

**Training** (:class:`Trainable`): a method that learns offers the module to optimise, a
collator from :class:`~mend.data.Example` lists to tensors, a loss, and a way to save itself.
:func:`mend.training.loop.train` runs any of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from mend.core.config import SEP, FrozenLLM
from mend.core.kv_cache import Prefill
from mend.core.prefix_lm import PrefixLM
from mend.core.text import DemoFormat
from mend.counters import Counters
from mend.data import Example

Prefix = tuple[torch.Tensor | None, torch.Tensor | None] | Prefill
"""``(B, P, d)`` prefix embeddings and their ``(B, P)`` mask (None: all real), or no prefix;
or a key/value prefix of ``B`` rows the LLM continues from (MEND with ``output: kv``)."""


class LLMOnly:
    """A method whose only model is the frozen LLM a config names (zero-shot, ICL)."""

    def __init__(self, llm: PrefixLM, fmt: DemoFormat):
        self.llm, self.format = llm, fmt

    @classmethod
    def load(cls, cfg, device=None, llm: PrefixLM | None = None):
        """``cfg``: a :class:`~mend.methods.MethodConfig` naming ``llm`` and the separators;
        ``llm``: that LLM already loaded, to share it with other methods (the demo's)."""
        fmt = DemoFormat(cfg.io_sep if cfg.io_sep is not None else SEP,
                         cfg.demo_sep if cfg.demo_sep is not None else SEP)
        return cls(llm or PrefixLM.load(FrozenLLM.of(cfg), device), fmt)


def prefix_kwargs(prefix: Prefix) -> dict[str, Any]:
    """A method's prefix as the keyword arguments of :meth:`PrefixLM.score_pairs`."""
    if isinstance(prefix, Prefill):
        return {"prefill": prefix}
    return {"prefix": prefix[0], "prefix_mask": prefix[1]}


def prefix_positions(prefix: Prefix, bos: Sequence[int]) -> list[int]:
    """The positions each prefix row holds in front of the queries, bos included: the
    memory a method's context costs the LLM (the compression ratio's denominator)."""
    if isinstance(prefix, Prefill):
        return prefix.mask.sum(-1).tolist()
    embeds, mask = prefix
    if embeds is None:
        return [len(bos)]
    real = (mask.sum(-1).tolist() if mask is not None else [embeds.shape[1]] * embeds.shape[0])
    return [len(bos) + n for n in real]


class Method(Protocol):
    name: str
    llm: PrefixLM
    format: DemoFormat
    reads_context: bool
    """False for zero-shot: the query is then read with no ``demo_sep`` in front."""
    reads_demos: bool
    """False when the prefix is the same whatever the demonstrations (zero-shot, prompt
    tuning): the harness then makes one prefix for every query and reuses its KV cache."""

    def prefix(self, demo_sets: Sequence[Sequence[tuple[str, str]]],
               contexts: Sequence[Sequence[int]]) -> Prefix:
        """One prefix row per demonstration set; ``contexts`` are the same sets in LLM ids."""


class Trainable(Protocol):
    module: nn.Module
    """What the optimizer trains (and DDP wraps); never the frozen LLM."""
    counters: Counters

    def collate(self, examples: Sequence[Example]) -> dict[str, Any]:
        """Examples -> a batch of tensors on the module's device."""

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``{"loss": scalar to minimise, other scalars to log}``; ``model`` is ``module`` as
        prepared by accelerate (call it, not ``module``, so DDP syncs gradients)."""

    def save_pretrained(self, path: str | Path) -> None:
        """Write a checkpoint that ``from_pretrained`` loads."""
