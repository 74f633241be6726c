"""`mend report`: the paper's tables from a reproduction's results files."""

import json

import pytest
import yaml

from mend.cli import main as cli
from mend.errors import ConfigError
from mend.evaluation.harness import TaskResult, aggregate
from mend.reporting.paper import Setting
from mend.reporting.report import build


def _result(root, partition, name, scores, checkpoint=None, sweep=None, limit=8):
    """A results.json as `mend eval` writes it: ``scores`` maps seed -> task score (a sweep:
    one such map per K in ``sweep``)."""
    def one(per_seed, k=4):
        rows = [TaskResult("task-a", seed, [], [], {"score": s, "macro_f1": s, "accuracy": s})
                for seed, s in per_seed.items()]
        return {"label": name, "k": k, "data": {"limit": limit},
                "models": {"checkpoint": checkpoint}, "results": aggregate(rows)}
    result = ({"sweep": {"key": "context.k", "labels": [str(v) for v in sweep]},
               "runs": [one(s, k) for s, k in zip(scores, sweep)], "label": name}
              if sweep else one(scores))
    result["provenance"] = {"config": {"checkpoint": checkpoint},
                            "git": {"commit": "abc1234567890", "dirty": False},
                            "machine": {"device": "cpu", "torch_threads": 2}}
    path = root / partition / "eval" / name / "results.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(result))


def _run(root, rel, records, init_from=None, grad_accum=1):
    run = root / rel
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"init_from": init_from,
                                                     "train": {"grad_accum": grad_accum}}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def setting(tmp_path):
    root = tmp_path / "results" / "cpu"
    root.mkdir(parents=True)
    (root / "report.yaml").write_text("title: Tiny setting\nnotes: Too few steps.\n")
    # Stage 1: logged every 2 steps at 0.5 micro-batches/s and 100 tokens/s, so each window
    # is 4 s and 400 tokens: 4 steps, 800 tokens, 8 s in all. Stage 2 accumulates 2
    # micro-batches per step: 3 steps at 1 micro-batch/s is 6 s, at 50 tokens/s 300 tokens.
    _run(root, "pretrain", [{"step": 2, "steps_per_s": 0.5, "tokens_per_s": 100.0},
                            {"step": 4, "steps_per_s": 0.5, "tokens_per_s": 100.0}])
    _run(root, "class_to_class/mend",
         [{"step": 3, "steps_per_s": 1.0, "tokens_per_s": 50.0}, {"step": 3, "eval_score": 1}],
         init_from="out/reproduce/cpu/pretrain", grad_accum=2)
    for name, seeds in {"zero_shot": {100: 0.30, 13: 0.40}, "icl": {100: 0.50, 13: 0.50},
                        "prompt_tuning": {100: 0.32, 13: 0.34},
                        "hypertuning": {100: 0.36, 13: 0.36},
                        }.items():
        _result(root, "class_to_class", name, seeds)
    _result(root, "class_to_class", "mend", {100: 0.45, 13: 0.47},
            checkpoint="out/reproduce/cpu/class_to_class/mend")
    # The analyses score 4 rows per task: their baselines are the K sweep's K = 4 points.
    for name, seeds in {"mend-no-pretraining": {100: 0.50, 13: 0.60},
                        "perturb-no_label-icl": {100: 0.40, 13: 0.40},
                        "perturb-no_label-mend": {100: 0.44, 13: 0.44},
                        "perturb-no_input-icl": {100: 0.60, 13: 0.60},
                        "perturb-no_input-mend": {100: 0.46, 13: 0.46}}.items():
        _result(root, "class_to_class", name, seeds, limit=4)
    _result(root, "class_to_class", "sweep-k-mend", [{100: 0.40, 13: 0.40},
                                                     {100: 0.46, 13: 0.46}],
            checkpoint="out/reproduce/cpu/class_to_class/mend", sweep=[1, 4], limit=4)
    _result(root, "class_to_class", "sweep-k-icl", [{100: 0.30, 13: 0.30},
                                                    {100: 0.50, 13: 0.50}], sweep=[1, 4],
            limit=4)
    bench = {"rows": [{"k": 16, "method": m, "llm_flops": f, "distiller_flops": d,
                       "flops_vs_icl": f / 8e9, "total_flops_vs_icl": (f + d) / 8e9,
                       "peak_mb": p, "peak_vs_icl": p / 40.0, "latency_s": 0.1, "qps": 10.0}
                      for m, f, d, p in (("icl", 8e9, 0, 40.0), ("mend", 1e9, 0.5e9, 10.0))],
             "provenance": {"machine": {"device": "cpu", "torch_threads": 2}}}
    (root / "efficiency").mkdir()
    (root / "efficiency" / "inference-cpu.json").write_text(json.dumps(bench))
    return root


