"""Training objectives as pure functions of aligned logits, targets and masks.

Alignment convention: ``logits[:, t]`` is the distribution that predicts ``targets[:, t]``.
``PrefixLM.logits(..., with_prefix_last=True)[:, :-1]`` gives exactly that for the input ids,
so the first input token is predicted from the last prefix position.

Masked-out positions are dropped *before* any softmax, so no full-vocabulary log-probs are
ever formed for positions that do not count.

- ``L_distill`` = :func:`kl_distill` at the input positions (MEND meta-distillation).
- ``L_pred``    = :func:`ce_loss` with the mask on output tokens.
- CLM           = :func:`ce_loss` with the mask on every input token (HyperTuning).
- ``L_pred + lambda * L_distill`` (and ``CLM + gamma * L_distill``): the weighted sum
  :class:`~mend.methods.mend.MendObjective` forms from these terms.

:func:`chunked_kl_distill` and :func:`chunked_ce` take final hidden states and the LLM's
projection instead of logits. They give the same values and gradients while forming float32
logits for at most ``chunk`` positions at a time, recomputed in backward (activation
checkpointing) where there is more than one chunk, so training memory does not grow with
``positions x vocabulary``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _select(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``(B, T, ...)`` -> ``(N, ...)``: the rows where ``mask`` is true (all when None)."""
    if mask is None:
        return x.reshape(-1, *x.shape[2:])
    return x[mask.to(x.device).bool()]


def kl_distill(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               mask: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) between next-token distributions, the MEND distillation loss.

    - **Direction:** forward KL with the teacher as target,
      ``sum_v p_T(v) * (log p_T(v) - log p_S(v))``; it is zero iff the two agree.
    - **Temperature:** both logits are divided by ``tau`` before the softmax, and the result is
      multiplied by ``tau**2`` (Hinton et al., 2015) so gradient scale does not shrink with
      ``tau``. ``tau = 1`` is the plain KL.
    - **Normalisation:** summed over the vocabulary, then averaged over the positions where
      ``mask`` is 1, across the whole batch (a token-level mean, not a mean of per-row means).
      No position counted gives 0.

    Args:
        student_logits: ``(B, T, V)``; carries the gradient.
        teacher_logits: ``(B, T, V)``; treated as a constant (detached).
        mask: ``(B, T)``, 1 where the loss counts; None counts every position.
    """
    s = _select(student_logits, mask)
    t = _select(teacher_logits.detach(), mask)
    if s.shape[0] == 0:
        return student_logits.sum() * 0.0
    return _kl_sum(s, t, temperature) / s.shape[0] * temperature ** 2


def _kl_sum(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``sum_n KL(softmax(t_n / tau) || softmax(s_n / tau))`` over ``(N, V)`` logits."""
    s = student.float() / temperature
    t = teacher.float() / temperature
    return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum")


