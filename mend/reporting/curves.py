"""A training run's quality against the tokens it read: ``mend curve``.

    mend curve out/warm/stage2 out/warm/demo*/eval/warm-step-*/results.json --output curve.png

Each results file is a ``mend eval`` of one of the run's models, given zero-shot's and ICL's
results (``references.*``) so that it holds its recovered share of ICL's gain and its swap
control (content gap). Its step is read from the checkpoint it scored: a step the run saved
(``mend export`` keeps the ``step-N`` name), the run's ``init_from`` (step 0), or the run's own
directory (the step that selection kept, or the last). The tokens read by a step are summed
from the run's ``metrics.jsonl``. Results are grouped by the folder above their ``eval/``
folder (``<out>/<set>/eval/<row>/results.json``, as the reproduce scripts lay them out).

It draws, against tokens read: each set's recovered share; the held-out content share (the
content controls the run logged, and those of other runs given with ``--beside``, e.g. the
ablation's ways); and, for stage 2, the dev score that selected the model, with another
task's demonstrations beside it. The same numbers go to markdown tables beside the figure
(``curve.md``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from mend.errors import ConfigError
from mend.reporting.plots import pyplot
from mend.reporting.results import read_results
from mend.training.run_log import kept_step, read_metrics


def tokens_read(lines: Sequence[dict[str, Any]]) -> dict[int, float]:
    """Tokens read by the end of each logged step (every start of the run included), from
    its metrics lines."""
    total, out = 0.0, {0: 0.0}
    for record in lines:
        if "tokens" in record:  # a training log line: the tokens of its window
            total += record["tokens"]
            out[record["step"]] = total
    return out


def tokens_at(tokens: dict[int, float], step: int) -> float:
    """Tokens read by ``step``: those of the nearest logged step at or before it."""
    return tokens[max(s for s in tokens if s <= step)]


def run_metrics(run: Path) -> list[dict[str, Any]]:
    """The lines of ``run``'s ``metrics.jsonl``; a clear error when ``run`` has none."""
    if not (run / "metrics.jsonl").is_file():
        raise ConfigError(f"{run} is not a training run's output directory: it has no "
                          f"metrics.jsonl.")
    return read_metrics(run / "metrics.jsonl")


def held_out(runs: Sequence[str | Path]) -> dict[str, list[dict[str, Any]]]:
    """``{run name: [{"step", "tokens", "kl_own", "content_share"}, ...]}``: the content
    controls each run logged on held-out text, against the tokens it had read by then."""
    out = {}
    for run in map(Path, runs):
        lines = run_metrics(run)
        tokens = tokens_read(lines)
        out[run.name] = [{"step": r["step"], "tokens": tokens_at(tokens, r["step"]),
                          "kl_own": r.get("monitor_kl_own"),
                          "content_share": r["monitor_content_share"]}
                         for r in lines if "monitor_content_share" in r]
    return out


def step_of(checkpoint: str, run: Path, init_from: str | None, kept: int) -> int:
    """The training step of the model a results file scored (see the module docstring):
    ``init_from`` is step 0, ``run`` itself step ``kept``."""
    path = Path(checkpoint).resolve()
    named = re.fullmatch(r"step-0*(\d+)", path.name)
    if named:
        return int(named.group(1))
    if init_from and path == Path(init_from).resolve():
        return 0
    if path == run.resolve():
        return kept
    raise ConfigError(f"{checkpoint} is not a step of {run}: score `mend export`ed steps "
                      f"(step-N), the run's init_from, or the run itself.")


def points(run: str | Path, results: Sequence[str | Path]) -> dict[str, list[dict[str, Any]]]:
    """``{set: [{"step", "tokens", "share", "content_gap", "score"}, ...]}``, by step."""
    run = Path(run)
    lines = run_metrics(run)
    tokens = tokens_read(lines)
    init_from = (yaml.safe_load((run / "config.yaml").read_text()) or {}).get("init_from")
    # The run's own model: the step selection kept or, with no selection, its last.
    kept = kept_step(lines)
    kept = max(tokens) if kept is None else kept
    sets: dict[str, list[dict[str, Any]]] = {}
    for path in map(Path, results):
        result = read_results(path)
        if "recovered_share" not in result:
            raise ConfigError(f"{path} has no recovered share: score it with "
                              f"references.zero_shot=... and references.icl=....")
        checkpoint = (result.get("models") or {}).get("checkpoint")
        if not checkpoint:
            raise ConfigError(f"{path} ({result.get('label')!r}) scored no checkpoint: a curve "
                              f"plots a training run's models.")
        step = step_of(checkpoint, run, init_from, kept)
        if step not in tokens:
            raise ConfigError(f"{run}/metrics.jsonl logged no line at step {step}: log every "
                              f"step that is saved (train.save_every a multiple of "
                              f"train.log_every).")
        sets.setdefault(path.parents[2].name, []).append({
            "step": step, "tokens": tokens[step], "share": result["recovered_share"]["share"],
            "content_gap": (result.get("content_gap") or {}).get("mean"),
            "score": result["results"]["average"]["score"]["mean"]})
    return {name: sorted(p, key=lambda p: p["step"]) for name, p in sets.items()}


