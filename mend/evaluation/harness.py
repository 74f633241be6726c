"""Scoring MetaICL tasks with any method: demonstrations, contexts, predictions, metrics.

For one task and seed:

1. **Demonstrations.** ``fixed`` (MetaICL): the first ``k`` rows of the seed's train file, the
   same for every query. ``resample`` (the MEND paper): ``k`` rows drawn per query from the
   pool, with an RNG seeded by (seed, task, query). Or ``bm25``/``dense`` retrieval: the ``k``
   pool rows nearest the query. The pool is the seed's train file (``pool: seed``) or every
   seed's train file (``pool: all``), never holding the query itself.
   With ``source: other_task`` they come from another task of the evaluated set instead
   (the *swap control*), while the queries keep their own options: what a method scores
   then is what it gets without this task's demonstrations.
2. **Perturbations** (Min et al., 2022): ``no_label`` (inputs only), ``no_input`` (outputs
   only), ``random_label`` (a label drawn uniformly from the options), ``wrong_label`` (a label
   drawn from the options other than the gold one).
3. **Contexts** follow :class:`~mend.data.metaicl.ContextBuilder`'s truncation rules (inputs
   and queries keep their first ``max_input_tokens`` tokens; later demonstrations are dropped
   beyond ``max_context_tokens``), counted in the result. A shared context reserves room for
   the longest query and option of the split.
4. **Scoring.** ``direct``: the mean per-token NLL of each option after the query. ``channel``:
   demonstrations are read output-first, and the NLL is that of the query after each option.
   The prediction has the lowest NLL. A shared context is run once and its KV cache serves
   every query and option; a context per query serves all that query's options.

Metrics (:mod:`mend.evaluation.metrics`): macro-F1 and accuracy for every task, ranked by macro-F1
for classification tasks and accuracy for the others. :func:`aggregate` gives the mean and std
over seeds and the partition average, which counts each task exactly once.
"""

from __future__ import annotations

import random
import typing
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from mend.config import checked
from mend.core.text import Demo
from mend.data.metaicl import SEEDS, ContextBuilder, Task
from mend.errors import ConfigError, InputError
from mend.evaluation.metrics import task_metrics
from mend.methods.base import Method, prefix_kwargs, prefix_positions

Perturbation = Literal["none", "no_label", "no_input", "random_label", "wrong_label"]
PERTURBATIONS: tuple[str, ...] = typing.get_args(Perturbation)
"""How the demonstrations may be perturbed (Min et al. 2022's analysis); "none" first."""


@dataclass(frozen=True)
@checked
class EvalDataConfig:
    root: str = "../shared/data/metaicl"
    partition: str | None = "class_to_class"
    """Evaluate the partition's meta-test tasks..."""
    tasks: tuple[str, ...] = ()
    """...or exactly these tasks (overrides the partition)."""
    split: Literal["test", "dev"] = "test"
    seeds: tuple[int, ...] = SEEDS
    limit: int | None = None
    """Score only the first ``limit`` rows of each task (None: all)."""

    def __post_init__(self) -> None:
        if not self.partition and not self.tasks:
            raise ConfigError("data needs a partition or a list of tasks.")
        if not self.seeds:
            raise ConfigError("data.seeds must name at least one seed.")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"data.limit must be >= 1 (rows scored per task), or null for "
                              f"all of them; got {self.limit}.")


@dataclass(frozen=True)
@checked
class DemoConfig:
    """How the ``context.k`` demonstrations are chosen (:class:`~mend.data.metaicl.ContextConfig`
    says how many)."""

    mode: Literal["fixed", "resample"] = "fixed"
    selection: Literal["random", "bm25", "dense"] = "random"
    """How the k demonstrations are chosen; bm25 and dense retrieve per query."""
    pool: Literal["seed", "all"] = "all"
    """Where resampled or retrieved demonstrations come from."""
    source: Literal["own", "other_task"] = "own"
    """``own``: the task's own demonstrations. ``other_task``: those of another task (the
    swap control; the harness names the donor), drawn by the same rules."""
    perturbation: Perturbation = "none"
    scoring: Literal["direct", "channel"] = "direct"
    retriever_model: str | None = None
    """Sentence-transformers model for dense retrieval (None: all-MiniLM-L6-v2, offline)."""

    @property
    def per_query(self) -> bool:
        return self.mode == "resample" or self.selection != "random"


