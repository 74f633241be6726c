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
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for ax, (title, values) in zip(axes, panels):
        ax.bar(names, values, color=["#999999", "#4477aa", "#cc6677", "#228833"][:len(names)])
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle(f"{result['task']}, k={result['k']}, batch size 1 ({result['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def demo(table: list[dict[str, Any]], even: dict[str, dict[str, dict[str, int | None]]],
          k: int, path: Path) -> None:
    """Accuracy (own and swapped demonstrations), per-query FLOPs, latency and peak memory,
    and the total FLOPs of n queries, where the break-even points are."""
    plt = pyplot()
    names = [r["method"].replace(" (", "\n(").replace(" + ", "\n+ ") for r in table]
    colors = ["#999999", "#4477aa", "#66ccee", "#ccbb44", "#ee6677", "#228833",
              "#aa3377"][:len(table)]
    fig, axes = plt.subplots(1, 5, figsize=(20, 3.8))
    own = [r["accuracy"] * 100 for r in table]
    swapped = [(r["swapped_accuracy"] or 0) * 100 for r in table]
    x = range(len(table))
    axes[0].bar([i - 0.2 for i in x], own, 0.4, color=colors, label="own demos")
    axes[0].bar([i + 0.2 for i in x], swapped, 0.4, color=colors, alpha=0.4,
                label="swapped demos")
    axes[0].legend(fontsize=7)
    panels = [("accuracy (%)", None),
              ("GFLOPs per query", [r["per_query"]["flops"] / 1e9 for r in table]),
              ("ms per query", [r["per_query"]["seconds"] * 1e3 for r in table]),
              ("peak MB per query (+ KV cache)",
               [(r["per_query"]["peak_bytes"] + r["per_query"]["cache_bytes"]) / 2**20
                for r in table])]
    for ax, (title, values) in zip(axes, panels):
        if values is not None:
            ax.bar(x, values, color=colors)
        ax.set_xticks(list(x), names, fontsize=7)
        ax.set_title(title)
    ax = axes[4]
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
    ax.set_title("total GFLOPs (dotted: break-even)")
    ax.legend(fontsize=7)
    fig.suptitle(f"mend demo: built-in tasks, k = {k}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
