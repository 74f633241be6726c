"""How much of ICL's gain each method keeps on tasks training never saw, at what memory.

A *transfer* setting (``report.yaml`` with ``kind: transfer``; written by
``configs/reproduce/cpu/generalise.sh``) holds, for each evaluation set (the demo's tasks, a
MetaICL partition), ``<set>/eval/<run>/results.json`` for zero-shot, ICL and any number of
other runs. Its table has one row per run:

- the score, and the score with another task's demonstrations (the swap control);
- the content gap (own minus swapped), and the recovered share of ICL's gain over zero-shot
  (:func:`~mend.evaluation.metrics.recovered_share`, over the tasks where ICL gains at least
  2 points);
- the memory: demonstration tokens given, prefix positions held, and their ratio;
- the one-off cost of building one context (FLOPs and seconds), where it was measured.

Its ``ablation`` block, if any, gathers the levers tried into one table: a row per run name
(the same name in every set), its recovered share and content gap in each set, the content
share on held-out text its training logged last (or a ``diagnose.json`` gives), and the
prefix positions each query reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mend.reporting.results import compression_text, cost_text, fmt, recovered, references
from mend.training.run_log import kept_step, read_metrics

ORDER = ("zero_shot", "icl", "icl-equal-memory", "kv_compress", "kvzip", "attention_matching",
         "kvzip_matching", "prompt_tuning")
"""Rows in this order first (zero-shot, the references, the baselines), then the rest by
name."""


def runs(folder: Path) -> list[tuple[str, dict[str, Any]]]:
    """``(name, results)`` of every evaluation in ``folder``, baselines first."""
    found = {p.parent.name: json.loads(p.read_text()) for p in folder.glob("*/results.json")}
    names = [n for n in ORDER if n in found] + sorted(n for n in found if n not in ORDER)
    return [(n, found[n]) for n in names]


def table(folder: Path) -> str:
    """The markdown table of one evaluation set (see the module docstring)."""
    found = runs(folder)
    zero_shot, icl = references([r for _, r in found])
    head = ["run", "score", "swapped demos", "content gap", "recovered share",
            "tokens → positions", "compression", "one-off cost per context"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in found:
        share = recovered(r, zero_shot, icl)["share"] if zero_shot and icl else None
        mem = r.get("memory")
        lines.append(" | ".join([
            f"| {r.get('label') or name}", fmt(r["results"]["average"]["score"]),
            fmt((r.get("swapped") or {}).get("average", {}).get("score")),
            fmt(r.get("content_gap")), "–" if share is None else f"{share * 100:.0f}%",
            f"{mem['context_tokens']:.0f} → {mem['prefix_positions']:.0f}" if mem else "–",
            compression_text(mem), cost_text(r.get("context_cost"))]) + " |")
    return "\n".join(lines)


def held_out_share(path: Path) -> float | None:
    """The content share on held-out text: a ``diagnose.json``'s, or one a training run's
    ``metrics.jsonl`` logged: at the step whose weights the run kept, the first best
    ``eval_score`` where it selected by one (a later share describes weights it did not
    save), else the last. None where the file has none."""
    if not path.is_file():
        return None
    if path.suffix == ".json":
        return json.loads(path.read_text()).get("content_share")
    logged = read_metrics(path)
    kept = kept_step(logged)
    shares = [row["monitor_content_share"] for row in logged if "monitor_content_share" in row
              and (kept is None or row["step"] <= kept)]
    return shares[-1] if shares else None


def ablation(root: Path, spec: dict[str, Any]) -> str:
    """The levers in one table (see the module docstring). ``spec["rows"]`` are ``{"run",
    "lever", "held_out"}``, ``held_out`` a path relative to ``root``; ``spec["sets"]`` names
    the evaluation sets, in order (default: every set under ``root``)."""
    sets = ([root / name / "eval" for name in spec["sets"]] if spec.get("sets") else
            sorted(p for p in root.glob("*/eval") if p.is_dir()))
    rows = spec["rows"]
    refs = {s: references([r for _, r in runs(s)]) for s in sets}
    head = ["lever", *[f"{s.parent.name}: share / gap" for s in sets], "held-out text share",
            "positions per query"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells, positions = [], []
        for s in sets:
            path = s / row["run"] / "results.json"
            zero_shot, icl = refs[s]
            if not path.is_file() or not (zero_shot and icl):
                cells.append("–")
                continue
            r = json.loads(path.read_text())
            share = recovered(r, zero_shot, icl)["share"]
            gap = r.get("content_gap")
            cells.append(("–" if share is None else f"{share * 100:.0f}%") + " / "
                         + ("–" if gap is None else f"{gap['mean'] * 100:+.1f}"))
            if r.get("memory"):
                positions.append(r["memory"]["prefix_positions"])
        held = held_out_share(root / row["held_out"]) if row.get("held_out") else None
        # A row that holds what fits (ICL cut to a token budget) holds a different number of
        # positions on each set: its range.
        span = "–" if not positions else "–".join(
            f"{p:.0f}" for p in sorted({min(positions), max(positions)}))
        lines.append(" | ".join([f"| {row.get('lever') or row['run']}", *cells,
                                 "–" if held is None else f"{held * 100:.1f}%",
                                 span]) + " |")
    return "\n".join(lines)


def section(root: Path, meta: dict[str, Any], link: str) -> str:
    """A transfer setting's report: its description, one table per evaluation set, and the
    curves of its training runs (``<run>/loss.png``, linked through ``link``)."""
    parts = [f"## {meta.get('title', root.name)}", "", str(meta.get("description", "")).strip(),
             ""]
    for folder in sorted(p for p in root.glob("*/eval") if p.is_dir()):
        parts += [f"### {folder.parent.name}", "", table(folder), ""]
    if meta.get("ablation"):
        parts += ["### The levers, in one table", "", ablation(root, meta["ablation"]), ""]
    curves = sorted(p.parent.name for p in root.glob("*/loss.png"))
    if curves:
        parts += ["Training curves (loss, selection score, and the held-out content controls): "
                  + ", ".join(f"[{c}]({link}/{c}/loss.png)" for c in curves), ""]
    if meta.get("notes"):
        parts += ["### What bounds it", "", str(meta["notes"]).strip(), ""]
    return "\n".join(parts)
