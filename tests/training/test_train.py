"""The training loop and both stages on tiny models: resume after a kill, SIGTERM, model
selection, early stopping, NaN, gradient checkpointing and configs (runs of several processes
are in test_scale.py)."""

import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mend import Distiller, tiny
from mend.config import load_config
from mend.core.distiller import WEIGHTS_FILE
from mend.errors import MendError
from mend.recipes.finetune import FinetuneConfig
from mend.recipes.finetune import main as finetune
from mend.recipes.pretrain import PretrainConfig
from mend.recipes.pretrain import main as pretrain
from mend.training.config import TrainConfig
from mend.training.loop import TrainingError, train
from tests.support import write_metaicl

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("train")
    text = root / "corpus.txt"
    text.write_text("\n".join(f"{i} {line}" for i in range(6)
                              for line in tiny.CORPUS.splitlines()) + "\n")
    model = [f"model.distiller={tiny_model('llama')}", f"model.llm={tiny_model('gpt2', 48)}",
             "model.num_placeholders=4", "model.max_distiller_length=256"]
    stage1 = model + [f"data.path={text}", "data.max_length=48", "data.min_length=16",
                      "data.shuffle_buffer=50", "train.batch_size=2", "train.log_every=1",
                      "train.lr=1e-3", "train.warmup_steps=1"]
    return root, model, stage1


def pretrain_cfg(args, out, **train):
    extra = [f"train.{k}={v}" for k, v in train.items()]
    return load_config(PretrainConfig, None, args + extra + [f"output_dir={out}"])


def weights(path) -> dict[str, torch.Tensor]:
    return load_file(Path(path) / WEIGHTS_FILE)


def run_killed(args: list[str], out: Path, at_step: int, sig: signal.Signals) -> int:
    """Run stage 1 in a subprocess that sends itself ``sig`` right after step ``at_step``."""
    script = f"""
import os, signal, sys
import mend.training.loop as T
step = T._step
def killing_step(*a, **k):
    out = step(*a, **k)
    if a[-1] == {at_step}:
        os.kill(os.getpid(), signal.{sig.name})
    return out
T._step = killing_step
from mend.recipes.pretrain import cli
sys.exit(cli({args + [f"output_dir={out}"]!r}))
"""
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=300).returncode


