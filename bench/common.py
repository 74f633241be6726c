"""What every benchmark shares: the command line, the models, timing, and the results files.

Each benchmark writes ``<out>/<name>.json`` (rows, targets, machine, versions, config, git
commit; see :func:`mend.reporting.results.provenance`) and ``<out>/<name>.md``, the same rows as a
table.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from mend.evaluation.efficiency import PeakMemory, count_flops, uncounted  # noqa: F401  (re-exported for the benches)

RESULTS = Path(__file__).resolve().parent / "results"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--tiny", action="store_true",
                   help="random tiny models (seconds, no downloads) instead of the zoo pair")
    p.add_argument("--llm", default="smollm2-135m", help="the frozen LLM (hub id, dir, zoo)")
    p.add_argument("--distiller", default="smollm2-135m", help="the distiller LM")
    p.add_argument("--out", default=str(RESULTS), help="where the JSON and markdown go")
    p.add_argument("--name", default=None, help="results file name (default: <bench>-<device>)")
    return p


def models(args) -> tuple[str, str]:
    """``(distiller, llm)`` paths: the zoo pair, or tiny random models built under /tmp."""
    if not args.tiny:
        return args.distiller, args.llm
    from mend import tiny
    root = Path("/tmp/mend-bench-tiny")
    return (str(tiny.build(root / "distiller", "llama", hidden=64)),
            str(tiny.build(root / "llm", "llama", hidden=64)))


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str, repeats: int = 1, warmup: bool = True) -> float:
    """Median wall seconds of ``fn`` over ``repeats`` runs, after one warm-up run (skip it
    with ``warmup=False`` where the same kernels have just run)."""
    if warmup:
        fn()
        sync(device)
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def write(args, bench: str, rows: Sequence[dict[str, Any]], columns: Sequence[str],
          targets: Sequence[dict[str, Any]] = (), notes: Sequence[str] = (),
          config: dict[str, Any] | None = None) -> Path:
    """Write ``<name>.json`` and ``<name>.md``; returns the JSON path."""
    from mend.provenance import provenance, write_json

    name = args.name or f"{bench}-{args.device}{'-tiny' if args.tiny else ''}"
    out = Path(args.out)
    prov = provenance({**vars(args), **(config or {})})
    notes = [*notes, *(f"FLOPs n/a: {reason}" for reason in uncounted())]
    write_json(out / f"{name}.json", {"bench": bench, "rows": list(rows),
                                       "targets": list(targets), "notes": list(notes),
                                       "provenance": prov})
    machine = prov["machine"]
    lines = [f"# {bench}: {name}", "",
             f"Machine: {machine['device']} ({machine['cpu_count']} CPU cores, "
             f"{machine['torch_threads']} torch threads); torch {prov['versions'].get('torch')}, "
             f"transformers {prov['versions'].get('transformers')}; git "
             f"{(prov['git'] or {}).get('commit', '?')[:10]}.", "",
             f"Command: `{prov['command']}`", ""]
    lines += table(rows, columns)
    if targets:
        lines += ["", "## Targets", ""]
        lines += table(targets, ["target", "measured", "threshold", "met"])
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return out / f"{name}.json"


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return lines


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if value == 0:
            return "0"
        if abs(value) >= 1e9:
            return f"{value / 1e9:.2f}G"
        if abs(value) >= 1e6:
            return f"{value / 1e6:.2f}M"
        return f"{value:.3g}"
    return str(value)


def target(name: str, measured: float, threshold: float, higher_is_better: bool = True
           ) -> dict[str, Any]:
    met = measured >= threshold if higher_is_better else measured <= threshold
    return {"target": name, "measured": round(measured, 4), "threshold": threshold, "met": met}
