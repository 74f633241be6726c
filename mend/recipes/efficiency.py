"""Efficiency side by side (the MEND paper's Figure 3): ICL, prompt tuning and MEND on one
task at batch size 1: forward FLOPs (MEND's distiller counted), peak memory, time per query.

    mend efficiency --config configs/efficiency/smollm2.yaml

Writes ``efficiency.json`` (with provenance), ``efficiency.md`` and ``efficiency.png``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mend.config import checked
from mend.core.backbones import pick_device
from mend.data.metaicl import ContextBuilder, ContextConfig, load_task
from mend.errors import ConfigError
from mend.evaluation.efficiency import gflops, query_costs, uncounted
from mend.evaluation.harness import demo_pool
from mend.methods import MethodConfig, build_method
from mend.recipes.run import Recipe, run, write_results
from mend.reporting import plots


@dataclass(frozen=True)
@checked
class EfficiencyConfig:
    methods: tuple[MethodConfig, ...]
    root: str = "../shared/data/metaicl"
    task: str = "glue-sst2"
    seed: int = 100
    context: ContextConfig = field(default_factory=ContextConfig)
    queries: int = 20
    """Queries measured (the first is a warm-up and not reported)."""
    device: str | None = None
    output_dir: str = "out/efficiency"

    def __post_init__(self) -> None:
        if not self.methods or self.queries < 2:
            raise ConfigError("efficiency needs at least one method and queries >= 2.")


def main(cfg: EfficiencyConfig) -> dict[str, Any]:
    """Measure FLOPs, peak memory and time per query of each method on one task."""
    device = pick_device(cfg.device)
    task = load_task(cfg.root, cfg.task)
    if task is None:
        raise ConfigError(f"Task {cfg.task} is not under {cfg.root}.")
    rows = [r for r in task.rows("test") if r.get("options")][:cfg.queries]
    pool = demo_pool(task, cfg.seed, "all")
    rng = random.Random(cfg.seed)
    k = min(cfg.context.k, len(pool))
    demo_sets = [[(d["input"], d["output"]) for d in rng.sample(pool, k)] for _ in rows]
    table = []
    for method_cfg in cfg.methods:
        method = build_method(method_cfg, device=device)
        builder = ContextBuilder.for_method(method, cfg.context)
        costs = query_costs(method, builder, demo_sets, rows, device)
        table.append({"method": method.name, "checkpoint": method_cfg.checkpoint, **costs})
        del method
    result = write_results(cfg, {"task": cfg.task, "k": cfg.context.k, "queries": len(rows) - 1,
                                 "device": device, "methods": table}, "efficiency.json")
    out = Path(cfg.output_dir)
    (out / "efficiency.md").write_text(markdown(result))
    plots.efficiency(result, out / "efficiency.png")
    print(markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    rows = result["methods"]
    icl = next((r for r in rows if r["method"] == "icl"), None)
    lines = [f"{result['task']}, k={result['k']}, batch size 1, median of {result['queries']} "
             f"queries on {result['device']}", "",
             "| method | LLM GFLOPs | context GFLOPs | total GFLOPs | peak MiB | ms/query |"
             + (" FLOPs vs ICL |" if icl else ""),
             "|---|---|---|---|---|---|" + ("---|" if icl else "")]
    for r in rows:
        ratio = r["flops"] / icl["flops"] if icl else None
        ratio = "" if ratio is None else " n/a |" if math.isnan(ratio) else f" {ratio:.2f}x |"
        lines.append(f"| {r['method']} | {gflops(r['llm_flops'])} | "
                     f"{gflops(r['context_flops'])} | {gflops(r['flops'])} | "
                     f"{r['peak_bytes'] / 2**20:.1f} | {r['seconds'] * 1e3:.1f} |{ratio}")
    lines += [f"\nFLOPs n/a: {reason}." for reason in uncounted()]
    return "\n".join(lines) + "\n"


def cli(argv=None) -> int:
    return run(Recipe(EfficiencyConfig, main), argv, prog="mend efficiency")
