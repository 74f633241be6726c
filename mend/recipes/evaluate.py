"""Evaluate one method on MetaICL tasks over seeds; optionally sweep one config key.

    python eval/run.py --config configs/eval/class_to_class/mend.yaml checkpoint=out/finetune/...
    mend eval --config configs/eval/class_to_class/icl.yaml data.limit=100

Writes ``results.json`` (per-task, per-seed scores, the partition average, the truncation
counts, and the provenance) and ``results.md`` to ``output_dir``. With ``sweep``, one run per
value of one dotted key (e.g. ``context.k`` over 1, 2, 4, 8, 16, or ``checkpoint`` over
distillers trained with different ``l``), gathered in one results file with ``sweep.png``.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from mend.config import checked, replace, to_dict
from mend.core.backbones import pick_device
from mend.counters import sum_counts
from mend.data.metaicl import ContextBuilder, ContextConfig, load_partition, load_task
from mend.errors import ConfigError
from mend.evaluation.efficiency import context_cost
from mend.evaluation.harness import (
    DemoConfig,
    EvalDataConfig,
    aggregate,
    content_gap,
    demo_pool,
    evaluate_tasks,
)
from mend.evaluation.retrieval import Retriever
from mend.methods import MethodConfig, build_method
from mend.recipes.run import Recipe, run, write_results
from mend.reporting import plots
from mend.reporting.results import memory, recovered, results_table


@dataclass(frozen=True)
@checked
class SweepConfig:
    key: str
    """A dotted config key, e.g. ``context.k`` or ``checkpoint``."""
    values: tuple[Any, ...]
    labels: tuple[str, ...] = ()
    """Names of the values on the plot's axis (default: the values)."""


@dataclass(frozen=True)
@checked
class ReferenceConfig:
    """Zero-shot and ICL evaluations (``results.json``) of the same tasks and seeds: given
    both, the results carry the method's recovered share of ICL's gain."""

    zero_shot: str | None = None
    icl: str | None = None


@dataclass(frozen=True)
@checked
class EvalConfig(MethodConfig):
    """The method to evaluate (``method``, ``checkpoint`` or ``llm``, load-time settings; see
    :class:`~mend.methods.MethodConfig`), and what to evaluate it on."""

    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    context: ContextConfig = field(default_factory=ContextConfig)
    demos: DemoConfig = field(default_factory=DemoConfig)
    sweep: SweepConfig | None = None
    references: ReferenceConfig = field(default_factory=ReferenceConfig)
    swap_control: bool = True
    """Also score a method that reads demonstrations with another task's (``demos.source:
    other_task``, each task's donor the next task) and report ``swapped`` and the
    ``content_gap``, own minus swapped: what the right demonstrations are worth."""
    batch_size: int = 32
    device: str | None = None
    """None: CUDA when available, else the CPU."""
    label: str | None = None
    """How tables name this run (default: the method, and the checkpoint's folder name)."""
    output_dir: str = "out/eval"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}.")

    @property
    def method_config(self) -> MethodConfig:
        """Only the method's fields (a key that does not change across a ``context.k`` sweep)."""
        return MethodConfig(**{f.name: getattr(self, f.name) for f in fields(MethodConfig)})


