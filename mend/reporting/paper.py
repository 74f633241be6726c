"""The MEND paper's tables, rebuilt from a reproduction's results files.

    mend report docs/results                  # writes docs/results.md
    mend report docs/results --output X.md

Each folder under the results root that holds a ``report.yaml`` is one *setting* (a model
pair on one machine at one budget; ``configs/reproduce/*/run.sh`` writes them). Its layout:

- ``pretrain/``, ``pretrain-clm/``, ``<partition>/<run>/``: training runs (``config.yaml``,
  ``metrics.jsonl``, ``provenance.jsonl``, ``loss.png``);
- ``<partition>/eval/<name>/results.json``: evaluations, each with its provenance (config,
  checkpoint, git commit, machine);
- ``efficiency/inference-*.json``: the inference benchmark on the same models;
- ``report.yaml``: the setting's title, a description, and ``notes`` (the reasons behind
  what did not reproduce), quoted verbatim.

Every number in the report is read from those files; the training budget of each row is
summed from its runs' ``metrics.jsonl``; each claim of the paper is checked against the
numbers, and one that does not hold is reported as not reproduced.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mend.evaluation.harness import PERTURBATIONS
from mend.reporting import plots
from mend.reporting.controls import controls_section
from mend.reporting.results import fmt, provenance_summary, recovered
from mend.training.run_log import train_cost

MAIN_ROWS = (("zero-shot", "zero_shot"), ("PromptTuning", "prompt_tuning"),
             ("vanilla ICL", "icl"), ("HyperTuning", "hypertuning"), ("MEND", "mend"))
ABLATION_ROWS = (("MEND", "mend"), ("no pretraining", "mend-no-pretraining"),
                 ("CLM pretraining", "mend-clm-pretraining"),
                 ("MEND without L_pred", "mend-no-pred"),
                 ("MEND without L_distill", "mend-no-distill"))
BUDGET_PREFIXES = ("", "long-")
"""The MEND distillers of the training-budget table: the tables' own (no prefix) and one
trained longer, whose evaluations are named ``long-mend``, ``long-sweep-k-mend``, ..."""
ANALYSIS_PARTITION = "class_to_class"


@dataclass
class Claim:
    """One finding of the paper, checked on this setting's numbers."""

    text: str
    holds: bool | None
    evidence: str

    def row(self) -> str:
        verdict = {True: "reproduced", False: "**not reproduced**", None: "not run"}[self.holds]
        return f"| {self.text} | {verdict} | {self.evidence} |"


