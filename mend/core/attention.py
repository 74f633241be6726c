"""mend's attention kernel: transformers' own ``sdpa``, plus the two things compaction needs
from attention that no shipped kernel offers.

- **A bias on a cache's first keys** (``key_bias``): per layer, ``(B, kv_heads, P)`` added
  to the logits of keys ``0..P-1``, the same for every query head that shares a key/value
  head. Attention Matching's fitted ``beta`` (:mod:`mend.core.compaction.matching`) is
  such a bias: it lets 17 kept keys carry the attention mass of the hundreds they replace.
- **A tap on every layer** (``layer_tap``): ``tap(layer, query, key, value, scaling)`` is
  called by each attention layer before it attends, with the post-rotary ``(B, heads, T, d)``
  queries and the ``(B, kv_heads, K, d)`` keys and values it attends over (a cache's
  included). The compactions score and fit from what it hands them
  (:mod:`mend.core.compaction`), without ``output_attentions`` or the eager kernel.
- **A gated second mask for the last queries** (``reopen``): ``(wide, gates)``, a boolean
  ``(B, 1, T', K)`` mask for the last ``T'`` queries and, per layer, ``(heads,)`` gates. Those
  queries attend under both masks and take ``out + gate * (out_wide - out)``. With the gates
  at zero the pass is the one the model's own mask gives, exactly, and the gates still get
  a gradient: a distiller's seeded placeholders (:mod:`mend.core.seeding`) start as the
  tokens they copy and learn to read further.

All three are keyword arguments of the model's forward, which transformers hands every attention
layer unchanged (for ``generate``, which refuses keywords it does not know, :func:`biased`
sets the bias for a block). The kernel is registered once, as :data:`NAME`, through
transformers' public ``AttentionInterface`` and ``AttentionMaskInterface`` (the mask is
sdpa's, always built, so a bias has a mask to join); :func:`kernel` switches a model to it for
a pass::

    with attention.kernel(model):
        model(input_ids=ids, past_key_values=cache, key_bias=bias)

It then attends as the model's own kernel did: with ``eager`` (faster than sdpa for the
short sequences of a CPU step) by the plain formula, with anything else by sdpa.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Sequence

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

NAME = "mend"
"""The kernel's name in transformers' registries (``model.set_attn_implementation(NAME)``)."""

_INNER = contextvars.ContextVar("mend_attention_inner", default="sdpa")
"""The kernel the model ran before :func:`kernel` switched it (``eager``, or sdpa)."""

_BIAS: contextvars.ContextVar = contextvars.ContextVar("mend_key_bias", default=None)
"""A key bias set by :func:`biased`, for passes whose caller cannot hand it as a keyword."""

Tap = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, float], None]
"""``tap(layer, query (B, heads, T, d), key (B, kv_heads, K, d), value, scaling)``."""


def _attend(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            attention_mask: torch.Tensor | None, scaling: float | None = None,
            key_bias: Sequence[torch.Tensor | None] | None = None,
            layer_tap: Tap | None = None,
            reopen: tuple[torch.Tensor, Sequence[torch.Tensor]] | None = None, **kwargs):
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if layer_tap is not None:
        layer_tap(module.layer_idx, query, key, value, scaling)
    key_bias = _BIAS.get() if key_bias is None else key_bias
    bias = None if key_bias is None else key_bias[module.layer_idx]
    if bias is not None:
        attention_mask = biased_mask(attention_mask, bias, query, key)
    out, weights = _inner(module, query, key, value, attention_mask, scaling, **kwargs)
    if reopen is None:
        return out, weights
    wide, gates = reopen
    t = wide.shape[2]
    more, _ = _inner(module, query[:, :, -t:], key, value, wide, scaling, **kwargs)
    gate = gates[module.layer_idx].to(out.dtype)[:, None]  # (heads, 1), out is (B, T, heads, d)
    tail = out[:, -t:]
    return torch.cat([out[:, :-t], tail + gate * (more - tail)], 1), weights


def _inner(module, query, key, value, mask, scaling: float, **kwargs):
    """The model's own kernel: ``(B, T, heads, d)`` outputs and the weights (or None)."""
    if _INNER.get() == "eager":
        return _eager(query, key, value, mask, scaling)
    return AttentionInterface()["sdpa"](module, query, key, value, mask, scaling=scaling,
                                        **kwargs)


def _eager(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           mask: torch.Tensor | None, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention by its formula, as transformers' eager kernels compute it (the softmax in
    float32): ``(B, T, heads, d)`` outputs and the weights."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    logits = query @ key.transpose(2, 3) * scaling
    if mask is not None:
        logits = (logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
                  if mask.dtype == torch.bool else logits + mask)
    weights = logits.softmax(-1, dtype=torch.float32).to(query.dtype)
    return (weights @ value).transpose(1, 2).contiguous(), weights


def biased_mask(mask: torch.Tensor | None, bias: torch.Tensor, query: torch.Tensor,
                key: torch.Tensor) -> torch.Tensor:
    """An additive ``(B, heads, T, K)`` mask: ``bias`` on the first ``P`` keys where ``mask``
    lets a query attend, 0 on the other keys it may attend, the dtype's minimum elsewhere.

    Args:
        mask: ``(B, 1, T, K)`` boolean, True where a query attends (sdpa's); None: causal,
            the queries being the last ``T`` of the ``K`` positions.
        bias: ``(B, kv_heads, P)``, ``P <= K``.
        query: ``(B, heads, T, d)``; key: ``(B, kv_heads, K, d)``.
    """
    b, heads, t = query.shape[:3]
    k = key.shape[2]
    if mask is None:
        mask = (torch.arange(k, device=key.device)[None, :]
                <= torch.arange(t, device=key.device)[:, None] + (k - t))[None, None]
    elif mask.dtype != torch.bool:  # an additive mask already: 0 where attended
        mask = mask == 0
    # Query head h shares key/value head h // groups, as transformers' repeat_kv lays them out.
    full = bias.new_zeros(b, heads, 1, k)
    full[..., :bias.shape[-1]] = bias.repeat_interleave(heads // bias.shape[1], 1)[:, :, None]
    return torch.where(mask, full.to(query.dtype), torch.finfo(query.dtype).min)


def _mask(*args, **kwargs):
    """sdpa's boolean mask, always built: sdpa may skip it for a causal pass, but a bias needs
    it to add to."""
    kwargs["allow_is_causal_skip"] = False
    return AttentionMaskInterface()["sdpa"](*args, **kwargs)


AttentionInterface.register(NAME, _attend)
AttentionMaskInterface.register(NAME, _mask)


@contextlib.contextmanager
def biased(model, key_bias: Sequence[torch.Tensor]):
    """Run ``model`` on :data:`NAME` inside the block with ``key_bias`` on every pass, for
    callers that cannot hand it as a keyword (transformers' ``generate`` refuses keywords it
    does not know)."""
    token = _BIAS.set(list(key_bias))
    try:
        with kernel(model):
            yield
    finally:
        _BIAS.reset(token)


@contextlib.contextmanager
def kernel(model):
    """Run ``model`` (a transformers model, or its body) on :data:`NAME` inside the block;
    its own kernel is restored after."""
    before = model.config._attn_implementation
    if before == NAME:
        yield
        return
    model.set_attn_implementation(NAME)
    token = _INNER.set("eager" if before == "eager" else "sdpa")
    try:
        yield
    finally:
        _INNER.reset(token)
        model.set_attn_implementation(before)
