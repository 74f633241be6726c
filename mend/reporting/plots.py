"""Every figure mend draws from its results, with matplotlib (headless): a sweep's scores
(``sweep.png``), the efficiency table (``efficiency.png``) and the demo (``demo.png``). The
training curves (``loss.png``) are the training log's own (:mod:`mend.training.run_log`), since
the loop draws them and training sits below reporting."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display on a server or in CI)."""
    import matplotlib  # lazy: drawing is the last step of a job, and matplotlib is slow to import
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def sweep(results: list[dict[str, Any]], path: str | Path) -> None:
    """The partition average against the swept value, one line per results file."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for result in results:
        labels = result["sweep"]["labels"]
        means = [r["results"]["average"]["score"]["mean"] * 100 for r in result["runs"]]
        stds = [r["results"]["average"]["score"]["std"] * 100 for r in result["runs"]]
        ax.errorbar(range(len(labels)), means, yerr=stds, marker="o", capsize=3,
                    label=result["label"])
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(result["sweep"]["key"])
    ax.set_ylabel("average score (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def efficiency(result: dict[str, Any], path: Path) -> None:
    """Per-query GFLOPs, peak memory and time of each method (``mend efficiency``)."""
    plt = pyplot()
    rows = result["methods"]
    names = [r["method"] for r in rows]
    panels = [("GFLOPs per query", [r["flops"] / 1e9 for r in rows]),
              ("peak memory (MiB)", [r["peak_bytes"] / 2**20 for r in rows]),
              ("time per query (ms)", [r["seconds"] * 1e3 for r in rows])]
    colors = (["#999999", "#4477aa", "#cc6677", "#228833", "#ccbb44", "#66ccee"]
              * 2)[:len(names)]
    y = list(range(len(names)))[::-1]  # the first method at the top, its name in full
    fig, axes = plt.subplots(1, 3, figsize=(13, 1.6 + 0.45 * len(names)))
    for column, (ax, (title, values)) in enumerate(zip(axes, panels)):
        # A count that failed (NaN, see count_flops) is drawn as no bar and labelled n/a.
        drawn = [v if math.isfinite(v) else 0.0 for v in values]
        ax.barh(y, drawn, color=colors)
        ax.set_yticks(y, names if column == 0 else [""] * len(y), fontsize=9)
        ax.set_xlim(0, 1.18 * max(drawn, default=0) or 1)
        for i, value, bar in zip(y, values, drawn):
            ax.text(bar, i, f" {value:.3g}" if math.isfinite(value) else " n/a",
                    va="center", fontsize=8)
        ax.set_title(title)
    fig.suptitle(f"{result['task']}, k={result['k']}, batch size 1 ({result['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def demo(table: list[dict[str, Any]], even: dict[str, dict[str, dict[str, int | None]]],
          k: int, path: Path) -> None:
    """The demo in two rows: accuracy with each method's own demonstrations beside its swap
    control (zero-shot and ICL as reference lines), and the total FLOPs of n queries with the
    break-even points; then per query GFLOPs, ms and peak memory. Methods are rows of
    horizontal bars, named in full, in the table's order."""
    plt = pyplot()
    names = [r["method"] for r in table]
    colors = ["#999999", "#4477aa", "#66ccee", "#ccbb44", "#ee6677", "#aa3377", "#bbbbbb",
              "#332288", "#228833", "#117733"]
    colors = (colors * 2)[:len(table)]
    y = list(range(len(table)))[::-1]  # the first method at the top
    fig = plt.figure(figsize=(15, 3.2 + 0.55 * len(table)))
    grid = fig.add_gridspec(2, 3, height_ratios=[1.3, 1])
    ax = fig.add_subplot(grid[0, :2])
    own = [r["accuracy"] * 100 for r in table]
    swapped = [(r["swapped_accuracy"] or float("nan")) * 100 for r in table]
    ax.barh([i + 0.2 for i in y], own, 0.4, color=colors, label="own demonstrations")
    ax.barh([i - 0.2 for i in y], swapped, 0.4, color=colors, alpha=0.35, hatch="//",
            label="another task's demonstrations (swap control)")
    for i, value in zip(y, own):
        ax.text(value + 0.5, i + 0.2, f"{value:.1f}", va="center", fontsize=8)
    rows = {r["method"]: r for r in table}
    for label, style in (("zero-shot", ":"), ("ICL + KV cache", "--")):
        if label in rows:
            ax.axvline(rows[label]["accuracy"] * 100, color="k", ls=style, lw=1,
                       label=f"{label}: {rows[label]['accuracy'] * 100:.1f}")
    ax.set_yticks(y, names, fontsize=9)
    ax.set_xlim(0, 105)
    ax.set_xlabel("accuracy (%)")
    ax.set_title("accuracy on the built-in tasks")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4,
              frameon=False)
    ax = fig.add_subplot(grid[0, 2])
    points = [v["flops"] for against in even.values() for v in against.values()
              if v["flops"] and not math.isnan(v["flops"])]
    n = max([10] + [2 * p for p in points])
    queries = range(0, n + 1)
    for r, color in zip(table, colors):
        once, q = r["once"]["flops"], r["per_query"]["flops"]
        ax.plot(queries, [(once + i * q) / 1e9 for i in queries], color=color, label=r["method"])
    for point in points:
        ax.axvline(point, color="k", ls=":", lw=0.8)
    ax.set_xlabel("queries served by one demonstration set")
    ax.set_ylabel("GFLOPs in all")
    ax.set_title("total cost (dotted: break-even)")
    ax.legend(fontsize=7)
    panels = [("GFLOPs per query", [r["per_query"]["flops"] / 1e9 for r in table]),
              ("ms per query (median)", [r["per_query"]["seconds"] * 1e3 for r in table]),
              ("peak MB per query, KV cache included",
               [(r["per_query"]["peak_bytes"] + r["per_query"]["cache_bytes"]) / 2**20
                for r in table])]
    for column, (title, values) in enumerate(panels):
        ax = fig.add_subplot(grid[1, column])
        ax.barh(y, values, color=colors)
        ax.set_xlim(0, 1.18 * max([v for v in values if not math.isnan(v)], default=1))
        ax.set_yticks(y, names if column == 0 else [""] * len(y), fontsize=8)
        ax.set_title(title, fontsize=10)
        for i, value in zip(y, values):
            ax.text(value, i, f" {value:.3g}", va="center", fontsize=7)
    fig.suptitle(f"mend demo: built-in tasks, k = {k} demonstrations")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