def test_main_table_scores_and_budget_come_from_the_files(setting):
    table = Setting(setting).main_table()
    # MEND: mean of 45 and 47 is 46.0; the std over seeds of per-seed averages is 1.0.
    assert "| MEND | 46.0 ± 1.0 (share 73%) |" in table  # (46 - 35) / (50 - 35)
    assert "| zero-shot | 35.0 ± 5.0 |" in table
    assert ("S1 4 steps, 0.8k tokens, 8 s + S2 3 steps, 0.3k tokens, 6 s" in table)
    assert "| vanilla ICL | 50.0 ± 0.0 | c2c: no training |" in table


def test_claims_are_checked_against_the_numbers(setting):
    s = Setting(setting)
    s.main_table(), s.ablation_table(), s.analysis_table(), s.efficiency_table()
    verdicts = {c.text: (c.holds, c.evidence) for c in s.claims}
    assert verdicts["MEND beats zero-shot on class_to_class"] == (True, "+11.0 points")
    # 46 vs ICL's 50 is 4 points below, beyond one std (1.0): ICL is not matched.
    assert verdicts["MEND matches or beats vanilla ICL on class_to_class"] == (False,
                                                                             "-4.0 points")
    # The ablation (4 rows per task) is compared with MEND's K = 4 sweep point (46), not with
    # the main table's 8-row run.
    assert verdicts["MEND beats its ablation 'no pretraining' on class_to_class"] == (
        False, "-9.0 points")
    assert verdicts["MEND beats its ablation 'CLM pretraining' on class_to_class"] == (None, "–")
    # no label: ICL 50 -> 40 (-10), MEND 46 -> 44 (-2): the same direction.
    assert verdicts["MEND moves like ICL with no label"] == (True, "ICL -10.0, MEND -2.0 points")
    # no input: ICL +10, MEND unchanged: not the same direction.
    assert verdicts["MEND moves like ICL with no input"] == (False, "ICL +10.0, MEND +0.0 points")
    assert verdicts["MEND's FLOPs per query, distiller included, are below ICL's at K = 16"][0]


def test_report_command_writes_markdown_and_plots(setting, capsys):
    assert cli(["report", str(setting.parent)]) == 0
    text = (setting.parent.with_suffix(".md")).read_text()
    for heading in ("Main results", "Ablations", "K and l sweeps", "Perturbations",
                    "Efficiency", "Training budget", "claims at this scale",
                    "Too few steps."):
        assert heading in text
    assert "| MEND | 40.0 ± 0.0 | 46.0 ± 0.0 |" in text  # the K sweep's row
    assert "| gold (random, first 4 rows per task) | 50.0 ± 0.0 | 46.0 ± 0.0 | | |" in text
    assert "| MEND | 46.0 ± 0.0 | S1 4 steps" in text  # the ablation table's reference
    assert (setting / "sweep-k.png").is_file()
    assert "The l sweep was not run." in text
    assert "could not be made (their runs are missing)." in text  # e.g. CLM pretraining
    assert "git abc1234567" in text
    assert "](results/cpu/sweep-k.png)" in text  # linked from the report's folder


def test_budget_table_shows_whether_mend_reads_its_demonstrations(setting):
    assert Setting(setting).budget_table().count("\n") == 2  # header and the tables' MEND
    _run(setting, "class_to_class/mend-400",
         [{"step": 400, "steps_per_s": 2.0, "tokens_per_s": 10.0}],
         init_from="out/reproduce/cpu/pretrain")
    run = "out/reproduce/cpu/class_to_class/mend-400"
    _result(setting, "class_to_class", "long-mend", {100: 0.52, 13: 0.54}, checkpoint=run)
    _result(setting, "class_to_class", "long-sweep-k-mend", [{100: 0.40, 13: 0.40},
                                                             {100: 0.55, 13: 0.55}],
            checkpoint=run, sweep=[1, 4], limit=4)
    _result(setting, "class_to_class", "long-perturb-wrong_label-mend", {100: 0.35, 13: 0.35},
            checkpoint=run, limit=4)
    table = Setting(setting).budget_table()
    # The tables' MEND: its K sweep gives 40 -> 46 (+6.0); it has no wrong-label run.
    assert "| S1 4 steps, 0.8k tokens, 8 s + S2 3 steps, 0.3k tokens, 6 s | 46.0 ± 1.0 | " \
           "46.0 ± 0.0 | +6.0 | – |" in table
    # 400 steps at 2 steps/s is 200 s and 2.0k tokens; K = 1 -> 4 is +15, wrong labels -20.
    assert "| S1 4 steps, 0.8k tokens, 8 s + S2 400 steps, 2.0k tokens, 3.3 min | " \
           "53.0 ± 1.0 | 55.0 ± 0.0 | +15.0 | -20.0 |" in table


def test_report_on_a_folder_without_settings_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="report.yaml"):
        build(tmp_path)