@pytest.mark.slow  # a subprocess
def test_pretrain_resumes_after_a_kill_to_identical_weights(setup):
    root, _, stage1 = setup
    whole = pretrain(pretrain_cfg(stage1, root / "whole", max_steps=6, save_every=2))
    assert whole.status == "finished" and whole.step == 6
    args = stage1 + ["train.max_steps=6", "train.save_every=2"]
    # SIGKILL after step 5: steps 4 and 5's log lines exist, only step 4 is checkpointed.
    assert run_killed(args, root / "killed", 5, signal.SIGKILL) == -signal.SIGKILL
    ckpts = root / "killed" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000002", "step-00000004"]
    (ckpts / ".tmp-step-00000006").mkdir()  # a checkpoint whose writing was cut off
    resumed = pretrain(pretrain_cfg(stage1, root / "killed", max_steps=6, save_every=2))
    assert resumed.step == 6
    a, b = weights(root / "whole"), weights(root / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (root / "killed" / "metrics.jsonl")
             .read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # the killed run's step-5 line was replaced
    calls = [json.loads(line) for line in (root / "killed" / "provenance.jsonl")
             .read_text().splitlines()]
    assert [c["start_step"] for c in calls] == [0, 4]  # one line per start, then the resume
    assert all(c["machine"]["device"] and "torch" in c["versions"] for c in calls)
    assert all("config" not in c for c in calls)  # it is config.yaml's, not repeated per call
    assert (root / "killed" / "loss.png").is_file()
    assert (root / "killed" / "config.yaml").is_file()


@pytest.mark.slow  # a subprocess
def test_sigterm_checkpoints_and_the_same_command_resumes(setup):
    root, _, stage1 = setup
    args = stage1 + ["train.max_steps=4", "train.save_every=100"]
    assert run_killed(args, root / "term", 2, signal.SIGTERM) == 143
    assert [p.name for p in (root / "term" / "checkpoints").iterdir()] == ["step-00000002"]
    assert not (root / "term" / WEIGHTS_FILE).exists()  # an interrupted run is not final
    done = pretrain(pretrain_cfg(stage1, root / "term", max_steps=4, save_every=100))
    whole = pretrain(pretrain_cfg(stage1, root / "whole4", max_steps=4, save_every=100))
    assert done.status == whole.status == "finished"
    a, b = weights(root / "term"), weights(root / "whole4")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # a subprocess
def test_an_unreadable_checkpoint_falls_back_to_the_one_before(setup, capsys):
    root, _, stage1 = setup
    whole = pretrain(pretrain_cfg(stage1, root / "whole-c", max_steps=6, save_every=2))
    assert whole.step == 6
    args = stage1 + ["train.max_steps=6", "train.save_every=2"]
    assert run_killed(args, root / "cut", 5, signal.SIGKILL) == -signal.SIGKILL
    ckpts = root / "cut" / "checkpoints"
    damaged = ckpts / "step-00000004" / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:40])  # a copy cut short
    resumed = pretrain(pretrain_cfg(stage1, root / "cut", max_steps=6, save_every=2))
    printed = capsys.readouterr().out
    assert "step-00000004 cannot be read" in printed and "resuming from" in printed
    assert "step-00000002" in printed.split("resuming from")[1].splitlines()[0]
    assert (ckpts / "unreadable-step-00000004").is_dir()  # kept, not deleted
    assert resumed.step == 6
    a, b = weights(root / "whole-c"), weights(root / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same run, two steps replayed
    # When no checkpoint can be read, the run refuses to start over on its own.
    for path in ckpts.glob("step-*"):
        (path / "model.safetensors").write_bytes(b"")
    from mend.errors import CheckpointError
    with pytest.raises(CheckpointError, match="train.resume=never"):
        pretrain(pretrain_cfg(stage1, root / "cut", max_steps=8, save_every=2))


def test_finetune_from_stage1_selects_the_best_dev_checkpoint(setup, tmp_path):
    root, model, stage1 = setup
    pretrain(pretrain_cfg(stage1, root / "stage1", max_steps=3, save_every=3))
    data = write_metaicl(tmp_path / "metaicl", train=["t1", "t2"], test=["t3", "t4"])
    cfg = load_config(FinetuneConfig, None, model + [
        f"data.root={data}", "data.partition=part", "context.k=3", "train.max_steps=4",
        "train.batch_size=2", "train.eval_every=1", "train.patience=10", "train.lr=5e-3",
        f"init_from={root / 'stage1'}", f"output_dir={tmp_path / 'ft'}"])
    result = finetune(cfg)
    evals = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text()
             .splitlines() if "eval_score" in line]
    scores = [e["eval_score"] for e in evals]
    assert len(scores) == 4 and all(e["eval_tasks"] == 2 for e in evals)
    assert result.best_score == max(scores)
    assert result.best_step == evals[scores.index(max(scores))]["step"]
    # The output directory holds the best model: re-scoring it gives the best score.
    from mend.data.metaicl import ContextBuilder, load_partition
    from mend.evaluation.harness import evaluate_task, mean_score
    from mend.methods.mend import Mend
    best = Distiller.from_pretrained(tmp_path / "ft")
    _, test = load_partition(data, "part")
    # Selection reads the run's own context (context.k = 3, not the evaluation default of
    # 16), and config.yaml says so.
    import yaml

    from mend.evaluation.harness import DemoConfig
    saved = yaml.safe_load((tmp_path / "ft" / "config.yaml").read_text())
    assert saved["context"]["k"] == 3 and saved["select"]["mode"] == "fixed"
    results = [evaluate_task(Mend(best), t, 100, "dev", ContextBuilder.for_method(
        Mend(best), cfg.context), DemoConfig(mode="fixed")) for t in test]
    assert mean_score(results) == pytest.approx(result.best_score, abs=1e-9)
    # The swap control is logged beside every selection score.
    assert all(e["eval_content_gap"] == pytest.approx(e["eval_score"] - e["eval_swapped_score"])
               for e in evals)


def test_early_stopping_after_patience_evaluations(setup, tmp_path):
    _, model, _ = setup
    data = write_metaicl(tmp_path / "metaicl", train=["t1"], test=["t3"])
    cfg = load_config(FinetuneConfig, None, model + [
        f"data.root={data}", "data.partition=part", "context.k=2", "train.max_steps=20",
        "train.batch_size=2", "train.eval_every=1", "train.patience=2", "train.lr=1e-12",
        f"output_dir={tmp_path / 'ft'}"])
    result = finetune(cfg)
    # Step 1 sets the best; steps 2 and 3 do not improve on it (the LR is negligible).
    assert result.status == "early_stopped" and result.step == 3 and result.best_step == 1
    rerun = finetune(cfg)  # started again, a stopped run stays stopped
    assert rerun.step == 3


class _Clock:
    """``time`` for the loop, its clock advancing ``tick`` seconds at every reading."""

    def __init__(self, tick: float):
        self.now, self.tick = 0.0, tick

    def perf_counter(self) -> float:
        self.now += self.tick
        return self.now


