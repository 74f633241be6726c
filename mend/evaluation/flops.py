"""FLOPs of attention, whichever kernel ``scaled_dot_product_attention`` dispatches to.

``torch.utils.flop_counter`` counts matmuls by their shapes, and attention by formulas it
registers for some SDPA kernels; its formula refuses shapes that mend's serving produces:
a query that continues from a KV cache shared by a batch (keys of batch 1 broadcast to 8
queries), and it knows nothing of the CPU's kernel, which it would count as 0 FLOPs. mend owns
one formula instead, registered for every kernel torch may pick (math decomposes into
matmuls, which the counter already counts):

    FLOPs = 2 * B * Hq * Lq * Lk * (E + Ev)        forward: Q K^T, then P V
    backward = 2 * forward                           dQ, dK from dS; dV, dP from dO

with ``B`` the broadcast batch, ``Hq`` the query heads (grouped-query attention shares each
key/value head among ``Hq / Hkv`` of them, and every query head still does its own matmuls),
``Lq`` the query length and ``Lk`` the key length (``Lq < Lk`` after a cache).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Shape = Sequence[int]

aten = torch.ops.aten


def attention_flops(query: Shape, key: Shape, value: Shape) -> int:
    """Forward FLOPs of ``softmax(Q K^T) V`` for ``(B, H, L, E)`` shapes.

    Args:
        query: ``(Bq, Hq, Lq, E)``.
        key: ``(Bk, Hkv, Lk, E)``; ``Bk`` 1 (a shared cache) or ``Bq``; ``Hkv`` divides ``Hq``.
        value: ``(Bv, Hkv, Lk, Ev)``.
    """
    bq, hq, lq, e = query
    bk, hk, lk, ek = key
    bv, hv, lv, ev = value
    batch = max(bq, bk, bv)
    if (e != ek or lk != lv or hk != hv or hq % hk or any(b not in (1, batch)
                                                          for b in (bq, bk, bv))):
        raise ValueError(f"attention shapes do not fit together: query {tuple(query)}, key "
                         f"{tuple(key)}, value {tuple(value)}")
    return 2 * batch * hq * lq * lk * (e + ev)


def _heads_first(fn: Callable[..., int], backward: bool) -> Callable[..., int]:
    """A formula for ops whose query, key, value are ``(B, H, L, E)``: args 0-2 forward, 1-3
    backward (after the output's gradient)."""
    start = 1 if backward else 0

    def formula(*args, out_shape=None, **kwargs) -> int:
        return (2 if backward else 1) * fn(*args[start:start + 3])
    return formula


def _length_first(fn: Callable[..., int], backward: bool) -> Callable[..., int]:
    """The same for ops that take ``(B, L, H, E)`` (the flash and memory-efficient kernels'
    own entry points)."""
    start = 1 if backward else 0

    def formula(*args, out_shape=None, **kwargs) -> int:
        q, k, v = ((s[0], s[2], s[1], s[3]) for s in args[start:start + 3])
        return (2 if backward else 1) * fn(q, k, v)
    return formula


HEADS_FIRST = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
               "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
               "_scaled_dot_product_fused_attention_overrideable")
LENGTH_FIRST = ("_flash_attention_forward", "_efficient_attention_forward")

FORMULAS: dict[object, Callable[..., int]] = {}
"""The counter's ``custom_mapping``: every SDPA kernel, forward and backward."""
for _name in HEADS_FIRST:
    FORMULAS[getattr(aten, _name)] = _heads_first(attention_flops, backward=False)
    FORMULAS[getattr(aten, _name + "_backward")] = _heads_first(attention_flops, backward=True)
for _name in LENGTH_FIRST:
    FORMULAS[getattr(aten, _name)] = _length_first(attention_flops, backward=False)
    FORMULAS[getattr(aten, _name.replace("_forward", "_backward"))] = _length_first(
        attention_flops, backward=True)