@dataclass
class TaskResult:
    task: str
    seed: int
    predictions: list[str]
    golds: list[str]
    metrics: dict[str, float]
    counts: dict[str, int] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Demonstrations


def perturb(demos: Sequence[tuple[str, str]], kind: str, options: Sequence[str],
            rng: random.Random) -> list[Demo]:
    """Apply a perturbation; ``options`` are the labels random and wrong labels come from."""
    if kind == "none":
        return list(demos)
    if kind == "no_label":
        return [x for x, _ in demos]
    if kind == "no_input":
        return [y for _, y in demos]
    if kind == "random_label":
        return [(x, rng.choice(list(options))) for x, _ in demos]
    if kind == "wrong_label":
        out = []
        for x, y in demos:
            wrong = [o for o in options if o != y]
            out.append((x, rng.choice(wrong) if wrong else y))
        return out
    raise ConfigError(f"Unknown perturbation {kind!r}; choose from {', '.join(PERTURBATIONS)}.")


def demo_pool(task: Task, seed: int, pool: str) -> list[dict]:
    """The rows demonstrations are drawn from: one seed's train file, or every seed's."""
    if pool == "seed":
        return task.rows("train", seed)
    seen, rows = set(), []
    for s in SEEDS:
        try:
            seed_rows = task.rows("train", s)
        except InputError:  # a seed whose train file is absent contributes nothing
            continue
        for row in seed_rows:
            if (row["input"], row["output"]) not in seen:
                seen.add((row["input"], row["output"]))
                rows.append(row)
    return rows


def choose_demos(task: Task, seed: int, queries: Sequence[dict], cfg: DemoConfig, k: int,
                 retriever=None) -> list[list[tuple[str, str]]]:
    """One set of ``k`` demonstrations (fixed) or one per query (resample, retrieval), from
    ``task``'s pool (the query's task, or the donor under the swap control)."""
    if not cfg.per_query:
        return [[(r["input"], r["output"]) for r in task.rows("train", seed)[:k]]]
    pool = demo_pool(task, seed, cfg.pool)
    sets = []
    for qi, query in enumerate(queries):
        banned = [i for i, r in enumerate(pool) if r["input"] == query["input"]]
        if cfg.selection == "random":
            rng = random.Random(f"{seed}-{task.name}-{qi}")
            allowed = [i for i in range(len(pool)) if i not in banned]
            picked = rng.sample(allowed, min(k, len(allowed)))
        else:
            picked = retriever.neighbours(query["input"], k, exclude=banned)
        sets.append([(pool[i]["input"], pool[i]["output"]) for i in picked])
    return sets


# --------------------------------------------------------------------------------------------
# Scoring


@torch.no_grad()
def evaluate_task(method: Method, task: Task, seed: int, split: str, builder: ContextBuilder,
                  demos: DemoConfig | None = None, *, limit: int | None = None,
                  batch_size: int = 32, chunk: int = 16, retriever=None,
                  reuse_head: bool = True, donor: Task | None = None) -> TaskResult | None:
    """Score ``task``'s ``split`` rows with the demonstrations of ``seed``; None, with a warning
    naming the reason, for a task that cannot be scored (no options, or no demonstration fits
    the context budget). ``reuse_head=False`` is the naive path that reads the context again
    for every option (for benchmarks and checks; the scores are the same). Under
    ``demos.source: other_task``, the demonstrations come from ``donor`` (and ``retriever``
    must index the donor's pool)."""
    demos = demos or DemoConfig()
    if demos.source == "other_task" and (donor is None or donor.name == task.name):
        raise ConfigError(f"demos.source=other_task scores {task.name} with another task's "
                          f"demonstrations, but no other task was given: evaluate two or more "
                          f"tasks.")
    try:
        return _evaluate_task(method, task, seed, split, builder, demos, limit, batch_size, chunk,
                              retriever, reuse_head, donor if demos.source == "other_task"
                              else task)
    except InputError as e:
        warnings.warn(f"Task {task.name} (seed {seed}) is skipped: {e}", stacklevel=2)
        return None


