"""Metrics as MetaICL defines them, on lists of predicted and gold strings.

- **Macro-F1** averages the per-label F1 over the labels present in the gold answers only. A
  gold label that is never predicted scores F1 = 0; a predicted label that is never gold
  lowers the recall of the true labels but is not averaged itself.
- **Accuracy** is the fraction of exact matches.

Classification tasks are ranked by macro-F1 and the others by accuracy; both are reported.
Pattern-based methods score labels as single next tokens (:func:`label_scores`).

- **Recovered share** (:func:`recovered_share`) says how much of what ICL gains over zero-shot
  a method keeps: ``(method - zero-shot) / (ICL - zero-shot)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch


def accuracy(preds: Sequence[str], golds: Sequence[str]) -> float:
    _check(preds, golds)
    return float(np.mean([p == g for p, g in zip(preds, golds)]))


def macro_f1(preds: Sequence[str], golds: Sequence[str]) -> float:
    from sklearn.metrics import f1_score  # lazy: scikit-learn is slow to import
    _check(preds, golds)
    return float(f1_score(list(golds), list(preds), labels=sorted(set(golds)), average="macro",
                          zero_division=0))


def task_metrics(preds: Sequence[str], golds: Sequence[str], classification: bool
                 ) -> dict[str, float]:
    """Both metrics, plus ``score``: the one the task is ranked by."""
    out = {"macro_f1": macro_f1(preds, golds), "accuracy": accuracy(preds, golds)}
    out["score"] = out["macro_f1"] if classification else out["accuracy"]
    return out


MIN_ICL_GAIN = 0.02
"""Tasks where ICL gains less than this (2 points) over zero-shot are shown but left out of
an average share: there the ratio divides by noise."""


def recovered_share(method: Mapping[str, float], zero_shot: Mapping[str, float],
                    icl: Mapping[str, float], min_gain: float = MIN_ICL_GAIN
                    ) -> dict[str, Any]:
    """``(method - zero-shot) / (ICL - zero-shot)`` per task, and over the tasks as a whole.

    Args:
        method, zero_shot, icl: each task's score (a fraction), over the same seeds.
        min_gain: tasks where ICL gains less than this over zero-shot are not averaged.

    Returns:
        ``{"share", "tasks": {task: {"share", "icl_gain", "counted"}}, "counted",
        "min_icl_gain"}``. The overall share is formed from the averaged scores of the
        counted tasks, ``(mean method - mean zero-shot) / (mean ICL - mean zero-shot)``, not
        as a mean of ratios; None when no task counts. A task's share is None where ICL
        gains nothing at all.
    """
    tasks = sorted(method.keys() & zero_shot.keys() & icl.keys())
    per_task, counted = {}, []
    for t in tasks:
        gain = icl[t] - zero_shot[t]
        per_task[t] = {"share": (method[t] - zero_shot[t]) / gain if gain else None,
                       "icl_gain": gain, "counted": gain >= min_gain}
        if gain >= min_gain:
            counted.append(t)
    share = None
    if counted:
        m, z, i = (float(np.mean([s[t] for t in counted])) for s in (method, zero_shot, icl))
        share = (m - z) / (i - z)
    return {"share": share, "tasks": per_task, "counted": counted, "min_icl_gain": min_gain}


def paired_difference(method: Mapping[Any, float], reference: Mapping[Any, float]
                      ) -> dict[str, float] | None:
    """The mean of ``method - reference`` over the cells both score (a task and a seed: the
    same queries and demonstration sets), with its standard error, the sample standard
    deviation of the differences over ``sqrt(n)``. Pairing removes what the cells share, so
    the error says how finely the set can tell the two apart. None under two shared cells.

    Returns:
        ``{"mean", "se", "n"}``.
    """
    diffs = np.array([method[c] - reference[c] for c in method.keys() & reference.keys()])
    if len(diffs) < 2:
        return None
    return {"mean": float(diffs.mean()), "se": float(diffs.std(ddof=1) / np.sqrt(len(diffs))),
            "n": len(diffs)}


def _check(preds: Sequence[str], golds: Sequence[str]) -> None:
    if len(preds) != len(golds) or not golds:
        raise ValueError(f"Need equally many predictions and golds, at least one; got "
                         f"{len(preds)} and {len(golds)}.")


def label_scores(logits, label_ids: Sequence[int], golds: Sequence[int]) -> dict[str, float]:
    """Metrics of next-token label scoring (pattern-based methods).

    Args:
        logits: ``(Q, V)`` logits of the token after each prompt.
        label_ids: the token id of each label (verbalizer), in label order.
        golds: each query's gold label index into ``label_ids``.

    Returns:
        ``accuracy``: the argmax over the label tokens only is the gold label;
        ``full_vocab_accuracy``: the argmax over the whole vocabulary is the gold label's
        token; ``non_label_fraction``: the share of whole-vocabulary argmaxes that are no
        label token at all; ``predictions``: the label-restricted choices.
    """
    ids = torch.as_tensor(list(label_ids))
    gold = torch.as_tensor(list(golds))
    restricted = logits[:, ids].argmax(-1)
    full = logits.argmax(-1)
    return {"accuracy": float((restricted == gold).float().mean()),
            "full_vocab_accuracy": float((full == ids[gold]).float().mean()),
            "non_label_fraction": float((~torch.isin(full, ids)).float().mean()),
            "predictions": restricted.tolist()}
