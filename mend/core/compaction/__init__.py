"""Compaction: a context's KV cache cut to ``1 + l`` positions per layer and key/value head,
one short module per method behind one protocol (as kvpress has one press per method).

Every compaction is three steps, run on each layer as the model reads the context
(:func:`compact`):

1. **score** every context position per key/value head, query-agnostically: ``(R, kv_heads,
   S)`` (:mod:`.attention_cut`: the demonstrations' own last tokens' attention; :mod:`.kvzip`:
   the attention the positions get while the model reads the demonstrations again);
2. **select** the top ``1 + l`` (bos always kept; :func:`select`);
3. **fit**, optionally, what the kept positions hold (:mod:`.matching`: Attention Matching's
   bias per kept key and least-squares values), in closed form, so gradients pass through it.

A trained distiller may add a learned scorer (:mod:`.learned`), which corrects step 1's
scores and raises the kept keys' biases, starting from no correction at all.

Each named compaction (:data:`COMPACTIONS`) is one scorer and one fit. The training-free
:class:`~mend.core.kv_compress.KVCompressor` runs it on the LLM's own cache; a distiller with
``output: compacted`` runs the same code on its own keys and values (the LLM plus LoRA), so
that with its LoRA at zero the two are one and the same.

The scorers and fits that need it read a **repeat pass**: after the context, the model reads
:data:`REPEAT` and then the context's tokens again, teacher-forced, in the same forward pass
(KVzip's reconstruction; Attention Matching's repeat-prefill reference queries). It costs
about a second prefill, once per context.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from mend.core import attention
from mend.core.kv_cache import Prefill
from mend.core.text import DemoFormat, encode, pad, positions
from mend.errors import InputError

REPEAT = "Repeat the previous context."
"""The instruction read between the context and its repeat (KVzip's prompt)."""


@dataclass
class Reading:
    """One layer of the model reading a context (and its repeat), as the attention tap sees
    it. ``S`` context positions, left-padded (bos first), ``Q`` repeat positions after them,
    right-padded; keys and queries are post-rotary."""

    keys: torch.Tensor
    """``(R, kv_heads, S, d)``: the context's, what its cache holds."""
    values: torch.Tensor
    """``(R, kv_heads, S, d)``."""
    mask: torch.Tensor
    """``(R, S)``, 1 on real context positions."""
    queries: torch.Tensor
    """``(R, heads, S, d)``: the context's own queries."""
    scaling: float
    """The layer's softmax scale (``head_dim ** -0.5`` in most models)."""
    ref_queries: torch.Tensor | None = None
    """``(R, heads, Q, d)``: the repeat pass's queries (None without a repeat pass)."""
    ref_keys: torch.Tensor | None = None
    """``(R, kv_heads, Q, d)``: the repeat pass's own keys, which its queries attend too."""
    ref_mask: torch.Tensor | None = None
    """``(R, Q)``, 1 on real repeat positions."""

    @property
    def groups(self) -> int:
        """Query heads per key/value head."""
        return self.queries.shape[1] // self.keys.shape[1]


class Scorer(Protocol):
    needs_repeat: bool

    def __call__(self, reading: Reading) -> torch.Tensor:
        """``(R, kv_heads, S)`` scores, higher kept first (padding is masked by the caller)."""


class Fit(Protocol):
    def __call__(self, reading: Reading, index: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Values ``(R, kv_heads, keep, d)`` and a key bias ``(R, kv_heads, keep)`` (or None)
        for the kept positions ``index`` ``(R, kv_heads, keep)``."""


@dataclass(frozen=True)
class Compaction:
    """One scorer and, optionally, one fit, under one name."""

    name: str
    scorer: Scorer
    fit: Fit | None = None

    @property
    def needs_repeat(self) -> bool:
        return self.scorer.needs_repeat or self.fit is not None

    def __call__(self, reading: Reading, keep: int, correction: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One layer compacted: ``(index, keys, values, bias)``, ``index`` ``(R, kv_heads,
        keep)`` ascending, keys and values ``(R, kv_heads, keep, d)``, bias ``(R, kv_heads,
        keep)`` float32 or None.

        ``correction``: a learned scorer's ``(R, kv_heads, S)`` logit corrections
        (:mod:`.learned`): the positions kept are the top of ``score * exp(correction)``, and
        each kept key's bias is raised by its correction (differentiably)."""
        with torch.no_grad():
            scores = self.scorer(reading)
            if correction is not None:
                scores = scores.float() * correction.detach().exp()
            index = select(scores, reading.mask, keep)
        keys, values = gather(reading.keys, index), gather(reading.values, index)
        bias = None
        if self.fit is not None:
            values, bias = self.fit(reading, index)
        if correction is not None:
            raised = correction.gather(2, index)
            bias = raised if bias is None else bias + raised
        return index, keys, values, bias


def select(scores: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` best positions of each key/value head, in ascending order: padding never
    before a real position, the first real position (bos, the attention sink) always.

    Args:
        scores: ``(R, kv_heads, S)``.
        mask: ``(R, S)``, left-padded, 1 on real positions.

    Returns:
        ``(R, kv_heads, min(keep, S))`` indices. A row with fewer real positions than
        ``keep`` keeps them all and pads with its padding columns, which come first, so every
        head of a row holds its padding in the same slots.
    """
    kv_heads, s = scores.shape[1:]
    scores = scores.float().masked_fill(~mask.bool()[:, None], float("-inf"))
    first = mask.long().argmax(-1)  # bos, or the first token where the model has none
    scores.scatter_(2, first[:, None, None].expand(-1, kv_heads, 1), float("inf"))
    return scores.topk(min(keep, s), dim=-1).indices.sort(-1).values


def gather(states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``(R, kv_heads, S, d)`` states at ``index`` ``(R, kv_heads, keep)``."""
    return states.gather(2, index.unsqueeze(-1).expand(-1, -1, -1, states.shape[-1]))


def grouped(queries: torch.Tensor, kv_heads: int, mask: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(R, heads, T, d)`` queries as ``(R, kv_heads, groups * T, d)``, each key/value head
    with the queries of every head that shares it (and the ``(R, T)`` mask to match)."""
    r, heads, t, d = queries.shape
    out = queries.reshape(r, kv_heads, heads // kv_heads * t, d)
    if mask is None:
        return out, None
    return out, mask[:, None, :].expand(r, heads // kv_heads, t).reshape(r, 1, -1)


# --------------------------------------------------------------------------------------------
# Reading a context and compacting it, layer by layer


def prompt_ids(tokenizer, fmt: DemoFormat) -> list[int]:
    """The ids the repeat pass reads between the context and its repeat: :data:`REPEAT`
    between two demonstration separators."""
    return encode(tokenizer, [fmt.demo_sep + REPEAT + fmt.demo_sep])[0]


def layout(contexts: Sequence[Sequence[int]], skip: int, prompt: Sequence[int] | None,
           pad_id: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The rows :func:`compact` reads: each context left-padded (``S`` columns), then, with a
    ``prompt``, the prompt and the context again without its first ``skip`` ids (its bos),
    right-padded.

    Returns:
        ``(R, S + Q)`` ids, their mask, and ``S``.
    """
    ids, mask = pad(contexts, pad_id, side="left")
    if prompt is None:
        return ids, mask, ids.shape[1]
    again, again_mask = pad([list(prompt) + list(c[skip:]) for c in contexts], pad_id)
    return torch.cat([ids, again], 1), torch.cat([mask, again_mask], 1), ids.shape[1]


def compact(model, embeds: torch.Tensor, mask: torch.Tensor, width: int,
            compaction: Compaction, keep: int,
            learned: Callable[[int, Reading], torch.Tensor] | None = None) -> Prefill:
    """Read ``[pad.. context | repeat pad..]`` once with ``model`` (a transformers body) and
    cut every layer's context cache to ``keep`` positions per key/value head.

    Args:
        embeds: ``(R, S + Q, d)`` input embeddings: the context left-padded to ``width``
            columns (``S``), then its repeat pass right-padded (``Q = 0`` when the compaction
            needs none).
        mask: ``(R, S + Q)``, 1 on real tokens.
        width: ``S``.
        learned: a learned scorer (:class:`.learned.LearnedScorer`): ``(layer, reading)`` to
            that layer's ``(R, kv_heads, S)`` corrections of the compaction's scores.

    Returns:
        A key/value prefix of ``R`` rows: per layer ``(R, kv_heads, keep, d)`` keys and values
        (differentiable where ``model`` is), the kept positions' mask, the hidden state at the
        context's last position, the position after it as the offset, and the fitted bias.
    """
    if mask.shape[1] > width and not compaction.needs_repeat:
        raise InputError(f"compaction {compaction.name} reads no repeat pass.")
    kept: dict[int, tuple] = {}

    def each(layer: int, reading: Reading) -> None:
        kept[layer] = compaction(reading, keep,
                                 None if learned is None else learned(layer, reading))

    hidden = read(model, embeds, mask, width, each)
    ctx_mask = mask[:, :width]
    layers = [kept[i] for i in range(len(kept))]
    index = layers[0][0]
    bias = [b for *_, b in layers] if layers[0][3] is not None else None
    return Prefill([(k, v) for _, k, v, _ in layers], ctx_mask.gather(1, index[:, 0]),
                   hidden[:, width - 1], ctx_mask.sum(-1), bias=bias)


def read(model, embeds: torch.Tensor, mask: torch.Tensor, width: int,
         each: Callable[[int, Reading], None]) -> torch.Tensor:
    """Read ``[pad.. context | repeat pad..]`` once with ``model`` and hand every layer's
    :class:`Reading` to ``each(layer, reading)`` as the model reads it.

    Args:
        embeds: ``(R, S + Q, d)``, as :func:`compact` takes them; ``mask`` ``(R, S + Q)``.
        width: ``S``.

    Returns:
        ``(R, S + Q, d)``: the model's last hidden states.
    """
    ctx_mask = mask[:, :width]

    def tap(layer: int, query, key, value, scaling: float) -> None:
        reading = Reading(key[:, :, :width], value[:, :, :width], ctx_mask,
                          query[:, :, :width], scaling)
        if mask.shape[1] > width:
            reading.ref_queries, reading.ref_keys = query[:, :, width:], key[:, :, width:]
            reading.ref_mask = mask[:, width:]
        each(layer, reading)

    with attention.kernel(model):
        out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions(mask),
                    use_cache=False, layer_tap=tap)
    return out.last_hidden_state


# The named compactions, in the order tables list them.
from mend.core.compaction.attention_cut import AttentionCut  # noqa: E402
from mend.core.compaction.kvzip import KVzip  # noqa: E402
from mend.core.compaction.matching import AttentionMatching  # noqa: E402

COMPACTIONS: dict[str, Compaction] = {c.name: c for c in (
    Compaction("attention_cut", AttentionCut()),
    Compaction("kvzip", KVzip()),
    Compaction("attention_matching", AttentionCut(), AttentionMatching()),
    Compaction("kvzip_matching", KVzip(), AttentionMatching()),
)}
"""``attention_cut``: SnapKV's cut, mend's first training-free baseline; ``kvzip``: KVzip's
query-agnostic cut; ``attention_matching``: the attention cut's keys with Attention
Matching's fit; ``kvzip_matching``: KVzip's keys with the same fit."""


def get(name: str) -> Compaction:
    if name not in COMPACTIONS:
        raise InputError(f"Unknown compaction `{name}`; choose from {', '.join(COMPACTIONS)}.")
    return COMPACTIONS[name]