class Setting:
    """One reproduction's results folder."""

    def __init__(self, root: Path, link: str | None = None) -> None:
        self.root = root
        self.link = link or root.name
        """The folder as the report links to it (relative to the report's own folder)."""
        self.meta = yaml.safe_load((root / "report.yaml").read_text()) or {}
        self.partitions = sorted(p.parent.name for p in root.glob("*/eval"))
        self.claims: list[Claim] = []
        self._results: dict[tuple[str, str], dict[str, Any] | None] = {}

    # -- reading -----------------------------------------------------------------------------

    def result(self, partition: str, name: str) -> dict[str, Any] | None:
        """An evaluation's results.json, read once (every table and claim asks again)."""
        key = (partition, name)
        if key not in self._results:
            path = self.root / partition / "eval" / name / "results.json"
            self._results[key] = json.loads(path.read_text()) if path.is_file() else None
        return self._results[key]

    def score(self, partition: str, name: str) -> dict[str, float] | None:
        return _score(self.result(partition, name))

    def share(self, partition: str, name: str) -> str:
        """`` (share N%)``: a run's recovered share of ICL's gain, where both references ran."""
        run, zs, icl = (self.result(partition, n) for n in (name, "zero_shot", "icl"))
        share = recovered(run, zs, icl)["share"] if run and zs and icl else None
        return "" if share is None or name in ("zero_shot", "icl") else f" (share {share:.0%})"

    def alike(self, partition: str, method: str, like: dict[str, Any] | None
              ) -> dict[str, Any] | None:
        """The run of ``method`` scored on the same rows with the same K as ``like``: the
        main table's, or a point of its K sweep (analyses may score fewer rows)."""
        main = self.result(partition, method)
        sweep = self.result(partition, f"sweep-k-{method}")
        if like is None:
            return main
        for run in [main, *(sweep["runs"] if sweep else [])]:
            if run and run["data"]["limit"] == like["data"]["limit"] and run["k"] == like["k"]:
                return run
        return None

    def run_dir(self, path: str | None) -> Path | None:
        """The published copy of a training run named by its original path (a checkpoint or
        ``init_from``): the longest tail of the path that exists under this setting."""
        if not path:
            return None
        parts = Path(path).parts
        for i in range(len(parts)):
            candidate = self.root.joinpath(*parts[i:])
            if (candidate / "metrics.jsonl").is_file():
                return candidate
        return None

    def budget(self, result: dict[str, Any] | None) -> str:
        """The training behind one evaluation: each stage's steps, tokens and time."""
        if result is None:
            return "–"
        run = self.run_dir(result["models"].get("checkpoint"))
        if run is None:
            return "no training"
        stages = []
        config = yaml.safe_load((run / "config.yaml").read_text()) or {}
        first = self.run_dir(config.get("init_from"))
        if first is not None:
            stages.append(f"S1 {train_cost(first)}")
        stages.append(f"S2 {train_cost(run)}")
        return " + ".join(stages)

    # -- tables ------------------------------------------------------------------------------

    def main_table(self) -> str:
        head = ["method", *self.partitions, "training (per partition)"]
        lines = _header(head)
        for label, name in MAIN_ROWS:
            cells = [_with_gap(self.result(p, name)) + self.share(p, name)
                     for p in self.partitions]
            budgets = "; ".join(f"{_short(p)}: {self.budget(self.result(p, name))}"
                                for p in self.partitions)
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {budgets} |")
        for p in self.partitions:
            mend = self.score(p, "mend")
            for label, name in MAIN_ROWS[:-1]:
                # The paper's claim against ICL is parity at a fraction of the cost.
                verb = "matches or beats" if name == "icl" else "beats"
                self._compare(f"MEND {verb} {label} on {p}", mend, self.score(p, name),
                              within=name == "icl")
        return "\n".join(lines)

    def ablation_table(self) -> str:
        p = ANALYSIS_PARTITION
        variants = {name: self.result(p, name) for _, name in ABLATION_ROWS[1:]}
        like = next((r for r in variants.values() if r), None)
        runs = {"mend": self.alike(p, "mend", like), **variants}
        lines = _header(["variant", f"{p} ({_rows(like)})", "training"])
        for label, name in ABLATION_ROWS:
            lines.append(f"| {label} | {_with_gap(runs[name])} | {self.budget(runs[name])} |")
        for label, name in ABLATION_ROWS[1:]:
            self._compare(f"MEND beats its ablation '{label}' on {p}", _score(runs["mend"]),
                          _score(runs[name]))
        return "\n".join(lines)

    def sweep_tables(self) -> str:
        """The K sweep (ICL and MEND) and the l sweep (MEND), tables plus one plot each."""

        p, out = ANALYSIS_PARTITION, []
        for key, names in (("k", ("sweep-k-icl", "sweep-k-mend")), ("l", ("sweep-l-mend",))):
            found = [(n, r) for n, r in ((n, self.result(p, n)) for n in names) if r]
            if not found:
                out.append(f"The {key} sweep was not run.")
                continue
            labels = found[0][1]["sweep"]["labels"]
            lines = _header([f"{key} =", *labels])
            means = {}
            for name, r in found:
                means[_method_of(name)] = [run["results"]["average"]["score"] for run in r["runs"]]
                lines.append(f"| {_method_of(name)} | "
                             + " | ".join(fmt(s) for s in means[_method_of(name)]) + " |")
            figure = self.root / f"sweep-{key}.png"
            plots.sweep([r for _, r in found], figure)
            out.append("\n".join(lines) + f"\n\n![{key} sweep]({self.link}/{figure.name})")
            if len(means.get("MEND", [])) > 1:
                s = means["MEND"]
                self._compare(f"MEND improves from {key} = {labels[0]} to {key} = {labels[-1]}",
                              s[-1], s[0])
        return "\n\n".join(out)

    def analysis_table(self) -> str:
        p = ANALYSIS_PARTITION
        rows = [(kind.replace("_", " "), f"perturb-{kind}-icl", f"perturb-{kind}-mend")
                for kind in PERTURBATIONS[1:]]
        rows += [("BM25-retrieved demonstrations", "retrieval-bm25-icl", "retrieval-bm25-mend")]
        found = [self.result(p, name) for _, *names in rows for name in names]
        like = next((r for r in found if r), None)
        base = _score(self.alike(p, "icl", like)), _score(self.alike(p, "mend", like))
        lines = _header(["demonstrations", "vanilla ICL", "MEND", "ICL change", "MEND change"])
        lines.append(f"| gold (random, {_rows(like)}) | {fmt(base[0])} | {fmt(base[1])} | | |")
        for label, icl, mend in rows:
            scores = self.score(p, icl), self.score(p, mend)
            deltas = [_delta(s, b) for s, b in zip(scores, base)]
            lines.append(f"| {label} | {fmt(scores[0])} | {fmt(scores[1])} | "
                         + " | ".join(map(_points, deltas)) + " |")
            if None in deltas:
                self.claims.append(Claim(f"MEND moves like ICL with {label}", None, "–"))
            else:
                # No change is no direction: a MEND that ignores its demonstrations does not
                # move like an ICL that gains or loses (compared as the table rounds them).
                same = _sign(deltas[0]) == _sign(deltas[1])
                self.claims.append(Claim(
                    f"MEND moves like ICL with {label}", same,
                    f"ICL {deltas[0]:+.1f}, MEND {deltas[1]:+.1f} points"))
        return "\n".join(lines)

    def efficiency_table(self) -> str:
        files = sorted((self.root / "efficiency").glob("inference-*.json"))
        if not files:
            return "The inference benchmark was not run."
        bench = json.loads(files[0].read_text())
        lines = _header(["K", "method", "LLM GFLOPs/query", "with distiller (amortised)",
                         "vs ICL (LLM / with distiller)", "peak MB", "peak vs ICL",
                         "latency s", "queries/s"])
        for r in bench["rows"]:
            total = (r["llm_flops"] + r["distiller_flops"]) / 1e9
            lines.append(f"| {r['k']} | {r['method']} | {r['llm_flops'] / 1e9:.2f} | "
                         f"{total:.2f} | {r['flops_vs_icl']:.3f} / {r['total_flops_vs_icl']:.3f}"
                         f" | {r['peak_mb']:.1f} | {r['peak_vs_icl']:.3f} | "
                         f"{r['latency_s']:.3f} | {r['qps']:.2f} |")
        for r in bench["rows"]:
            if r["method"] == "mend" and r["k"] >= 4:
                self.claims.append(Claim(
                    f"MEND's FLOPs per query, distiller included, are below ICL's at "
                    f"K = {r['k']}", r["total_flops_vs_icl"] < 1,
                    f"{r['total_flops_vs_icl']:.3f}x ICL's ({r['flops_vs_icl']:.3f}x for the "
                    f"LLM alone)"))
                self.claims.append(Claim(
                    f"MEND's peak inference memory is below ICL's at K = {r['k']}",
                    r["peak_vs_icl"] < 1, f"{r['peak_vs_icl']:.3f}x ICL's"))
        machine = bench["provenance"]["machine"]
        return ("\n".join(lines) + f"\n\nFrom `{self.link}/efficiency/{files[0].name}` "
                f"({machine['device']}, {machine['torch_threads']} threads).")

    def budget_table(self) -> str:
        """MEND's distillers at each stage-2 budget, on what shows whether the vectors depend
        on the demonstrations: the seed std, the K sweep and wrong labels."""
        p = ANALYSIS_PARTITION
        lines = _header(["training", "main rows", "analysis rows, K = 4", "K = 1 → 4",
                         "wrong labels"])
        for prefix in BUDGET_PREFIXES:
            main, sweep = self.result(p, f"{prefix}mend"), self.result(p, f"{prefix}sweep-k-mend")
            if main is None:
                continue
            runs = {run["k"]: run for run in sweep["runs"]} if sweep else {}
            k4, k1 = _score(runs.get(4)), _score(runs.get(1))
            wrong = _delta(self.score(p, f"{prefix}perturb-wrong_label-mend"), k4)
            lines.append(f"| {self.budget(main)} | {fmt(_score(main))} | {fmt(k4)} | "
                         f"{_points(_delta(k4, k1))} | {_points(wrong)} |")
        if len(lines) == 2:
            return "The budget comparison was not run."
        return "\n".join(lines)

    def per_task_tables(self) -> str:
        out = []
        for p in self.partitions:
            results = [(label, self.result(p, name)) for label, name in MAIN_ROWS]
            results = [(label, r) for label, r in results if r]
            tasks = sorted({t for _, r in results for t in r["results"]["tasks"]})
            lines = _header(["task", *[label for label, _ in results]])
            for t in tasks:
                lines.append(f"| {t} | " + " | ".join(
                    fmt(r["results"]["tasks"].get(t, {}).get("score")) for _, r in results)
                    + " |")
            out.append(f"**{p}**\n\n" + "\n".join(lines))
        return "\n\n".join(out)

    def training_curves(self) -> str:
        runs = sorted(self.root.glob("**/loss.png"))
        return "\n".join(f"- `{run.parent.relative_to(self.root)}`: "
                         f"![loss]({self.link}/{run.relative_to(self.root)})"
                         for run in runs) or "No training curves."

    def _compare(self, text: str, a: dict | None, b: dict | None, within: bool = False) -> None:
        """``a`` beats ``b`` (with ``within``: or is within one std of it)."""
        if a is None or b is None:
            self.claims.append(Claim(text, None, "–"))
            return
        diff = (a["mean"] - b["mean"]) * 100
        noise = max(a["std"], b["std"]) * 100
        holds = diff > 0 or (within and -diff <= noise)
        note = " (within one std)" if abs(diff) <= noise else ""
        self.claims.append(Claim(text, holds, f"{diff:+.1f} points{note}"))

    # -- the whole report --------------------------------------------------------------------

    def render(self) -> str:
        sections = [
            ("1. Main results (the paper's Table 2)",
             "Score in % (macro-F1 for classification, accuracy otherwise), mean ± std over "
             "seeds; *gap*: the content gap, own minus another task's demonstrations (the "
             "swap control), where it was run; *share*: the recovered share of ICL's gain "
             "over zero-shot.", self.main_table()),
            ("2. Ablations (the paper's Table 4)", "", self.ablation_table()),
            ("3. K and l sweeps (the paper's Figure 4)", "", self.sweep_tables()),
            ("4. Perturbations and retrieval (the paper's Table 3)",
             "Change: points against the same method with gold, randomly chosen "
             "demonstrations.", self.analysis_table()),
            ("5. Efficiency (the paper's Figure 3)", "", self.efficiency_table()),
            ("6. Training budget",
             f"MEND on {ANALYSIS_PARTITION} after each stage-2 budget (the same stage 1). "
             "A distiller that reads its demonstrations gains from K = 1 to K = 4 and loses "
             "with wrong labels; K = 1 → 4 and wrong labels are changes in points.",
             self.budget_table()),
        ]
        parts = [f"## {self.meta.get('title', self.root.name)}", "",
                 str(self.meta.get("description", "")).strip(), "",
                 provenance_summary(self.root, self.link), ""]
        controls = controls_section(self.root, self.link)
        if controls:
            parts += ["### 0. Does MEND carry its demonstrations? (the content controls)", "",
                      controls, ""]
        for title, intro, body in sections:
            parts += [f"### {title}", "", *([intro, ""] if intro else []), body, ""]
        held = sum(c.holds is True for c in self.claims)
        checked = sum(c.holds is not None for c in self.claims)
        unrun = len(self.claims) - checked
        parts += ["### The paper's claims at this scale", "",
                  f"{held} of the {checked} checks that could be made hold"
                  + (f"; {unrun} could not be made (their runs are missing)." if unrun else "."),
                  "",
                  "| claim | verdict | evidence |", "|---|---|---|",
                  *[c.row() for c in self.claims], ""]
        if self.meta.get("notes"):
            parts += ["### Why", "", str(self.meta["notes"]).strip(), ""]
        parts += ["### Evidence: per-task scores", "", self.per_task_tables(), "",
                  "### Evidence: training curves", "", self.training_curves(), ""]
        return "\n".join(parts)