def ce_loss(logits: torch.Tensor, targets: torch.Tensor,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy ``-log p(target_t)``, averaged over the positions where ``mask`` is 1.

    The mean is over tokens across the whole batch. Used as ``L_pred`` (mask on output tokens)
    and as the CLM objective (mask on every input token). No position counted gives 0.

    Args:
        logits: ``(B, T, V)``, ``logits[:, t]`` predicting ``targets[:, t]``.
        targets: ``(B, T)`` token ids.
        mask: ``(B, T)``; None counts every position.
    """
    x = _select(logits, mask).float()
    y = _select(targets.to(logits.device), mask)
    if x.shape[0] == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(x, y, reduction="mean")


Project = Callable[[torch.Tensor], torch.Tensor]
"""Final hidden states ``(N, d)`` -> float32 logits ``(N, V)`` (``PrefixLM.project``)."""


CPU_CHUNK = 1024
"""Positions per chunk off CUDA, where the logits share memory with everything else."""


def auto_chunk(device: torch.device | str, vocab: int, share: float = 0.125) -> int:
    """Positions per chunk for ``objective.logits_chunk: auto``.

    On CUDA, as many as keep their float32 logits and the loss's temporaries (about six
    ``(N, V)`` copies: the student's and the teacher's logits, their log-softmaxes and the
    gradient) within ``share`` of the free memory: one chunk, so one projection and no
    recomputation, at the batch sizes that fit. Elsewhere :data:`CPU_CHUNK`.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return CPU_CHUNK
    free, _ = torch.cuda.mem_get_info(device)
    return max(CPU_CHUNK, int(free * share) // (6 * 4 * vocab))


def chunked_kl_distill(project: Project, student_hidden: torch.Tensor,
                       teacher_hidden: torch.Tensor, mask: torch.Tensor | None = None,
                       temperature: float = 1.0, chunk: int = 1024) -> torch.Tensor:
    """:func:`kl_distill` of ``project(student_hidden)`` and ``project(teacher_hidden)``.

    The teacher's log-probabilities are formed once, without gradients. Where the positions
    fill more than one chunk, each chunk's student logits are recomputed in backward instead
    of kept (memory bounded by ``chunk``); in one chunk nothing is recomputed.

    Args:
        student_hidden: ``(B, T, d)``; carries the gradient.
        teacher_hidden: ``(B, T, d)``; a constant.
        mask: ``(B, T)``, 1 where the loss counts.
        chunk: positions projected at once.
    """
    s = _select(student_hidden, mask)
    t = _select(teacher_hidden.detach(), mask)
    if s.shape[0] == 0:
        return student_hidden.sum() * 0.0

    def piece(s_chunk: torch.Tensor, t_chunk: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = F.log_softmax(project(t_chunk).float() / temperature, -1)
        log_p = F.log_softmax(project(s_chunk).float() / temperature, -1)
        return F.kl_div(log_p, target, log_target=True, reduction="sum")

    run = _chunked(piece, s.shape[0], chunk)
    total = sum(run(s[i:i + chunk], t[i:i + chunk]) for i in range(0, s.shape[0], chunk))
    return total / s.shape[0] * temperature ** 2


def chunked_ce(project: Project, hidden: torch.Tensor, targets: torch.Tensor,
               mask: torch.Tensor | None = None, chunk: int = 1024) -> torch.Tensor:
    """:func:`ce_loss` of ``project(hidden)``: ``hidden`` is ``(B, T, d)``, ``hidden[:, t]``
    predicting ``targets[:, t]``; chunked as :func:`chunked_kl_distill`."""
    x = _select(hidden, mask)
    y = _select(targets.to(hidden.device), mask)
    if x.shape[0] == 0:
        return hidden.sum() * 0.0

    def piece(x_chunk: torch.Tensor, y_chunk: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(project(x_chunk), y_chunk, reduction="sum")

    run = _chunked(piece, x.shape[0], chunk)
    total = sum(run(x[i:i + chunk], y[i:i + chunk]) for i in range(0, x.shape[0], chunk))
    return total / x.shape[0]


def _chunked(piece: Callable[..., torch.Tensor], positions: int, chunk: int
             ) -> Callable[..., torch.Tensor]:
    """``piece`` itself when the positions fit one chunk (its logits are kept for backward),
    else ``piece`` under activation checkpointing (recomputed in backward, one chunk at a
    time)."""
    if positions <= chunk:
        return piece
    return lambda *args: checkpoint(piece, *args, use_reentrant=False)


def label_distill_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                       alpha: float = 0.5, temperature: float = 1.0
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Context distillation on the label tokens: ``alpha * KL + (1 - alpha) * CE``.

    - **Distributions:** softmax over the label tokens only (the verbalizer's columns), each
      model's own label tokens, so teacher and student may tokenize differently.
    - **KL:** KL(teacher || student), tempered by ``temperature`` and rescaled by its square,
      averaged over the examples (:func:`kl_distill`).
    - **CE:** cross-entropy of the gold label under the student's label distribution
      (temperature 1), averaged over the examples.

    Args:
        student: ``(B, L)`` student logits at the label tokens (carries the gradient).
        teacher: ``(B, L)`` teacher logits at its label tokens (a constant).
        labels: ``(B,)`` gold label indices.

    Returns:
        ``(loss, kl, ce)``.
    """
    kl = kl_distill(student.unsqueeze(1), teacher.unsqueeze(1), temperature=temperature)
    ce = ce_loss(student.unsqueeze(1), labels.unsqueeze(1))
    return alpha * kl + (1 - alpha) * ce, kl, ce
