"""One table of the content controls across training runs: which choice made the vectors carry
their demonstrations, at what training cost.

    mend controls out/ablate/paper out/ablate/kv --reference out/ablate/icl-demo/results.json

Each run is a training output directory. Its row reads, from files the run wrote:

- what sets it apart (``config.yaml``: the output mode, projection, norm, objective weights,
  LR multipliers), and its training budget (steps, tokens, time, from ``metrics.jsonl``);
- its last content controls on held-out text (the ``monitor_*`` lines of ``metrics.jsonl``);
- with ``<run>/eval-demo/results.json`` (an evaluation of the run's checkpoint with the swap
  control), its task-level content gap, beside the reference's (ICL's) gap, and, given
  zero-shot on the same tasks too, its recovered share of ICL's gain.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from mend.errors import ConfigError
from mend.reporting.results import fmt, recovered
from mend.training.run_log import read_metrics, train_cost


def last_controls(run: Path) -> dict[str, float] | None:
    """The last content controls a run logged (None when it logged none)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = [r for r in read_metrics(path) if "monitor_kl_own" in r]
    if not rows:
        return None
    return {"step": rows[-1]["step"], **{k[len("monitor_"):]: v for k, v in rows[-1].items()
                                         if k.startswith("monitor_")}}


def recipe(run: Path) -> str:
    """What a run's config sets that matters to the content controls, in a few words."""
    cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
    model, objective = cfg.get("model", {}), cfg.get("objective", {})
    parts = [f"output {model.get('output', 'embeddings')}"]
    if model.get("output", "embeddings") == "embeddings":
        parts.append(f"projection {model.get('projection', 'auto')}")
        if model.get("vector_norm", "none") != "none":
            parts.append(f"norm {model['vector_norm']}")
    parts.append(f"init {model.get('placeholder_init', 'random')}")
    weights = {k: v for k, v in objective.items()
               if k in ("distill", "pred", "clm", "reconstruct") and v}
    parts.append(" + ".join(f"{v:g}·{k}" for k, v in weights.items()))
    multipliers = (cfg.get("train") or {}).get("lr_multipliers") or {}
    if multipliers:
        parts.append("lr × " + ", ".join(f"{k} {v:g}" for k, v in multipliers.items()))
    return "; ".join(parts)


def table(runs: Sequence[str | Path], reference: str | Path | None = None,
          zero_shot: str | Path | None = None) -> str:
    """The markdown table (see the module docstring). With both the ``reference`` (ICL) and
    ``zero_shot`` results on the same tasks, each run's recovered share of ICL's gain."""
    ref = json.loads(Path(reference).read_text()) if reference else None
    zs = json.loads(Path(zero_shot).read_text()) if zero_shot else None
    head = ["run", "recipe", "budget", "KL own", "KL swap", "KL none", "content gain",
            "share of KL_swap", "own beats swap", "task content gap", "recovered share"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in map(Path, runs):
        if not (run / "config.yaml").is_file():
            raise ConfigError(f"{run} is not a training output directory (no config.yaml).")
        c = last_controls(run)
        gap = _gap(run / "eval-demo" / "results.json")
        cells = ([f"{c['kl_own']:.3f}", f"{c['kl_swap']:.3f}", f"{c['kl_none']:.3f}",
                  f"{c['content_gain']:+.3f}", f"{100 * c['content_share']:+.1f}%",
                  f"{100 * c['own_beats_swap']:.0f}%"] if c else ["–"] * 6)
        share = _share(run / "eval-demo" / "results.json", zs, ref)
        lines.append(f"| {run.name} | {recipe(run)} | {train_cost(run)} | "
                     + " | ".join(cells) + f" | {gap} | {share} |")
    if ref is not None:
        lines.append(f"| {ref.get('label', 'reference')} (reference) | reads the demonstrations "
                     f"| – | – | – | – | – | – | – | {_gap(Path(reference))} | 100% |")
    return "\n".join(lines) + "\n"


def _gap(path: Path) -> str:
    """A results file's content gap in points, with its own and swapped scores."""
    if not path.is_file():
        return "not run"
    r: dict[str, Any] = json.loads(path.read_text())
    if not r.get("content_gap"):
        return "–"
    own, swapped = r["results"]["average"]["score"], r["swapped"]["average"]["score"]
    return (f"{r['content_gap']['mean'] * 100:+.1f} ({fmt(own)} own, "
            f"{fmt(swapped)} swapped)")


def _share(path: Path, zero_shot: dict[str, Any] | None, icl: dict[str, Any] | None) -> str:
    """A results file's recovered share of ICL's gain (– without the references or results)."""
    if zero_shot is None or icl is None or not path.is_file():
        return "–"
    share = recovered(json.loads(path.read_text()), zero_shot, icl)["share"]
    return "–" if share is None else f"{share * 100:.0f}%"


def controls_section(root: Path, link: str) -> str:
    """The content controls of a results setting, for ``mend report``: the stage-1 ablation
    (``ablate/<variant>/``, with ICL on the demo tasks as ``ablate/icl-demo``), the controls
    each training run logged, and ``diagnose/diagnose.json`` of the shipped distiller. Empty
    when the setting has none of them."""
    parts = []
    ablate = root / "ablate"
    variants = sorted(p for p in ablate.glob("*") if (p / "config.yaml").is_file())
    if variants:
        ref = ablate / "icl-demo" / "results.json"
        zs = ablate / "zero-shot-demo" / "results.json"
        parts += ["**Stage-1 ablation** (equal steps; controls on held-out WikiText-2 test "
                  "windows; task content gap on the demo's four unseen tasks, K = 16, "
                  "macro-F1 points):", "", table(variants, ref if ref.is_file() else None,
                                                 zs if zs.is_file() else None)]
    runs = sorted(p.parent for p in root.glob("**/metrics.jsonl")
                  if "ablate" not in p.parts and last_controls(p.parent))
    if runs:
        parts += ["**The runs' last held-out controls:**", "", table(runs)]
    diagnose = root / "diagnose" / "diagnose.json"
    if diagnose.is_file():
        d = json.loads(diagnose.read_text())
        parts += [f"**`mend diagnose {d['checkpoint']}`** on {d['windows']} held-out windows: "
                  f"KL own {d['kl_own']:.3f}, swapped {d['kl_swap']:.3f}, none "
                  f"{d['kl_none']:.3f}; content gain {d['content_gain']:.3f} "
                  f"({100 * d['content_share']:.1f}% of KL_swap), own beats swapped on "
                  f"{100 * d['own_beats_swap']:.0f}% of windows.", ""]
    curves = [p for p in variants if (p / "loss.png").is_file()]
    if curves:
        parts += ["Curves (loss, and held-out KL own / swapped / none): " + ", ".join(
            f"[{p.name}]({link}/{p.relative_to(root)}/loss.png)" for p in curves), ""]
    return "\n".join(parts).strip()
