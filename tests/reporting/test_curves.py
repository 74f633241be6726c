"""`mend curve`: a run's models, scored, placed at the tokens the run had read by their step."""

import json

import pytest

from mend.cli import main as mend
from mend.reporting import curves


@pytest.fixture
def run(tmp_path):
    """A stage-2 run from `init_from` (stage1): 30 steps, logged every 10 (100, 150 and 50
    tokens), selection at steps 0 and 20 (20 is kept), content controls at both."""
    run = tmp_path / "stage2"
    run.mkdir()
    (run / "config.yaml").write_text(f"init_from: {tmp_path / 'stage1'}\n")
    lines = [{"step": 0, "eval_score": 0.5, "eval_swapped_score": 0.3},
             {"step": 0, "monitor_content_share": 0.8},
             {"step": 10, "loss": 1.0, "tokens": 100.0},
             {"step": 20, "loss": 0.9, "tokens": 150.0},
             {"step": 20, "eval_score": 0.6, "eval_swapped_score": 0.3},
             {"step": 20, "monitor_content_share": 0.85},
             {"step": 30, "loss": 0.8, "tokens": 50.0},
             {"step": 30, "eval_score": 0.55, "eval_swapped_score": 0.3}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return run


def scored(root, where, name, checkpoint, share, score, gap):
    d = root / where / "eval" / name
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps({
        "label": name, "models": {"checkpoint": str(checkpoint)},
        "results": {"average": {"score": {"mean": score}}, "tasks": {}},
        "recovered_share": {"share": share}, "content_gap": {"mean": gap}}))
    return d / "results.json"


def test_each_model_sits_at_the_tokens_its_step_had_read(run, tmp_path):
    out = tmp_path / "out"
    files = [scored(out, "demo", "start", tmp_path / "stage1", 0.5, 0.70, 0.30),
             scored(out, "demo", "s10", run / "steps" / "step-00000010", 0.6, 0.75, 0.35),
             scored(out, "demo", "kept", run, 0.7, 0.80, 0.40),
             scored(out, "demo-long", "s30", run / "steps" / "step-00000030", -0.2, 0.6, 0.0)]
    got = curves.points(run, files)
    assert [(p["step"], p["tokens"], p["share"]) for p in got["demo"]] == [
        (0, 0.0, 0.5), (10, 100.0, 0.6), (20, 250.0, 0.7)]  # the run itself: step 20, kept
    assert [(p["step"], p["tokens"]) for p in got["demo-long"]] == [(30, 300.0)]
    figure = tmp_path / "curve.png"
    assert mend(["curve", str(run), *map(str, files), "--output", str(figure)]) == 0
    assert figure.stat().st_size > 10_000
    table = (tmp_path / "curve.md").read_text()
    assert "| demo | 20 | 0.2k | 80.0 | 70% | +40.0 |" in table
    assert "| demo-long | 30 | 0.3k | 60.0 | -20% | +0.0 |" in table


def test_a_model_that_is_not_a_step_of_the_run_is_refused(run, tmp_path, capsys):
    other = scored(tmp_path / "out", "demo", "x", tmp_path / "elsewhere", 0.5, 0.7, 0.3)
    unlogged = scored(tmp_path / "out", "demo", "y", run / "step-00000015", 0.5, 0.7, 0.3)
    assert mend(["curve", str(run), str(other)]) == 2
    assert "is not a step of" in capsys.readouterr().err
    assert mend(["curve", str(run), str(unlogged)]) == 2
    assert "logged no line at step 15" in capsys.readouterr().err


def test_a_run_folder_without_metrics_is_refused_by_name(tmp_path, capsys):
    empty = tmp_path / "stage2"
    empty.mkdir()
    result = scored(tmp_path / "out", "demo", "x", empty / "steps" / "step-00000010",
                    0.5, 0.7, 0.3)
    assert mend(["curve", str(empty), str(result)]) == 2
    assert f"{empty} is not a training run's output directory" in capsys.readouterr().err


def test_other_runs_held_out_controls_are_drawn_and_tabled_beside(run, tmp_path, capsys):
    other = tmp_path / "ablate" / "kvzip"
    other.mkdir(parents=True)
    lines = [{"step": 0, "monitor_kl_own": 0.4, "monitor_content_share": 0.8},
             {"step": 10, "loss": 1.0, "tokens": 400.0},
             {"step": 20, "loss": 1.0, "tokens": 600.0},
             {"step": 20, "monitor_kl_own": 0.15, "monitor_content_share": 0.9}]
    (other / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert [(p["step"], p["tokens"], p["kl_own"]) for p in curves.held_out([other])["kvzip"]] \
        == [(0, 0.0, 0.4), (20, 1000.0, 0.15)]
    files = [scored(tmp_path / "out", "demo", "kept", run, 0.7, 0.80, 0.40)]
    figure = tmp_path / "curve.png"
    assert mend(["curve", str(run), *map(str, files), "--output", str(figure),
                 "--beside", str(other)]) == 0
    table = (tmp_path / "curve.md").read_text()
    assert "| stage2 | 20 | 0.2k | – | 85.0% |" in table  # the run's own: no KL logged
    assert "| kvzip | 20 | 1.0k | 0.1500 | 90.0% |" in table
    assert mend(["curve", str(run), *map(str, files), "--beside", str(tmp_path / "no")]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err
