"""What several test modules share besides fixtures: the data folder, demonstrations, and a
MetaICL partition written to disk. Imported as ``from tests.support import ...``."""

from __future__ import annotations

from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
"""The project's data, beside the checkout (``../shared``); tests that need it skip without it."""


DEMOS = [("great movie!", "positive"), ("dull plot", "negative"),
         ("a delightful story", "positive")]


def one_batch(distiller):
    """``(objective, batch)``: L_pred + L_distill on two copies of one query after ``DEMOS``
    twice, for tests that train a distiller a few steps."""
    from mend.data import Example
    from mend.methods.mend import MendObjective, ObjectiveConfig

    tok = distiller.llm.tokenizer
    context = sum((tok(p, add_special_tokens=False)["input_ids"]
                   for p in distiller.format.pieces(DEMOS * 2)), [])
    query = tok("\n\na joyless film\nnegative", add_special_tokens=False)["input_ids"]
    objective = MendObjective(distiller, ObjectiveConfig(distill=1.0, pred=1.0))
    return objective, objective.collate([Example(DEMOS * 2, context, query, len(query) - 1)] * 2)


def train_a_few(distiller, steps: int = 5, after_backward=None) -> list[float]:
    """``steps`` AdamW steps (lr 1e-2) of :func:`one_batch`'s objective on ``distiller``,
    calling ``after_backward()`` where the gradients are there to check; the losses."""
    import torch

    objective, batch = one_batch(distiller)
    opt = torch.optim.AdamW([p for p in distiller.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = objective.loss(distiller, batch)["loss"]
        opt.zero_grad()
        loss.backward()
        if after_backward is not None:
            after_backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def write_metaicl(root: Path, train: list[str], test: list[str], partition: str = "part",
                  seeds: tuple[int, ...] = (100,)) -> Path:
    """A MetaICL-layout folder of small sentiment-like classification tasks; tasks named in
    the partition but called ``gone`` are left out, as missing tasks are in real data."""
    import json
    import random

    (root / "config" / "tasks").mkdir(parents=True, exist_ok=True)
    (root / "config" / f"{partition}.json").write_text(json.dumps({"train": train,
                                                                  "test": test}))
    words = ["great", "dull", "delightful", "weak", "wonderful", "long", "joyless", "warm"]
    good = {"great", "delightful", "wonderful", "warm"}
    for t, name in enumerate(dict.fromkeys(train + test)):
        if name == "gone":
            continue
        rng = random.Random(t)
        options = ["positive", "negative"]
        rows = []
        for i in range(40):
            word = rng.choice(words)
            rows.append({"task": name, "input": f"the film {i} was {word}",
                         "output": options[word not in good], "options": options})
        folder = root / name
        folder.mkdir(exist_ok=True)
        (root / "config" / "tasks" / f"{name}.json").write_text(
            json.dumps({"task_type": "classification", "options": options}))
        lines = lambda rs: "".join(json.dumps(r) + "\n" for r in rs)  # noqa: E731
        (folder / f"{name}_test.jsonl").write_text(lines(rows[:8]))
        for seed in seeds:
            (folder / f"{name}_16_{seed}_train.jsonl").write_text(lines(rows[8:24]))
            (folder / f"{name}_16_{seed}_dev.jsonl").write_text(lines(rows[24:40]))
    return root


# --------------------------------------------------------------------------------------------
# Several processes on the CPU, through accelerate launch and the shipped accelerate configs


def allow_fsdp_on_cpu() -> None:
    """Let accelerate's FSDP engine run in CPU processes over gloo, as torch's FSDP2 does.

    accelerate (1.16) turns FSDP on only for accelerator devices: with ``ACCELERATE_USE_CPU``
    its state stays ``MULTI_CPU`` even when the launch config asks for FSDP. This lifts that
    one check, after accelerate has built the FSDP plugin from the launch config's
    environment, so everything else (preparing, sharding, DCP checkpoints) is accelerate's
    and torch's own code. Test scaffolding only: mend itself never patches accelerate.
    """
    from accelerate import state
    from accelerate.utils import DistributedType

    init = state.AcceleratorState.__init__

    def patched(self, mixed_precision=None, cpu=False, dynamo_plugin=None,
                deepspeed_plugin=None, fsdp_plugin=None, *args, **kwargs):
        init(self, mixed_precision, cpu, dynamo_plugin, deepspeed_plugin, fsdp_plugin, *args,
             **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            self.distributed_type = DistributedType.FSDP
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    state.AcceleratorState.__init__ = patched


_SCRIPT = """
import json, os, signal, sys
sys.path.insert(0, {root!r})
if {fsdp!r}:
    from tests.support import allow_fsdp_on_cpu
    allow_fsdp_on_cpu()
import mend.training.loop as loop
from mend.data import pretrain
rank = int(os.environ.get("RANK", 0))
trace = {trace!r}
if trace:  # which documents each rank tokenizes, and which windows it trains on
    documents = pretrain.documents
    def traced_documents(*a, **k):
        for doc in documents(*a, **k):
            with open(f"{{trace}}/read-{{rank}}.jsonl", "a") as f:
                f.write(json.dumps(doc) + "\\n")
            yield doc
    pretrain.documents = traced_documents
    split = pretrain.PretrainData.split
    def traced_split(self, window):
        with open(f"{{trace}}/trained-{{rank}}.jsonl", "a") as f:
            f.write(json.dumps(window) + "\\n")
        return split(self, window)
    pretrain.PretrainData.split = traced_split
step = loop._step
measure = {measure!r}
def measured_step(*a, **k):  # the memory a process holds, at step 2 (optimizer state made)
    if not measure or a[-1] != 2:
        return step(*a, **k)
    import torch
    from mend.training import engine, memory
    accelerator, model, optimizer = a[1], a[2], a[3]
    inner = accelerator.unwrap_model(model)
    frozen = list(inner.frozen) or engine.frozen_models(inner.trained)
    with memory.saved_bytes([model, *frozen]) as saved:
        out = step(*a, **k)
    size = lambda t: (t.to_local() if hasattr(t, "to_local") else t).nbytes
    params = {{id(p): p for m in [model, *frozen] for p in m.parameters()}}.values()
    moments = [v for s in optimizer.optimizer.state.values() for v in s.values()
               if torch.is_tensor(v) and v.dim()]
    with open(f"{{measure}}/rank-{{rank}}.json", "w") as f:
        json.dump({{"parameters": sum(size(p) for p in params),
                   "trained": sum(size(p) for p in params if p.requires_grad),
                   "optimizer": sum(size(v) for v in moments), "activations": saved[0]}}, f)
    return out
def die():
    os.kill(os.getpid(), signal.SIGKILL)
def killing_step(*a, **k):
    out = measured_step(*a, **k)
    if a[-1] == {kill_at!r}:
        die()
    return out
loop._step = killing_step
kill_in = {kill_in!r}  # ("save", step): inside that checkpoint's write; ("eval", n): n-th eval
if kill_in and kill_in[0] == "save":
    from accelerate import Accelerator
    save_state = Accelerator.save_state
    def dying_save(self, output_dir=None, **k):
        out = save_state(self, output_dir, **k)  # every file written, the rename not yet
        if f"step-{{kill_in[1]:08d}}" in str(output_dir):
            die()
        return out
    Accelerator.save_state = dying_save
if kill_in and kill_in[0] == "eval":
    from mend.training import selection
    run_on_model, calls = selection.run_on_model, [0]
    def dying_eval(*a, **k):
        calls[0] += 1
        out = run_on_model(*a, **k)  # scored, and not yet logged or kept
        if calls[0] == kill_in[1]:
            die()
        return out
    selection.run_on_model = dying_eval
from mend.recipes.{recipe} import cli
sys.exit(cli(sys.argv[1:]))
"""


def launch(config: str | None, processes: int, args: list[str], workdir: Path, *,
           recipe: str = "pretrain", kill_at: int | None = None,
           kill_in: tuple[str, int] | None = None, trace: Path | None = None,
           measure: Path | None = None, flags: tuple[str, ...] = (), timeout: int = 600):
    """Run ``mend.recipes.<recipe>`` (stage 1 by default) under ``accelerate launch
    --config_file configs/accelerate/<config> [flags]`` with ``processes`` CPU processes
    (gloo; DeepSpeed's configs on DeepSpeed's CPU accelerator). ``kill_at``: every process
    SIGKILLs itself right after that step. ``trace``: a folder where each rank logs the
    documents it reads (``read-<rank>.jsonl``) and the windows it splits into examples
    (``trained-<rank>.jsonl``). ``measure``: a folder where each rank
    writes the bytes it holds at step 2 (``rank-<r>.json``: parameters, what trains,
    optimizer state, activations saved for backward). ``kill_in``: ``("save", N)`` SIGKILLs
    every process inside the write of step N's checkpoint, its files written and not yet
    renamed; ``("eval", N)`` inside the N-th evaluation of this start, scored and not yet
    logged. ``config=None``: one plain process, no launcher. Returns the
    ``subprocess.CompletedProcess``."""
    import os
    import socket
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    name = config.split(".")[0] if config else "plain"
    script = workdir / f"launch-{recipe}-{name}-{processes}.py"
    script.write_text(_SCRIPT.format(root=str(root), fsdp=bool(config and config.startswith(
        "fsdp")), trace=str(trace) if trace else None, kill_at=kill_at, kill_in=kill_in,
        measure=str(measure) if measure else None, recipe=recipe))
    if config is None:
        return subprocess.run([sys.executable, str(script), *args], cwd=root,
                              capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "ACCELERATE_USE_CPU": "true"})
    with socket.socket() as s:  # a free port for this launch's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(root / "configs" / "accelerate" / config), "--num_processes", str(processes),
           "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no",
           "--dynamo_backend", "no", *flags, str(script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if config.startswith("deepspeed"):  # DeepSpeed finds its CPU accelerator itself
        env.pop("ACCELERATE_USE_CPU", None)
    else:
        env["ACCELERATE_USE_CPU"] = "true"
    return subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout,
                          env=env)
