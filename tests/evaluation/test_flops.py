"""Attention FLOPs by mend's own formula, for every SDPA kernel torch may dispatch to, on the
shapes serving produces: grouped-query heads, a query continuing from a cache, and a cache
shared by a batch."""

import pytest
import torch
import torch.nn.functional as F

from mend.evaluation.efficiency import count_flops
from mend.evaluation.flops import FORMULAS, HEADS_FIRST, LENGTH_FIRST, attention_flops

aten = torch.ops.aten

# (query, key, value) as (B, H, L, E), and the count by hand: 2 B Hq Lq Lk (E + Ev).
CASES = {
    "plain": ((2, 4, 6, 8), (2, 4, 6, 8), (2, 4, 6, 8), 2 * 2 * 4 * 6 * 6 * 16),
    "grouped-query heads": ((2, 9, 6, 8), (2, 3, 6, 8), (2, 3, 6, 8), 2 * 2 * 9 * 6 * 6 * 16),
    "continuing from a cache": ((2, 4, 3, 8), (2, 4, 20, 8), (2, 4, 20, 8),
                                2 * 2 * 4 * 3 * 20 * 16),
    "a cache shared by the batch": ((8, 9, 3, 8), (1, 3, 20, 8), (1, 3, 20, 8),
                                    2 * 8 * 9 * 3 * 20 * 16),
    "value of another width": ((1, 2, 3, 8), (1, 2, 5, 8), (1, 2, 5, 4), 2 * 2 * 3 * 5 * 12),
}


@pytest.mark.parametrize("case", CASES)
def test_every_kernel_counts_by_the_formula(case):
    q, k, v, expected = CASES[case]
    assert attention_flops(q, k, v) == expected
    for name in HEADS_FIRST:
        assert FORMULAS[getattr(aten, name)](q, k, v, out_shape=None) == expected
        grad = q[:3] + (v[3],)
        assert FORMULAS[getattr(aten, name + "_backward")](grad, q, k, v) == 2 * expected
    for name in LENGTH_FIRST:
        swap = [(s[0], s[2], s[1], s[3]) for s in (q, k, v)]
        assert FORMULAS[getattr(aten, name)](*swap, None) == expected
        backward = getattr(aten, name.replace("_forward", "_backward"))
        assert FORMULAS[backward](swap[0], *swap) == 2 * expected


def test_shapes_that_cannot_attend_are_an_error():
    with pytest.raises(ValueError, match="do not fit"):
        attention_flops((2, 4, 3, 8), (3, 4, 5, 8), (3, 4, 5, 8))  # batches 2 and 3
    with pytest.raises(ValueError, match="do not fit"):
        attention_flops((2, 4, 3, 8), (2, 3, 5, 8), (2, 3, 5, 8))  # 3 does not divide 4


def test_the_cpu_kernel_is_counted_for_grouped_and_cached_attention():
    q = torch.randn(4, 9, 3, 8)
    k = torch.randn(1, 3, 20, 8).expand(4, -1, -1, -1)  # one cache row, expanded
    _, flops = count_flops(lambda: F.scaled_dot_product_attention(q, k, k, enable_gqa=True))
    assert flops == 2 * 4 * 9 * 3 * 20 * 16
    q.requires_grad_()
    _, flops = count_flops(lambda: F.scaled_dot_product_attention(
        q, k, k, enable_gqa=True).sum().backward())
    assert flops >= 3 * 2 * 4 * 9 * 3 * 20 * 16  # forward, and backward at twice its cost