def main(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate a method on MetaICL tasks (results.json and results.md)."""
    out = Path(cfg.output_dir)
    if cfg.sweep is None:
        result = write_results(cfg, evaluate(cfg))
        (out / "results.md").write_text(results_table(result))
        print(results_table(result))
        return result
    runs, methods = [], {}
    for value in cfg.sweep.values:
        point = replace(cfg, sweep=None, **_nested(cfg.sweep.key, value))
        runs.append(evaluate(point, methods))
    labels = list(cfg.sweep.labels) or [str(v) for v in cfg.sweep.values]
    result = write_results(cfg, {"label": _label(cfg), "sweep": {"key": cfg.sweep.key,
                                                                 "labels": labels},
                                 "runs": runs})
    tables = "\n".join(f"### {cfg.sweep.key} = {lab}\n\n{results_table(r)}"
                       for lab, r in zip(labels, runs))
    (out / "results.md").write_text(tables)
    plots.sweep([result], out / "sweep.png")
    print(tables)
    return result


def evaluate(cfg: EvalConfig, methods: dict | None = None) -> dict[str, Any]:
    """One evaluation; ``methods`` caches loaded methods across the points of a sweep."""
    started = time.perf_counter()
    for name in ("zero_shot", "icl"):
        path = getattr(cfg.references, name)
        if path and not Path(path).is_file():
            raise ConfigError(f"references.{name}={path} does not exist: evaluate {name} on the "
                              f"same tasks and seeds first, or leave references out.")
    device = pick_device(cfg.device)
    key = repr(cfg.method_config)
    methods = {} if methods is None else methods
    if key not in methods:
        methods.clear()  # one method in memory at a time
        methods[key] = build_method(cfg.method_config, device=device)
    method = methods[key]
    tasks = _tasks(cfg.data)
    builder = ContextBuilder.for_method(method, cfg.context)
    own, skipped = _score(method, tasks, cfg, cfg.demos, builder)
    if not own:
        raise ConfigError("No task could be scored: check data.root, data.partition and "
                          "data.tasks.")
    result = {"label": _label(cfg), "method": cfg.method, "models": _models(method, cfg),
              "k": cfg.context.k, "context": to_dict(cfg.context), "demos": to_dict(cfg.demos),
              "data": to_dict(cfg.data), "results": aggregate(own),
              "counts": sum_counts(r.counts for r in own), "skipped_tasks": skipped,
              "predictions": {f"{r.task}/{r.seed}": r.predictions for r in own}}
    if cfg.swap_control and method.reads_demos and cfg.demos.source == "own":
        if len({r.task for r in own}) < 2:
            result["content_gap"] = None
            result["content_gap_note"] = "one task scored: there is no other task to swap with"
        else:
            swapped, _ = _score(method, tasks, cfg, replace(cfg.demos, source="other_task"),
                                builder)
            result["swapped"] = aggregate(swapped)
            result["content_gap"] = content_gap(result["results"], result["swapped"])
    result["memory"] = memory(result["counts"])
    if method.reads_context:  # the one-off cost of one context: the first task's k demos
        demos = [(r["input"], r["output"]) for r in
                 tasks[0].rows("train", cfg.data.seeds[0])[:cfg.context.k]]
        result["context_cost"] = context_cost(
            method, ContextBuilder.for_method(method, cfg.context), demos, device)[0]
    if cfg.references.zero_shot and cfg.references.icl:
        refs = [json.loads(Path(p).read_text()) for p in (cfg.references.zero_shot,
                                                          cfg.references.icl)]
        result["recovered_share"] = recovered(result, *refs)
    result["wall_time_s"] = time.perf_counter() - started
    return result


def _score(method, tasks, cfg: EvalConfig, demos: DemoConfig, builder: ContextBuilder):
    """Every (task, seed) under ``demos``: the results, and the pairs that could not be
    scored."""
    retrievers: dict[tuple[str, int], Any] = {}

    def retriever_for(source, seed):  # one index per pool, shared across a run's calls
        if demos.selection == "random" or not method.reads_context:
            return None
        key = (source.name, seed if demos.pool == "seed" else 0)
        if key not in retrievers:
            pool = demo_pool(source, seed, demos.pool)
            retrievers[key] = Retriever([r["input"] for r in pool], demos.selection,
                                        demos.retriever_model)
        return retrievers[key]

    swapped = " (swapped demos)" if demos.source == "other_task" else ""
    return evaluate_tasks(method, tasks, cfg.data.seeds, cfg.data.split, builder, demos,
                          limit=cfg.data.limit, batch_size=cfg.batch_size,
                          retriever_for=retriever_for, progress=f"eval {method.name}{swapped}")


def _tasks(data: EvalDataConfig):
    if data.tasks:
        tasks = []
        for name in dict.fromkeys(data.tasks):
            task = load_task(data.root, name)
            if task is None:
                warnings.warn(f"Task `{name}` is not under {data.root}; skipping it.",
                              stacklevel=3)
            else:
                tasks.append(task)
        return tasks
    return load_partition(data.root, data.partition)[1]


def _label(cfg: EvalConfig) -> str:
    if cfg.label:
        return cfg.label
    return cfg.method + (f" ({Path(cfg.checkpoint).name})" if cfg.checkpoint else "")


def _models(method, cfg: EvalConfig) -> dict[str, Any]:
    models: dict[str, Any] = {"llm": cfg.llm, "checkpoint": cfg.checkpoint}
    config = getattr(getattr(method, "distiller", method), "config", None)
    if config is not None:
        models["checkpoint_config"] = to_dict(config)
        models["llm"] = config.llm
        models["distiller"] = getattr(config, "distiller", None)
    return models


def _nested(key: str, value: Any) -> dict[str, Any]:
    """``("context.k", 4)`` -> ``{"context": {"k": 4}}``."""
    head, *rest = key.split(".")
    for part in reversed(rest):
        value = {part: value}
    return {head: value}


def cli(argv=None) -> int:
    return run(Recipe(EvalConfig, main), argv, prog="mend eval")