def _evaluate_task(method, task, seed, split, builder, demos, limit, batch_size, chunk,
                   retriever, reuse_head, source) -> TaskResult | None:
    rows = task.rows(split, seed)[:limit]
    if not rows or not all(row.get("options") for row in rows):
        warnings.warn(f"Task {task.name} has rows without options; only option scoring is "
                      f"supported, so it is skipped.", stacklevel=2)
        return None
    counts_before = dict(builder.counters.counts)
    sets = (choose_demos(source, seed, rows, demos, builder.config.k, retriever)
            if method.reads_context else [[]])
    if not method.reads_demos:
        sets = sets[:1]  # one prefix serves every query, whatever demos.mode says
    labels = sorted({o for r in rows for o in r["options"]})
    sets = [perturb(s, demos.perturbation, labels, random.Random(f"{seed}-{task.name}-{i}-p"))
            for i, s in enumerate(sets)]
    if demos.scoring == "channel":  # demonstrations read output first
        sets = [[(d[1], d[0]) if isinstance(d, tuple) else d for d in s] for s in sets]
    groups = [_pairs(builder, r, demos.scoring, method.reads_context) for r in rows]
    nll: list[torch.Tensor] = []
    if len(sets) == 1:  # one context serves every query
        reserve = max(len(p) + len(t) for g in groups for p, t in g)
        prefix = _prefixes(method, builder, sets, [reserve])
        nll = method.llm.score_pairs(groups, **prefix_kwargs(prefix), batch_size=batch_size,
                                     reuse_head=reuse_head)
    else:  # a context per query, scored a chunk of queries at a time
        for start in range(0, len(rows), chunk):
            part = groups[start:start + chunk]
            reserves = [max(len(p) + len(t) for p, t in g) for g in part]
            prefix = _prefixes(method, builder, sets[start:start + chunk], reserves)
            nll += method.llm.score_pairs(part, **prefix_kwargs(prefix), batch_size=batch_size,
                                          reuse_head=reuse_head)
    preds = [r["options"][int(s.argmin())] for r, s in zip(rows, nll)]
    golds = [r["output"] for r in rows]
    counts = {k: v - counts_before.get(k, 0) for k, v in builder.counters.counts.items()
              if v != counts_before.get(k, 0)}
    return TaskResult(task.name, seed, preds, golds,
                      task_metrics(preds, golds, task.is_classification), counts)


def _pairs(builder: ContextBuilder, row: dict, scoring: str, after_context: bool
           ) -> list[tuple[list[int], list[int]]]:
    """The (prompt, target) id pairs that score each option of a row."""
    if scoring == "direct":
        query = builder.query(row["input"], after_context)
        return [(query, builder.option(o)) for o in row["options"]]
    # Channel: P(input | option). The input is cut by the same rule as a query.
    target = builder.option(builder.cut_input(row["input"], "query"))
    return [(builder.query(o, after_context), target) for o in row["options"]]


def _prefixes(method: Method, builder: ContextBuilder, sets: list[list[Demo]],
              reserves: list[int]):
    if not method.reads_context:
        return None, None
    kept, contexts = [], []
    for demo_set, reserve in zip(sets, reserves):
        k, ids = builder.context(demo_set, reserve)
        kept.append(k)
        contexts.append(ids)
    if not all(contexts):
        raise InputError(f"No demonstration fits the context budget beside a query of "
                         f"{max(reserves)} tokens (the LLM takes {builder.max_positions}): "
                         f"lower context.max_input_tokens or raise context.max_context_tokens.")
    prefix = method.prefix(kept, contexts)
    builder.counters.add("contexts", len(contexts))
    builder.counters.add("prefix_positions", sum(prefix_positions(prefix, method.llm.bos)))
    return prefix


# --------------------------------------------------------------------------------------------
# Aggregation


