"""Results files that say how they were made, and markdown tables of them.

Every ``results.json`` carries a ``provenance`` block: the resolved config, the package
versions, the git commit (and whether the tree had uncommitted changes), the machine, the
command line and the time. :func:`compare` puts several results files side by side
(``mend compare results/*.json``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mend.errors import InputError
from mend.evaluation.metrics import paired_difference, recovered_share


def provenance_summary(root: Path, link: str) -> str:
    """One line naming the commits and devices behind every ``results.json`` under ``root``."""
    commits, devices = set(), set()
    for path in root.glob("**/results.json"):
        prov = json.loads(path.read_text()).get("provenance") or {}
        git = prov.get("git") or {}
        commits.add(f"{git.get('commit', '?')[:10]}{'+dirty' if git.get('dirty') else ''}")
        devices.add((prov.get("machine") or {}).get("device", "?"))
    return (f"Results in `{link}/` (each `results.json` carries its provenance): "
            f"git {', '.join(sorted(commits))}; device {', '.join(sorted(devices))}.")


def fmt(stat: dict[str, float] | None, scale: float = 100.0) -> str:
    """``{"mean", "std"}`` as ``"54.3 ± 1.2"`` (percent)."""
    if not stat:
        return "–"
    return f"{stat['mean'] * scale:.1f} ± {stat['std'] * scale:.1f}"


def results_table(result: dict[str, Any]) -> str:
    """One evaluation as markdown: per task both metrics (mean ± std over seeds, in %) and the
    ranking score per seed; the partition average last."""
    agg = result["results"]
    seeds = agg["seeds"]
    head = ["task", "macro-F1", "accuracy", *[f"seed {s}" for s in seeds]]
    lines = [f"**{result['label']}** — {agg['num_tasks']} tasks, k={result['k']}, "
             f"seeds {', '.join(map(str, seeds))}; score = macro-F1 (classification) or "
             f"accuracy (other tasks), in %", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task, t in sorted(agg["tasks"].items()):
        per_seed = [f"{t['seeds'][str(s)]['score'] * 100:.1f}" if str(s) in t["seeds"] else "–"
                    for s in seeds]
        lines.append(f"| {task} | {fmt(t['macro_f1'])} | {fmt(t['accuracy'])} | "
                     + " | ".join(per_seed) + " |")
    avg = agg["average"]
    lines.append(f"| **average (score: {fmt(avg['score'])})** | {fmt(avg['macro_f1'])} | "
                 f"{fmt(avg['accuracy'])} |" + " |" * len(seeds))
    return "\n".join(lines) + "\n" + swap_line(result) + share_line(result)


def share_line(result: dict[str, Any]) -> str:
    """The recovered share and the compression ratio of a results file, in one sentence
    each (empty where they were not measured)."""
    out = ""
    share = result.get("recovered_share")
    if share:
        tasks = ", ".join(f"{t} {_pct(v['share'])}{'' if v['counted'] else ' (not counted)'}"
                          for t, v in share["tasks"].items())
        out += (f"\n**Recovered share** of ICL's gain over zero-shot: {_pct(share['share'])} "
                f"over the {len(share['counted'])} tasks where ICL gains at least "
                f"{share['min_icl_gain'] * 100:g} points ({tasks}).\n")
    mem = result.get("memory")
    if mem:
        out += (f"\n**Memory:** {mem['context_tokens']:.1f} demonstration tokens per context "
                f"held in {mem['prefix_positions']:.1f} prefix positions: compression "
                f"{compression_text(mem)}.\n")
    if result.get("context_cost"):
        out += f"\n**One-off cost** of a context: {cost_text(result['context_cost'])}.\n"
    return out


def cost_text(cost: dict[str, Any] | None) -> str:
    """A context's one-off cost (:func:`mend.evaluation.efficiency.context_cost`) as
    "GFLOPs, seconds" (FLOPs "n/a" where they could not be counted)."""
    if not cost:
        return "–"
    flops = cost["flops"]
    gf = "n/a" if flops != flops else f"{flops / 1e9:.2f}"
    return f"{gf} GFLOPs, {cost['seconds']:.2f} s"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x * 100:.0f}%"


def compression_text(mem: dict[str, float] | None) -> str:
    return "–" if not mem or mem.get("compression") is None else f"{mem['compression']:.1f}x"


def swap_line(result: dict[str, Any]) -> str:
    """The swap control of a results file in one sentence (empty when it was not run)."""
    gap = result.get("content_gap")
    if gap is None:
        note = result.get("content_gap_note")
        return f"\nSwap control not run: {note}.\n" if note else ""
    return (f"\nSwap control: with another task's demonstrations the average is "
            f"{fmt(result['swapped']['average']['score'])}, so the **content gap** (own − "
            f"swapped) is {fmt(gap)} points.\n")


def task_scores(result: dict[str, Any]) -> dict[str, float]:
    """Each task's ranking score (mean over seeds) in a results file."""
    return {t: v["score"]["mean"] for t, v in result["results"]["tasks"].items()}


