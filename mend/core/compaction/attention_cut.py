"""The attention cut (SnapKV's observation window; H2O's heavy hitters when the window covers
the whole context): a position's score is the attention the context's own last ``window``
tokens pay it, summed over those tokens and over the query heads that share its key/value
head, then smoothed over ``pool`` neighbouring positions. It needs no pass beyond reading the
context.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mend.core.compaction import Reading, grouped


class AttentionCut:
    needs_repeat = False

    def __init__(self, window: int = 32, pool: int = 5):
        """
        Args:
            window: the context's last tokens whose attention scores the positions.
            pool: width of the smoothing over neighbouring positions (odd; 1: none).
        """
        self.window, self.pool = window, pool

    def __call__(self, reading: Reading) -> torch.Tensor:
        """``(R, kv_heads, S)``: attention received from the last ``window`` real tokens."""
        keys, mask = reading.keys, reading.mask.bool()
        r, kv_heads, s, _ = keys.shape
        w = min(self.window, s)
        queries, _ = grouped(reading.queries[:, :, s - w:], kv_heads)  # (R, kvh, G * w, d)
        logits = (queries.float() @ keys.float().transpose(-1, -2)) * reading.scaling
        # Window query i sits at column s - w + i and sees columns up to it, and no padding.
        col, row = torch.arange(s, device=keys.device), torch.arange(s - w, s, device=keys.device)
        seen = (col[None, :] <= row[:, None]).repeat(reading.groups, 1)  # (G * w, S)
        seen = seen[None, None] & mask[:, None, None, :]
        weights = logits.masked_fill(~seen, float("-inf")).softmax(-1).nan_to_num(0.0)
        # A padding query (a row shorter than the window) pays no attention.
        real = mask[:, s - w:].repeat(1, reading.groups)[:, None, :, None]
        received = (weights * real).sum(2)  # (R, kv_heads, S)
        if self.pool > 1:
            received = F.avg_pool1d(received.reshape(r * kv_heads, 1, s), self.pool, stride=1,
                                    padding=self.pool // 2, count_include_pad=False
                                    ).view(r, kv_heads, s)
        return received