def aggregate(results: Sequence[TaskResult]) -> dict[str, Any]:
    """Per-task mean and std over seeds, and the partition average over tasks.

    The partition average is the mean over tasks of each task's mean over seeds; each task
    counts exactly once. Its std is the std over seeds of the per-seed task averages. A
    (task, seed) pair given twice is an error, never averaged in twice.
    """
    seen: set[tuple[str, int]] = set()
    by_task: dict[str, dict[int, dict[str, float]]] = {}
    for r in results:
        if (r.task, r.seed) in seen:
            raise ValueError(f"Task {r.task} seed {r.seed} appears twice in the results; each "
                             f"task and seed is counted once.")
        seen.add((r.task, r.seed))
        by_task.setdefault(r.task, {})[r.seed] = r.metrics
    metrics = ("score", "macro_f1", "accuracy")
    tasks = {}
    for task, per_seed in by_task.items():
        tasks[task] = {"seeds": {str(s): m for s, m in sorted(per_seed.items())}}
        for m in metrics:
            values = [v[m] for v in per_seed.values()]
            tasks[task][m] = {"mean": float(np.mean(values)), "std": float(np.std(values))}
    seeds = sorted({s for per_seed in by_task.values() for s in per_seed})
    average = {}
    for m in metrics:
        per_seed_avg = [np.mean([by_task[t][s][m] for t in by_task if s in by_task[t]])
                        for s in seeds]
        average[m] = {"mean": float(np.mean([tasks[t][m]["mean"] for t in tasks])),
                      "std": float(np.std(per_seed_avg))}
    return {"tasks": tasks, "average": average, "num_tasks": len(tasks), "seeds": seeds}


def evaluate_tasks(method: Method, tasks: Sequence[Task], seeds: Sequence[int], split: str,
                   builder: ContextBuilder, demos: DemoConfig, *, limit: int | None = None,
                   batch_size: int = 32, retriever_for=None, progress: str | None = None
                   ) -> tuple[list[TaskResult], list[str]]:
    """:func:`evaluate_task` over every (task, seed), each task's demonstrations from its
    donor (:func:`donors`) under ``demos.source: other_task``. ``retriever_for(task, seed)``
    gives the retriever of the task whose pool serves (None: random selection); ``progress``
    names a progress bar. Returns the results and the ``task/seed`` pairs skipped."""
    givers = donors(tasks) if demos.source == "other_task" else {}
    pairs = [(t, s) for t in tasks for s in seeds]
    results, skipped = [], []
    for task, seed in tqdm(pairs, desc=progress, disable=progress is None, dynamic_ncols=True):
        donor = givers.get(task.name)
        retriever = retriever_for(donor or task, seed) if retriever_for else None
        r = evaluate_task(method, task, seed, split, builder, demos, limit=limit,
                          batch_size=batch_size, retriever=retriever, donor=donor)
        if r is None:
            skipped.append(f"{task.name}/{seed}")
        else:
            results.append(r)
    return results, skipped


def donors(tasks: Sequence[Task]) -> dict[str, Task]:
    """The swap control's donor of each task: the next task in the list (the last gives to
    the first), so every task's demonstrations serve exactly one other task."""
    return {t.name: tasks[(i + 1) % len(tasks)] for i, t in enumerate(tasks)}


def content_gap(own: dict[str, Any], swapped: dict[str, Any]) -> dict[str, Any]:
    """Own minus swapped scores (two :func:`aggregate` results over the same tasks and seeds):
    what the task's own demonstrations add over another task's. Mean over tasks; std over
    seeds of the per-seed gap; and per task."""
    tasks = sorted(own["tasks"].keys() & swapped["tasks"].keys())
    per_task = {t: own["tasks"][t]["score"]["mean"] - swapped["tasks"][t]["score"]["mean"]
                for t in tasks}
    per_seed = []
    for s in own["seeds"]:
        gaps = [own["tasks"][t]["seeds"][str(s)]["score"]
                - swapped["tasks"][t]["seeds"][str(s)]["score"]
                for t in tasks if str(s) in own["tasks"][t]["seeds"]
                and str(s) in swapped["tasks"][t]["seeds"]]
        if gaps:
            per_seed.append(float(np.mean(gaps)))
    return {"mean": float(np.mean(list(per_task.values()))) if tasks else float("nan"),
            "std": float(np.std(per_seed)) if per_seed else float("nan"), "tasks": per_task}


def mean_score(results: Sequence[TaskResult]) -> float:
    """The partition average of the ranking metric (each task once, averaged over seeds)."""
    return aggregate(results)["average"]["score"]["mean"] if results else float("nan")