def recovered(result: dict[str, Any], zero_shot: dict[str, Any], icl: dict[str, Any]
              ) -> dict[str, Any]:
    """A results file's recovered share of ICL's gain over zero-shot
    (:func:`~mend.evaluation.metrics.recovered_share`), over the tasks all three scored."""
    return recovered_share(task_scores(result), task_scores(zero_shot), task_scores(icl))


def memory(counts: dict[str, int]) -> dict[str, float] | None:
    """What a method's contexts cost, from the harness's counts: the demonstrations' LLM
    tokens it was given and the prefix positions the LLM then held (bos included), each per
    context, and the **compression ratio**, tokens over positions. None for a method that
    reads no context (zero-shot)."""
    n = counts.get("contexts", 0)
    if not n or "context_tokens_given" not in counts:
        return None
    tokens, positions = counts["context_tokens_given"] / n, counts["prefix_positions"] / n
    return {"context_tokens": tokens, "prefix_positions": positions,
            "compression": tokens / positions if positions else None}


def references(runs: Sequence[dict[str, Any]]
               ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The zero-shot and the ICL run among ``runs``, the references of the recovered share:
    the ICL run is the one with the largest context budget (full ICL, not ICL cut to another
    method's memory). None where there is none."""
    zero_shot = next((r for r in runs if r.get("method") == "zero_shot"), None)
    icls = [r for r in runs if r.get("method") == "icl"]
    icl = max(icls, key=lambda r: (r.get("context") or {}).get("max_context_tokens", 0),
              default=None)
    return zero_shot, icl


def read_results(path: str | Path) -> dict[str, Any]:
    """A ``results.json`` that an evaluation wrote, refused with the reason where it is not
    one (missing, not JSON, or without the scores ``mend eval`` writes)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist: give the results.json of a `mend eval` run.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not JSON ({e}): give the results.json of a `mend eval` "
                         f"run.") from None
    ok = isinstance(data, dict) and all(
        isinstance(r, dict) and "results" in r and "label" in r
        for r in (data.get("runs") or [data]))
    if not ok:
        raise InputError(f"{path} holds no evaluation results (no `results` and `label`): give "
                         f"the results.json of a `mend eval` run.")
    return data


def compare(paths: Sequence[str | Path], against: str | None = None) -> str:
    """Markdown: tasks as rows, one column per results file (score mean ± std, %); with
    ``against`` (a run's label), each run's paired difference from that run over the task and
    seed cells both scored, ± its standard error."""
    runs = [r for run in map(read_results, paths)
            for r in (run.get("runs") or [run])]  # sweeps: every point
    tasks = sorted({t for r in runs for t in r["results"]["tasks"]})
    labels = [r["label"] for r in runs]
    if against is not None and against not in labels:
        raise InputError(f"--against {against!r} names none of the runs compared; their labels: "
                         f"{', '.join(labels)}.")
    lines = ["| task | " + " | ".join(labels) + " |", "|" + "---|" * (len(labels) + 1)]
    for task in tasks:
        cells = [fmt(r["results"]["tasks"].get(task, {}).get("score")) for r in runs]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines.append("| **average** | " + " | ".join(
        f"**{fmt(r['results']['average']['score'])}**" for r in runs) + " |")
    if any(r.get("content_gap") for r in runs):
        lines.append("| content gap (own − swapped) | " + " | ".join(
            fmt(r.get("content_gap")) for r in runs) + " |")
    zero_shot, icl = references(runs)
    if zero_shot and icl:
        lines.append("| recovered share of ICL's gain over zero-shot | "
                     + " | ".join(_pct(recovered(r, zero_shot, icl)["share"]) for r in runs)
                     + " |")
    if against is not None:
        ref = seed_scores(runs[labels.index(against)])
        lines.append(f"| minus {against}, paired over tasks × seeds (± s.e.) | " + " | ".join(
            _paired_text(paired_difference(seed_scores(r), ref)) for r in runs) + " |")
    if any(r.get("memory") for r in runs):
        lines.append("| compression (tokens / prefix positions) | " + " | ".join(
            compression_text(r.get("memory")) for r in runs) + " |")
    common = [set(r["results"]["tasks"]) for r in runs]
    if any(c != common[0] for c in common):
        lines.append("\nThe runs cover different tasks, so their averages are not comparable.")
    return "\n".join(lines) + "\n"


def seed_scores(result: dict[str, Any]) -> dict[tuple[str, str], float]:
    """A run's score on each (task, seed) it scored."""
    return {(task, seed): v["score"] for task, t in result["results"]["tasks"].items()
            for seed, v in t["seeds"].items()}


def _paired_text(diff: dict[str, float] | None) -> str:
    return "–" if diff is None else f"{diff['mean'] * 100:+.1f} ± {diff['se'] * 100:.1f}"


def emit(text: str, output: str | Path | None) -> None:
    """Print a table, and also write it to ``output`` when one is given."""
    print(text)
    if output:
        Path(output).write_text(text)
