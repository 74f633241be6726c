"""KVzip's query-agnostic score (Kim et al. 2025): after the context, the model reads
:data:`~mend.core.compaction.REPEAT` and the context again, teacher-forced; a position's score
is the most attention any query of that repeat pass pays it, over the repeat's tokens and
the query heads that share its key/value head. The positions the model needs to reconstruct
the context score high, whatever question comes later. The softmax runs over everything a
repeat query sees: the context and the repeat up to itself.
"""

from __future__ import annotations

import torch

from mend.core.compaction import Reading, grouped


class KVzip:
    needs_repeat = True

    def __call__(self, reading: Reading) -> torch.Tensor:
        """``(R, kv_heads, S)``: the largest attention weight each position gets in the
        repeat pass."""
        kv_heads, s = reading.keys.shape[1:3]
        q = reading.ref_queries.shape[2]
        queries, real = grouped(reading.ref_queries, kv_heads, reading.ref_mask)
        queries = queries.float()
        to_context = (queries @ reading.keys.float().transpose(-1, -2)) * reading.scaling
        to_context = to_context.masked_fill(~reading.mask.bool()[:, None, None], float("-inf"))
        to_self = (queries @ reading.ref_keys.float().transpose(-1, -2)) * reading.scaling
        causal = torch.ones(q, q, dtype=torch.bool, device=queries.device).tril()
        seen = causal.repeat(reading.groups, 1)[None, None] & reading.ref_mask.bool()[:, None,
                                                                                     None]
        to_self = to_self.masked_fill(~seen, float("-inf"))
        norm = torch.logsumexp(torch.cat([to_context, to_self], -1), -1, keepdim=True)
        weights = (to_context - norm).exp() * real[..., None]  # padding queries pay nothing
        return weights.amax(2)
