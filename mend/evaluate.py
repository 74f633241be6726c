"""Scoring MetaICL tasks with any method: predictions, metrics, and their averages.

For one task and seed, a method's prefix is built from that seed's 16 training
demonstrations (truncated by :class:`~mend.data.metaicl.ContextBuilder`'s rules), then every
query is read after it and each option is scored by its mean per-token NLL (MetaICL
"direct"); the prediction is the option with the lowest NLL. The prefix is built once and its
KV cache serves every query and option.

The context must serve every query, so its budget reserves room for the longest query plus
its longest option in the split.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mend.data.metaicl import ContextBuilder, Task
from mend.metrics import task_metrics
from mend.methods.base import Method


@dataclass
class TaskResult:
    task: str
    seed: int
    predictions: list[str]
    golds: list[str]
    metrics: dict[str, float]


@torch.no_grad()
def evaluate_task(method: Method, task: Task, seed: int, split: str, builder: ContextBuilder,
                  *, limit: int | None = None, batch_size: int = 32) -> TaskResult | None:
    """Score ``task``'s ``split`` rows (``dev`` or ``test``) with the demonstrations of
    ``seed``; None (with a warning) for a task without options to score."""
    rows = task.rows(split, seed)[:limit]
    if not rows or not all(row.get("options") for row in rows):
        warnings.warn(f"Task {task.name} has rows without options; only option scoring is "
                      f"supported, so it is skipped.", stacklevel=2)
        return None
    demos = [(r["input"], r["output"]) for r in task.rows("train", seed)]
    queries = [builder.query(r["input"], after_context=method.reads_context) for r in rows]
    options = [[builder.option(o) for o in r["options"]] for r in rows]
    reserve = max(len(q) + max(map(len, o)) for q, o in zip(queries, options))
    kept, context = builder.context(demos, reserve)
    prefix, prefix_mask = method.prefix([kept], [context]) if method.reads_context else (
        None, None)
    nll = method.llm.score_options(queries, options, prefix, prefix_mask, batch_size=batch_size)
    preds = [r["options"][int(s.argmin())] for r, s in zip(rows, nll)]
    golds = [r["output"] for r in rows]
    return TaskResult(task.name, seed, preds, golds,
                      task_metrics(preds, golds, task.is_classification))


def mean_score(results: Sequence[TaskResult]) -> float:
    """The average of each task's ranking metric, each task counted once (mean over seeds)."""
    by_task: dict[str, list[float]] = {}
    for r in results:
        by_task.setdefault(r.task, []).append(r.metrics["score"])
    return float(np.mean([np.mean(v) for v in by_task.values()])) if by_task else float("nan")