def test_bf16_on_a_cpu_that_emulates_it_warns_before_it_trains(setup, tmp_path, monkeypatch):
    from mend.training import precision
    _, _, stage1 = setup
    monkeypatch.setattr(precision, "cpu_rates", lambda: (176e9, 1e9))  # fp32, bf16
    with pytest.warns(UserWarning, match=r"train.mixed_precision=bf16 compute in bf16, but "
                                         r"this CPU emulates it .*176x slower"):
        pretrain(pretrain_cfg(stage1 + ["train.mixed_precision=bf16"], tmp_path / "bf16",
                              max_steps=1, save_every=1))
    monkeypatch.setattr(precision, "cpu_rates", lambda: (176e9, 400e9))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*emulates it")
        pretrain(pretrain_cfg(stage1 + ["train.mixed_precision=bf16"], tmp_path / "native",
                              max_steps=1, save_every=1))


def test_a_time_budget_ends_the_run_as_finished_and_resumes_across_it(setup, tmp_path,
                                                                       monkeypatch):
    import mend.training.loop as loop
    root, _, stage1 = setup
    out = tmp_path / "budget"
    monkeypatch.setattr(loop, "time", _Clock(20.0))  # 20 s per reading: 1 minute = 2 steps
    result = pretrain(pretrain_cfg(stage1, out, max_steps=50, save_every=25, max_minutes=1))
    assert result.status == "finished" and result.step == 2
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text()
              .splitlines()]
    assert logged == [1, 2]
    assert (out / "checkpoints" / "step-00000002").is_dir() and (out / "loss.png").is_file()
    # Every file of a checkpoint has the umask's mode (accelerate writes through 0600 files).
    mask = os.umask(0)
    os.umask(mask)
    assert {f.stat().st_mode & 0o777 for f in (out / "checkpoints").rglob("*") if f.is_file()
            } == {0o666 & ~mask}
    final = weights(out)
    # The same command again: the budget is spent (checkpoints carry the time), so nothing
    # trains; a larger budget goes on from step 2.
    monkeypatch.setattr(loop, "time", _Clock(20.0))
    again = pretrain(pretrain_cfg(stage1, out, max_steps=50, save_every=25, max_minutes=1))
    assert again.step == 2 and torch.equal(weights(out)["placeholders"], final["placeholders"])
    monkeypatch.setattr(loop, "time", _Clock(20.0))
    more = pretrain(pretrain_cfg(stage1, out, max_steps=50, save_every=25, max_minutes=2))
    assert more.step == 4 and more.status == "finished"
    with pytest.raises(MendError, match="max_minutes must be > 0"):
        TrainConfig(max_minutes=0)


def test_a_checkpoint_of_another_model_is_refused_naming_the_field_and_kept(setup, tmp_path):
    from mend import CheckpointError
    _, _, stage1 = setup
    out = tmp_path / "run"
    pretrain(pretrain_cfg(stage1, out, max_steps=2, save_every=2))
    with pytest.raises(CheckpointError, match=r"num_placeholders \(4 there, 3 here\) differ"):
        pretrain(pretrain_cfg(stage1 + ["model.num_placeholders=3"], out, max_steps=4))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]


def test_selection_from_the_start_keeps_step_0_when_no_step_beats_it(setup, tmp_path):
    _, model, _ = setup
    data = write_metaicl(tmp_path / "metaicl", train=["t1"], test=["t3", "t4"])
    cfg = load_config(FinetuneConfig, None, model + [
        f"data.root={data}", "data.partition=part", "context.k=2", "train.max_steps=2",
        "train.batch_size=2", "train.eval_every=1", "train.eval_at_start=true",
        "train.lr=1e-12", f"output_dir={tmp_path / 'ft'}"])
    result = finetune(cfg)
    evals = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text()
             .splitlines() if "eval_score" in line]
    assert [e["step"] for e in evals] == [0, 1, 2]
    assert result.best_step == 0 and result.best_score == evals[0]["eval_score"]


