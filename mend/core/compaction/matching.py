"""Attention Matching's fit (Zweiger et al. 2026, arXiv 2602.16284): given the kept keys, fit
what they hold so that attention to them matches attention to the whole context, on
reference queries, per layer and key/value head.

A query ``q`` that reads the compacted context and then other tokens attends to the context
block with a total weight (its *mass*, ``sum_j exp(q.k_j s)``) and gets from it an average of
values (its *output*). Matching both for the block, whatever else the query reads, matches
the whole attention. With ``t`` kept keys ``k_c``:

- **mass:** ``w >= 0`` minimises ``|| A w - 1 ||^2`` over the reference queries, with
  ``A[i, c] = exp(q_i.k_c s - log mass_i)`` (each query's mass normalised to 1, so the fit
  weighs every query alike): non-negative least squares (scipy's Lawson-Hanson). The bias
  ``beta_c = log w_c`` is added to the kept key's logit at query time
  (:mod:`mend.core.attention`);
- **values:** with ``P[i, c] = w_c A[i, c] / (A w)_i``, the biased attention over the kept
  keys, the values ``V'`` minimise ``|| P V' - O ||^2 + lam || V' - V_kept ||^2``, ``O`` the
  block's outputs and ``lam = ridge * trace(P^T P) / t`` (a small pull towards the kept
  keys' own values, relative to the data's scale): ridge least squares in closed form.

The reference queries are the repeat pass's: the model reading the context again after
itself (the paper's repeat-prefill), every query head of the key/value head's group. Both
fits are differentiable: the values through a linear solve, the bias by the implicit
gradient of the least squares on the active set scipy finds (exact at the solution). The
paper's on-policy refit (later layers' queries read after the earlier layers' compacted
caches) is not done: every layer is fitted on the full-context queries.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import nnls

from mend.core.compaction import Reading, grouped

TINY = 1e-12
"""The smallest weight a kept key keeps (its bias is then log(1e-12), about -27.6): NNLS may
give a key no weight at all."""


class AttentionMatching:
    def __init__(self, ridge: float = 1e-2):
        """
        Args:
            ridge: the values' pull towards the kept keys' own values, relative to
                ``trace(P^T P) / t``.
        """
        self.ridge = ridge

    def __call__(self, reading: Reading, index: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fitted ``(R, kv_heads, t, d)`` values and ``(R, kv_heads, t)`` float32 bias."""
        keys, values = reading.keys, reading.values
        kv_heads, t = keys.shape[1], index.shape[-1]
        queries, real = grouped(reading.ref_queries, kv_heads, reading.ref_mask)
        real = real.to(torch.float64).unsqueeze(-1)  # (R, 1, N, 1): padding queries weigh 0
        logits = (queries.double() @ keys.double().transpose(-1, -2)) * reading.scaling
        logits = logits.masked_fill(~reading.mask.bool()[:, None, None], float("-inf"))
        log_mass = torch.logsumexp(logits, -1, keepdim=True)  # (R, kvh, N, 1)
        outputs = (logits - log_mass).exp() @ values.double()  # (R, kvh, N, d)
        kept = logits.gather(-1, index[:, :, None, :].expand(-1, -1, logits.shape[2], -1))
        a = (kept - log_mass).exp() * real  # (R, kvh, N, t); padding slots: exp(-inf) = 0
        w = _nnls(a, real.expand_as(log_mass).squeeze(-1))  # (R, kvh, t)
        scores = a * w.unsqueeze(-2)
        p = scores / scores.sum(-1, keepdim=True).clamp_min(TINY)
        gram = p.transpose(-1, -2) @ p  # (R, kvh, t, t)
        lam = self.ridge * gram.diagonal(dim1=-2, dim2=-1).sum(-1) / t
        eye = torch.eye(t, dtype=gram.dtype, device=gram.device)
        own = values.double().gather(2, index.unsqueeze(-1).expand(-1, -1, -1, values.shape[-1]))
        lam = lam.clamp_min(TINY)[..., None, None]
        fitted = torch.linalg.solve(gram + lam * eye, p.transpose(-1, -2) @ outputs + lam * own)
        return fitted.to(values.dtype), w.clamp_min(TINY).log().float()


def _nnls(a: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``argmin_{w >= 0} || a w - target ||`` for each of the batch's ``(N, t)`` problems:
    ``(..., N, t)``, ``(..., N)`` -> ``(..., t)``, float64.

    scipy solves each problem (Lawson-Hanson); the value returned is its solution, and the
    gradient is that of the unconstrained least squares on its active set (the positive
    weights), which equals it there: ``w_A = (a_A^T a_A)^-1 a_A^T target``.
    """
    flat_a = a.detach().reshape(-1, *a.shape[-2:]).cpu().numpy()
    flat_t = target.detach().reshape(-1, target.shape[-1]).cpu().numpy()
    solved = np.stack([nnls(m, y)[0] for m, y in zip(flat_a, flat_t)])
    w = torch.from_numpy(solved).to(a).reshape(*a.shape[:-2], a.shape[-1])
    if not (a.requires_grad or target.requires_grad):
        return w
    active = (w > 0).to(a.dtype)
    gram = a.transpose(-1, -2) @ a
    scale = gram.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None].clamp_min(TINY)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    # The active block of the normal equations, the identity on the inactive keys (weight 0).
    system = gram * active[..., :, None] * active[..., None, :] + eye * (1 - active[..., None, :])
    system = system + 1e-10 * scale * eye
    rhs = (a.transpose(-1, -2) @ target.unsqueeze(-1)).squeeze(-1) * active
    implicit = torch.linalg.solve(system, rhs)
    return w + implicit - implicit.detach()