def _header(names) -> list[str]:
    return ["| " + " | ".join(map(str, names)) + " |", "|" + "---|" * len(names)]


def _short(partition: str) -> str:
    return {"class_to_class": "c2c", "non_nli_to_nli": "nli", "hr_to_lr": "hr→lr"}.get(
        partition, partition)


def _method_of(name: str) -> str:
    return "MEND" if name.endswith("mend") else "vanilla ICL"


def _with_gap(result: dict[str, Any] | None) -> str:
    gap = (result or {}).get("content_gap")
    return fmt(_score(result)) + (f" (gap {gap['mean'] * 100:+.1f})" if gap else "")


def _score(result: dict[str, Any] | None) -> dict[str, float] | None:
    return result["results"]["average"]["score"] if result else None


def _rows(result: dict[str, Any] | None) -> str:
    if result is None:
        return "not run"
    limit = result["data"]["limit"]
    return f"first {limit} rows per task" if limit else "all rows"


def _sign(delta: float) -> int:
    shown = round(delta, 1)
    return (shown > 0) - (shown < 0)


def _points(delta: float | None) -> str:
    return "–" if delta is None else f"{delta:+.1f}"


def _delta(score: dict | None, base: dict | None) -> float | None:
    return None if score is None or base is None else (score["mean"] - base["mean"]) * 100