def test_tensorboard_logging_or_a_clear_error(tmp_path, monkeypatch):
    import importlib.util
    method = _Diverging()
    method.calls = -100  # never diverges within this run
    forever = iter(lambda: {"tokens": 1}, None)
    cfg = TrainConfig(max_steps=2, progress=False, save_every=100, log_every=1, tensorboard=True)
    if importlib.util.find_spec("tensorboard") is not None:
        train(cfg, method, lambda start, rank, world: forever, tmp_path / "tb")
        assert list((tmp_path / "tb").rglob("events.out.tfevents*"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MendError, match=r"pip install 'mend\[tensorboard\]'"):
        train(cfg, method, lambda start, rank, world: forever, tmp_path / "no-tb")


class _Diverging:
    """A one-weight method whose loss turns NaN at its third call."""

    def __init__(self):
        self.module = torch.nn.Linear(1, 1)
        self.calls = 0

    def loss(self, model, batch):
        self.calls += 1
        if self.calls == 3:  # the weights the NaN step starts from
            self.before = model.weight.detach().clone()
        y = model(torch.ones(1, 1)).sum()
        return {"loss": y * float("nan") if self.calls == 3 else y}

    def save_pretrained(self, path):
        pass


def test_a_nan_loss_stops_the_run_naming_the_step(tmp_path):
    method = _Diverging()
    forever = iter(lambda: {"tokens": 1}, None)
    cfg = TrainConfig(max_steps=5, progress=False, save_every=100)
    with pytest.raises(TrainingError, match=r"became nan at step 3.*train.lr"):
        train(cfg, method, lambda start, rank, world: forever, tmp_path)


def test_a_nan_loss_leaves_the_weights_as_they_were(tmp_path):
    method = _Diverging()
    forever = iter(lambda: {"tokens": 1}, None)
    cfg = TrainConfig(max_steps=5, progress=False, save_every=100, lr=0.1, warmup_steps=0)
    with pytest.raises(TrainingError):
        train(cfg, method, lambda start, rank, world: forever, tmp_path)
    assert torch.equal(method.before, method.module.weight.detach())  # step 3 took nothing


def test_a_training_step_reads_the_device_once(monkeypatch):
    from accelerate import Accelerator

    from mend.training.loop import _step
    from mend.training.run_log import Window

    model = torch.nn.Linear(3, 1)

    def terms(batch):  # two loss terms, as MEND logs distill and pred
        y = model(torch.ones(2, 3)).pow(2).mean()
        return {"loss": 2 * y, "distill": y}
    reads = []
    for name in ("item", "tolist", "__float__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, original=original, name=name):
            reads.append(name)
            return original(self, *args)
        monkeypatch.setattr(torch.Tensor, name, counted)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    cfg = TrainConfig(grad_accum=3, max_grad_norm=1.0)
    window = Window()
    norm = _step(cfg, Accelerator(cpu=True), terms, optimizer, scheduler,
                 list(model.parameters()), iter(lambda: {"tokens": 4}, None), window, 1)
    # Three micro-batches, two terms each, a finiteness check and a gradient norm: one read.
    assert reads == ["tolist"] and norm > 0 and window.micro == 3
    assert float(window.sums["loss"]) == pytest.approx(2 * float(window.sums["distill"]))


def test_prompt_tuning_trains_through_the_finetune_entry_point(setup, tmp_path, tiny_model):
    from mend.methods.prompt_tuning import PromptTuning
    from mend.recipes.finetune import cli
    data = write_metaicl(tmp_path / "metaicl", train=["t1"], test=["t3"])
    out = tmp_path / "pt"
    code = cli(["method=prompt_tuning", f"model.llm={tiny_model('gpt2', 48)}",
                "model.num_placeholders=3", f"data.root={data}", "data.partition=part",
                "train.max_steps=3", "train.batch_size=2", "train.eval_every=3",
                "train.lr=1e-2", f"output_dir={out}"])
    assert code == 0
    from accelerate.utils import set_seed
    trained = PromptTuning.from_pretrained(out)
    set_seed(42)  # the run's seed, set before it built its prompt: the same initial prompt
    fresh = PromptTuning.from_config(trained.config)
    assert trained.prompt.shape == (3, 48) and not torch.equal(trained.prompt, fresh.prompt)
    assert all(not p.requires_grad for p in trained.llm.model.parameters())
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
             if "eval_score" in line]
    assert len(evals) == 1 and evals[0]["eval_tasks"] == 1


def test_export_writes_a_saved_step_as_a_checkpoint(setup, tmp_path):
    """`mend export <run>/checkpoints/step-N OUT`: the last step's export is the run's own
    final model bit for bit; an earlier step's is another model, and from_pretrained reads
    it; bf16 halves it; what is not a training checkpoint is refused, naming the fix."""
    from mend.recipes.export import cli as export
    root, _, stage1 = setup
    run = tmp_path / "run"
    pretrain(pretrain_cfg(stage1, run, max_steps=4, save_every=2, keep_checkpoints=2))
    steps = run / "checkpoints"
    assert export([str(steps / "step-00000004"), str(tmp_path / "s4")]) == 0
    assert export([str(steps / "step-00000002"), str(tmp_path / "s2"), "dtype=bfloat16"]) == 0
    final, s4, s2 = weights(run), weights(tmp_path / "s4"), weights(tmp_path / "s2")
    assert final.keys() == s4.keys() == s2.keys()
    assert all(torch.equal(final[k], s4[k]) for k in final)
    assert all(v.dtype == torch.bfloat16 for v in s2.values() if v.is_floating_point())
    assert not all(torch.equal(final[k].bfloat16(), s2[k]) for k in final)
    loaded = Distiller.from_pretrained(tmp_path / "s2").trainable_state_dict()
    assert all(torch.equal(loaded[k], s2[k].float()) for k in s2)
    assert export([str(run), str(tmp_path / "bad")]) == 2  # the run itself, not a step
    assert not (tmp_path / "bad").exists()
