"""A learned scorer (KV-Distill's way, arXiv 2503.10337): a small feed-forward network per
layer reads each context position's key and value and gives it a correction ``g``, in logit
units, for every key/value head. The compaction's own scorer still scores the positions; the
kept ones are the top of ``score * exp(g)``, and each kept key's logit at query time is raised
by its ``g`` (added to the fitted bias, where the compaction fits one).

Selection is a top-k, which passes no gradient; the bias does, as a router's gate does: the
network learns which kept keys the LLM should read more of, and the positions it raises also
rise in the ranking. Its last layer starts at zero, so before training ``g = 0`` everywhere:
the same positions, keys and values as the compaction alone (and a zero bias). KV-Distill's
scorer reads one middle layer's hidden states and picks one set of tokens for all layers;
this one picks per layer and key/value head, as every compaction here does, from what that
layer caches.
"""

from __future__ import annotations

import torch
from torch import nn

from mend.core.compaction import Reading


class LearnedScorer(nn.Module):
    def __init__(self, layers: int, head_dim: int, hidden: int = 32):
        """
        Args:
            layers: the model's layers, one network each.
            head_dim: the size of a key (and of a value).
            hidden: the width of each network's hidden layer.
        """
        super().__init__()
        self.nets = nn.ModuleList(
            nn.Sequential(nn.Linear(2 * head_dim, hidden), nn.GELU(), nn.Linear(hidden, 1))
            for _ in range(layers))
        for net in self.nets:
            nn.init.zeros_(net[-1].weight)
            nn.init.zeros_(net[-1].bias)

    def forward(self, layer: int, reading: Reading) -> torch.Tensor:
        """``(R, kv_heads, S)`` float32: the correction for every context position of
        ``layer`` (padding included; the caller masks it)."""
        net = self.nets[layer]
        dtype = net[0].weight.dtype
        states = torch.cat([reading.keys, reading.values], -1).to(dtype)  # (R, kvh, S, 2d)
        return net(states).squeeze(-1).float()