def table(curves: dict[str, list[dict[str, Any]]]) -> str:
    """The curve's numbers as markdown: one row per set and step."""
    lines = ["| set | step | tokens read | score | recovered share | content gap |",
             "|---|---|---|---|---|---|"]
    for name, pts in curves.items():
        for p in pts:
            share = "–" if p["share"] is None else f"{100 * p['share']:.0f}%"
            gap = "–" if p["content_gap"] is None else f"{100 * p['content_gap']:+.1f}"
            lines.append(f"| {name} | {p['step']} | {p['tokens'] / 1e3:.1f}k | "
                         f"{100 * p['score']:.1f} | {share} | {gap} |")
    return "\n".join(lines) + "\n"


def held_out_table(controls: dict[str, list[dict[str, Any]]]) -> str:
    """:func:`held_out`'s numbers as markdown: one row per run and logged step."""
    lines = ["| run | step | tokens read | held-out KL, own | content share |",
             "|---|---|---|---|---|"]
    for name, pts in controls.items():
        for p in pts:
            kl = "–" if p["kl_own"] is None else f"{p['kl_own']:.4f}"
            lines.append(f"| {name} | {p['step']} | {p['tokens'] / 1e3:.1f}k | {kl} | "
                         f"{100 * p['content_share']:.1f}% |")
    return "\n".join(lines) + "\n"


def draw(run: str | Path, curves: dict[str, list[dict[str, Any]]], path: str | Path,
         controls: dict[str, list[dict[str, Any]]] | None = None) -> None:
    """The figure of the module docstring; ``controls`` (:func:`held_out` of the run and of
    the runs beside it) are drawn with it, each against the tokens it read."""
    run = Path(run)
    lines = run_metrics(run)
    tokens = tokens_read(lines)

    def at(step: int) -> float:
        return tokens_at(tokens, step) / 1e3

    controls = {k: v for k, v in (controls or {}).items() if v}
    evals = [r for r in lines if "eval_score" in r]
    panels = 1 + bool(controls) + bool(evals)
    plt = pyplot()
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.8), squeeze=False)
    ax = axes[0][0]
    for name, pts in curves.items():
        kept = [p for p in pts if p["share"] is not None]
        ax.plot([p["tokens"] / 1e3 for p in kept], [100 * p["share"] for p in kept], "-o",
                label=name)
    ax.axhline(100, color="k", ls=":", lw=0.8, label="ICL")
    ax.axhline(0, color="grey", ls=":", lw=0.8, label="zero-shot")
    ax.set(xlabel="tokens read (k)", ylabel="recovered share of ICL's gain (%)",
           title=f"{run.name}: held-out tasks")
    ax.legend(fontsize=8)
    if controls:
        ax = axes[0][1]
        for name, pts in controls.items():
            ax.plot([p["tokens"] / 1e3 for p in pts], [100 * p["content_share"] for p in pts],
                    "-o", label=name)
        ax.set(xlabel="tokens read (k)", ylabel="content share (% of KL_swap)",
               title="content controls (held-out text)")
        if len(controls) > 1:
            ax.legend(fontsize=8)
    if evals:
        ax = axes[0][-1]
        x = [at(r["step"]) for r in evals]
        ax.plot(x, [100 * r["eval_score"] for r in evals], "-o", label="own demos")
        if all("eval_swapped_score" in r for r in evals):
            ax.plot(x, [100 * r["eval_swapped_score"] for r in evals], "--s", color="grey",
                    label="swapped demos (control)")
        ax.set(xlabel="tokens read (k)", ylabel="selection score (%)",
               title="model selection (dev)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
