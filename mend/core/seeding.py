"""Placeholders seeded from the demonstrations' own tokens (``seeded_placeholders: m`` with
``output: kv``), one of the warm start's ways (``docs/results/warm-cpu/ablation.md``).

The distiller first reads the demonstrations and their repeat pass and picks the ``m`` tokens
KVzip scores highest (:class:`~mend.core.compaction.kvzip.KVzip`, averaged over layers and
key/value heads: one choice per token, since a placeholder is one input for every layer).
Averaged so, the attention cut's score piles onto the first tokens (more of its window's
queries see them) and, divided by the queries that see each token, onto the last; KVzip's
spreads over every demonstration. Then it reads the demonstrations again followed by the
``l`` placeholders::

    [pad.. bos demos | m seeded placeholders | l - m learned placeholders]

- seeded placeholder ``i`` is a copy of token ``p_i``: its embedding, its position id, and a
  mask that lets it see what the token saw (the demonstrations before ``p_i``) and itself. So
  with the LoRA at zero its keys and values at every layer *are* the token's, and the prefix
  is the LLM's own cache of the demonstrations cut to bos and those ``m`` tokens;
- it is free to read further once trained: under a second, wide mask (every demonstration
  token) it attends again, and per layer and head a gate, zero at the start, blends the two
  (:mod:`mend.core.attention`'s ``reopen``);
- the ``l - m`` learned placeholders (the mix) are MEND's own, read everything before them,
  and sit after the demonstrations, as ``output: kv`` places them.

Selection is a top-k, so it passes no gradient; what trains is the LoRA (what a kept token
holds) and the gates (how far it reads).
"""

from __future__ import annotations

import torch
from torch import nn

from mend.core import compaction as compactions
from mend.core.compaction.kvzip import KVzip
from mend.core.text import positions


class Gates(nn.Module):
    """Per layer and query head, how far a seeded placeholder reads past its token: 0 is not
    at all (the start), 1 is the wide mask's attention alone. ``()`` gives them ``(layers,
    heads)``."""

    GAIN = 20.0
    """The gates are ``GAIN * weight``. Adam moves every weight by about the learning rate a
    step, which is the right size for LoRA but would take a gate thousands of steps to open:
    trained at the warm start's 2e-4 for 240 steps, ungained gates stayed within 0.025 of
    zero. With the gain a gate can travel from 0 to 1 in a few hundred steps."""

    def __init__(self, layers: int, heads: int, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(layers, heads, device=device))

    def forward(self) -> torch.Tensor:
        return self.GAIN * self.weight


@torch.no_grad()
def pick(model, embeds: torch.Tensor, mask: torch.Tensor, width: int, m: int
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``m`` demonstration tokens KVzip scores highest, bos and padding never.

    Args:
        model: the distiller's body.
        embeds: ``(R, S + Q, d)``, the demonstrations left-padded and their repeat pass
            (:func:`mend.core.compaction.layout`); ``mask`` ``(R, S + Q)``; ``width``: ``S``.

    Returns:
        ``(R, m)`` column indices, ascending, and ``(R, m)`` booleans: False where a row has
        fewer than ``m`` such tokens (those slots hold a padding column and stay masked).
    """
    scorer, total = KVzip(), torch.zeros(mask.shape[0], width, device=mask.device)

    def each(layer: int, reading: compactions.Reading) -> None:
        total.add_(scorer(reading).float().mean(1))  # (R, S): every head counts the same

    compactions.read(model, embeds, mask, width, each)
    mask = mask[:, :width]
    first = mask.long().argmax(-1, keepdim=True)  # bos, which the prefix holds anyway
    total.masked_fill_(~mask.bool(), float("-inf")).scatter_(1, first, float("-inf"))
    top = total.topk(min(m, mask.shape[1]), dim=-1)
    index, order = top.indices.sort(-1)
    valid = top.values.gather(1, order) > float("-inf")
    short = m - index.shape[1]  # a batch narrower than m: column 0 fills the rest, masked
    return (torch.cat([index.new_zeros(len(index), short), index], 1),
            torch.cat([valid.new_zeros(len(index), short), valid], 1))


def layout(mask: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, learned: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The masks and position ids of ``[pad.. demos | m seeded | learned]``.

    Args:
        mask: ``(R, S)`` the demonstrations' mask, left-padded.
        index: ``(R, m)`` the seeded tokens' columns; ``valid``: ``(R, m)``.
        learned: ``l - m``.

    Returns:
        ``(R, 1, T, T)`` the boolean mask of the pass (``T = S + m + learned``), ``(R, 1, m,
        T)`` the seeded placeholders' wide mask, and ``(R, T)`` position ids.
    """
    r, s = mask.shape
    m, dev = index.shape[1], mask.device
    real = mask.bool()
    t = s + m + learned
    full = torch.zeros(r, t, t, dtype=torch.bool, device=dev)
    # Demonstrations: causal over real tokens; every row sees itself, so that a padding row's
    # softmax is never empty.
    cols = torch.arange(s, device=dev)
    full[:, :s, :s] = (cols[None, :] <= cols[:, None])[None] & real[:, None, :]
    full[:, torch.arange(t, device=dev), torch.arange(t, device=dev)] = True
    # Seeded placeholder i: what token p_i saw before it, and itself.
    seen = (cols[None, None, :] < index[:, :, None]) & real[:, None, :]  # (R, m, S)
    full[:, s:s + m, :s] = seen
    # Learned placeholders: every real token, every valid seeded one, the learned before them.
    full[:, s + m:, :s] = real[:, None, :]
    full[:, s + m:, s:s + m] = valid[:, None, :]
    full[:, s + m:, s + m:] = torch.ones(learned, learned, dtype=torch.bool, device=dev).tril()
    wide = full[:, s:s + m].clone()
    wide[:, :, :s] = real[:, None, :]
    pos = positions(mask)
    after = real.sum(-1, keepdim=True) + torch.arange(learned, device=dev)[None]
    return full[:, None], wide[:, None], torch.cat([pos, pos.gather(1, index), after], 1)
