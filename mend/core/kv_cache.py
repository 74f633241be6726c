"""A head the LLM continues from: the KV cache of ``[bos | prefix]``, however it was made.

Two makers, one type (:class:`Prefill`):

- the LLM itself reads ``[bos | prefix]`` once (:meth:`mend.core.prefix_lm.PrefixLM.prefill`);
  its own cache object is kept, and positions continue after the head;
- a distiller with ``output: kv`` (Gisting-style prefix) hands over the keys and values it
  computed at bos and at its placeholders, layer by layer, as ``(keys, values)`` tensors.
  They keep the positions they were computed at (bos at 0, the placeholders after the
  demonstrations), so the LLM's input continues from the distiller's last position
  (``offset``) and rotary attention sees the distances the distiller saw. They may carry
  gradients (training), so they are never deep-copied: reading after them builds a fresh
  cache from the selected rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from mend.errors import InputError

Layers = list[tuple[torch.Tensor, torch.Tensor]]
"""Per layer, keys and values ``(R, kv_heads, H, head_dim)``."""


@dataclass
class Prefill:
    """``[bos | prefix]`` already read, for ``R`` rows; continue from it to serve any number of
    queries without reading the prefix again."""

    cache: object
    """The LLM's own cache object (batch R), or :data:`Layers` tensors from a distiller."""
    mask: torch.Tensor
    """``(R, H)``, 1 on real head positions (left-padded)."""
    last: torch.Tensor
    """``(R, d)`` final hidden state at the last head position (it predicts the first input
    token)."""
    offset: torch.Tensor | None = None
    """``(R,)`` position id of the first token read after the head; None: ``mask.sum(-1)``,
    right after a head the LLM read at positions ``0..H-1``."""
    bias: list[torch.Tensor] | None = None
    """Per layer, ``(R, kv_heads, H)`` float32 added to the logits of the head's keys when
    a query attends to them (Attention Matching's fitted bias,
    :mod:`mend.core.compaction.matching`); None: no bias. It is part of the context's
    memory."""

    def __len__(self) -> int:
        return self.mask.shape[0]

    @property
    def from_distiller(self) -> bool:
        return isinstance(self.cache, list)

    def positions(self, index: torch.Tensor) -> torch.Tensor:
        """``(n, 1)`` position of the first input token of rows ``index``."""
        start = self.mask.sum(-1) if self.offset is None else self.offset
        return start.index_select(0, index.to(start.device)).unsqueeze(1)


def select_rows(head: Prefill, index: torch.Tensor) -> Prefill:
    """Rows ``index`` of a distiller's prefill (differentiable)."""
    if not head.from_distiller:
        raise InputError("Only a distiller's key/value prefix can be sliced by rows.")
    index = index.to(head.mask.device)
    return Prefill([(k.index_select(0, index), v.index_select(0, index)) for k, v in head.cache],
                   head.mask.index_select(0, index), head.last.index_select(0, index),
                   None if head.offset is None else head.offset.index_select(0, index),
                   bias_rows(head, index))


def bias_rows(head: Prefill, index: torch.Tensor) -> list[torch.Tensor] | None:
    """Rows ``index`` of a prefill's key bias (None when it has none)."""
    if head.bias is None:
        return None
    return [b.index_select(0, index.to(b.device)) for b in head.bias]


def cat_rows(heads: Sequence[Prefill]) -> Prefill:
    """Distiller prefills of the same width, stacked row-wise."""
    if len(heads) == 1:
        return heads[0]
    layers = [(torch.cat([h.cache[i][0] for h in heads]), torch.cat([h.cache[i][1]
                                                                      for h in heads]))
              for i in range(len(heads[0].cache))]
    bias = None if heads[0].bias is None else [torch.cat(b) for b in zip(*(h.bias
                                                                           for h in heads))]
    return Prefill(layers, torch.cat([h.mask for h in heads]), torch.cat([h.last for h in heads]),
                   torch.cat([h.offset for h in heads]), bias)


def fresh_cache(head: Prefill, index: torch.Tensor, config) -> object:
    """A new transformers cache holding rows ``index`` of a distiller's prefill, for one
    forward pass to append to (built through ``update`` so sliding-window layers stay right)."""
    cache = DynamicCache(config=config)
    index = index.to(head.mask.device)
    for i, (k, v) in enumerate(head.cache):
        cache.update(k.index_select(0, index), v.index_select(0, index), i)
    return cache


def cast(head: Prefill, dtype: torch.dtype) -> Prefill:
    """A distiller's prefill with its keys, values and last state in ``dtype`` (the LLM's);
    the bias stays float32."""
    return Prefill([(k.to(dtype), v.to(dtype)) for k, v in head.cache], head.mask,
                   head.last.to(dtype), head.offset, head.bias)


def shapes(config) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of a transformers model config."""
    config = getattr(config, "text_config", config)
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv, dim


def from_distiller(cache, mask: torch.Tensor, last: torch.Tensor, num_placeholders: int,
                   dtype) -> Prefill:
    """The distiller's cache of a left-padded ``[pad.. bos demos | placeholders]`` batch as a
    prefix: each layer's keys and values at bos (where the tokenizer puts one) and at the
    placeholders, and the position after the row's last token as ``offset``.

    Args:
        cache: the distiller's transformers cache of the whole batch.
        mask: ``(B, S)`` the distiller's attention mask (placeholders included).
        last: ``(B, d)`` its final hidden state at the last placeholder.
        num_placeholders: the paper's l, the batch's last columns.
    """
    width = mask.shape[1]
    first = mask.argmax(-1)  # the first real column: bos when there is one
    cols = torch.arange(width - num_placeholders, width, device=mask.device).expand(
        mask.shape[0], -1)
    cols = torch.cat([first.unsqueeze(1), cols], 1)
    layers = []
    for layer in cache.layers:
        k, v = layer.keys, layer.values  # (B, kv_heads, S, head_dim)
        pick = cols[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])
        layers.append((k.gather(2, pick).to(dtype), v.gather(2, pick).to(dtype)))
    return Prefill(layers, torch.ones_like(cols), last.to(dtype), mask.sum(-1))
