"""What a training run leaves to read: ``metrics.jsonl`` (one line per logged step),
``provenance.jsonl`` (one line per start or resume), ``loss.png``, and TensorBoard scalars.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate.utils import gather_object

from mend.counters import Counters, sum_counts
from mend.provenance import provenance


class Window:
    """Sums of the loss terms and tokens since the last log line."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.micro, self.tokens, self.start = 0, 0, time.perf_counter()

    def add(self, out: dict[str, torch.Tensor], tokens: int) -> None:
        """Add one micro-batch's loss terms, on their device: reading them here would stall a
        GPU every step (a host sync); :func:`log_record` reads them once per log line."""
        for k, v in out.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.micro += 1
        self.tokens += tokens


def log_record(accelerator, window: Window, scheduler, step: int, grad_norm, counters: Counters
               ) -> dict[str, Any]:
    """One log line: the window's mean loss terms over all processes, LR, gradient norm,
    the tokens read since the last line and the throughput (``steps_per_s`` counts
    micro-batches), and the data pipeline's counts."""
    keys = sorted(window.sums)
    local = torch.stack([window.sums[k].to(accelerator.device, torch.float64).reshape(())
                         / max(window.micro, 1) for k in keys]
                        + [torch.tensor(float(window.tokens), device=accelerator.device,
                                        dtype=torch.float64)])
    means = accelerator.reduce(local[:-1], "mean") if keys else local[:0]
    tokens = float(accelerator.reduce(local[-1:], "sum")[0])
    elapsed = time.perf_counter() - window.start
    record = {"step": step, **{k: float(v) for k, v in zip(keys, means)},
              "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
              "tokens": tokens, "tokens_per_s": tokens / elapsed,
              "steps_per_s": window.micro / elapsed,
              "time": time.time()}
    record["counts"] = sum_counts(gather_object([counters.counts]))
    window.reset()
    return record


def write_record(accelerator, output_dir: Path, record: dict[str, Any], tensorboard: bool
                 ) -> None:
    """Append one log line to ``metrics.jsonl`` (main process) and to TensorBoard."""
    if accelerator.is_main_process:
        with open(output_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
    if tensorboard:
        accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))},
                        step=record["step"])


def record_call(output_dir: Path, step: int, **resolved: Any) -> None:
    """Append this start (or resume) to ``provenance.jsonl``; the config is in config.yaml,
    and ``resolved`` adds what this start decided (e.g. the precision ``auto`` chose)."""

    with open(output_dir / "provenance.jsonl", "a") as f:
        record = {"start_step": step, **resolved, **provenance()}
        del record["config"]  # None here: config.yaml beside it holds the run's config
        f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The lines of a ``metrics.jsonl``, in order."""
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def kept_step(records: list[dict[str, Any]]) -> int | None:
    """The step whose weights a run kept: the first best ``eval_score``, as the loop keeps
    it; None where the run selected by none."""
    evals = [r for r in records if "eval_score" in r]
    return max(evals, key=lambda r: r["eval_score"])["step"] if evals else None


def truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines past the resumed step: a killed run may have logged beyond its
    last checkpoint, and those steps will be run (and logged) again."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(ln + "\n" for ln in kept))
        os.replace(tmp, path)


def plot_metrics(output_dir: str | Path) -> Path | None:
    """``loss.png``: every loss term of ``metrics.jsonl`` against the step, and, where the run
    logged the content controls (:mod:`mend.evaluation.diagnostics`), the held-out KL with own,
    swapped and no vectors beside it."""
    output_dir = Path(output_dir)
    path = output_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    import matplotlib  # lazy: slow to import; the curves are drawn once, at the end
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(path)
    content = [r for r in records if "monitor_kl_own" in r]
    evals = [r for r in records if "eval_score" in r]
    fig, axes = plt.subplots(1, 1 + bool(evals) + bool(content),
                             figsize=(5.5 * (1 + bool(evals) + bool(content)), 4),
                             squeeze=False)
    panels = iter(axes[0])
    ax = next(panels)
    terms = [k for k in ("distill", "pred", "clm", "reconstruct") if any(k in r for r in records)]
    # The total only where it is more than its one term (else the two lines are one).
    for k in (["loss"] if len(terms) != 1 else []) + terms:
        pts = [(r["step"], r[k]) for r in records if k in r]
        ax.plot(*zip(*pts), label="total loss" if k == "loss" else k, lw=1)
    ax.set(xlabel="step", ylabel="training loss (per log window)", title=output_dir.name)
    ax.legend(fontsize=8)
    if evals:  # model selection: the score with the task's own demonstrations and swapped
        ax = next(panels)
        steps = [r["step"] for r in evals]
        ax.plot(steps, [100 * r["eval_score"] for r in evals], "-o", label="own demos")
        if any("eval_swapped_score" in r for r in evals):
            ax.plot(steps, [100 * r.get("eval_swapped_score", float("nan")) for r in evals],
                    "--s", color="grey", label="swapped demos (control)")
        best = kept_step(evals)
        ax.axvline(best, color="k", ls=":", lw=0.8, label=f"kept: step {best}")
        ax.set(xlabel="step", ylabel="selection score (%)", title="model selection (dev)")
        ax.legend(fontsize=8)
    if content:
        ax = next(panels)
        steps = [r["step"] for r in content]
        for key, style, label in (("kl_own", "-o", "own vectors"),
                                  ("kl_swap", "-s", "another window's (control)"),
                                  ("kl_none", ":", "no vectors (control)")):
            ax.plot(steps, [r[f"monitor_{key}"] for r in content], style, label=label)
        share = [100 * r["monitor_content_share"] for r in content]
        ax.set(xlabel="step", ylabel="held-out KL (lower is better)",
               title=f"content controls (held-out text): content share "
                     f"{share[0]:.0f}% -> {share[-1]:.0f}%")
        ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(output_dir / "loss.png", dpi=120)
    plt.close(fig)
    return output_dir / "loss.png"


def train_cost(run: Path) -> str:
    """``"40 steps, 41.0k tokens, 5.1 min"``: a finished run's budget, summed from its
    ``metrics.jsonl`` (the rates :func:`log_record` logs) and ``config.yaml``."""
    config = yaml.safe_load((run / "config.yaml").read_text()) or {}
    accum = (config.get("train") or {}).get("grad_accum", 1)
    steps = tokens = seconds = 0.0
    last = 0
    for record in read_metrics(run / "metrics.jsonl"):
        if "steps_per_s" not in record:
            continue  # a model-selection line
        n = record["step"] - last
        last = record["step"]
        elapsed = n * accum / record["steps_per_s"]  # the rate counts micro-batches
        steps += n
        seconds += elapsed
        tokens += elapsed * record["tokens_per_s"]
    size = f"{tokens / 1e6:.2f}M" if tokens >= 1e6 else f"{tokens / 1e3:.1f}k"
    took = f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"
    return f"{int(steps)} steps, {size} tokens, {took}"


def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as TensorBoard's flat ``{"a.b": value}`` hyperparameters."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
