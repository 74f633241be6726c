"""A training run's checkpoints on disk, for :func:`mend.training.loop.train`: each saved
atomically as ``checkpoints/step-N`` (model, optimizer, scheduler, RNG and the loop's
:class:`~mend.training.config.TrainState`, through accelerate, plus ``mend_engine.json``, the
engine and number of processes that wrote it), resumed from the newest one that can be read,
and a SIGTERM turned into a checkpoint at the next step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
from pathlib import Path
from types import FrameType

from accelerate import Accelerator
from accelerate.utils import gather_object

from mend._files import user_mode
from mend.config import to_dict
from mend.counters import Counters, sum_counts
from mend.errors import CheckpointError
from mend.training.config import TrainState
from mend.training.engine import SHARDED, engine_of, save_state_kwargs

ENGINE_FILE = "mend_engine.json"



def identity(module) -> dict:
    """What a checkpoint must agree on with the run that resumes from it: the trained
    parameters' shapes (what its optimizer state holds) and the model's config (which names
    the field that changed them)."""
    config = getattr(module, "config", None)
    return {"shapes": {n: list(p.shape) for n, p in module.named_parameters()
                       if p.requires_grad},
            "config": to_dict(config) if dataclasses.is_dataclass(config) else None}


def resume(accelerator: Accelerator, checkpoints: Path, state: TrainState,
           run: dict | None = None) -> Path | None:
    """Load the newest readable checkpoint; returns it, or None when there is none.

    One written for another model or by an engine that cannot be read here is a
    :class:`CheckpointError` that names what differs, and is left as it is. One that cannot
    be read (a disk filled up, a copy cut short) is renamed ``unreadable-step-N`` and kept,
    and the run resumes from the one before it, saying so.
    """
    tried = []
    for path in sorted((p for p in checkpoints.glob("step-*") if p.is_dir()), reverse=True):
        _check_engine(accelerator, path)
        if run is not None:
            _check_identity(path, run)
        try:
            accelerator.load_state(str(path))
        except Exception as e:  # torch, safetensors and pickle each raise their own
            tried.append(path)
            reason = f"{type(e).__name__}: {str(e)[:200]}"
            if accelerator.is_main_process:
                bad = path.with_name(f"unreadable-{path.name}")
                shutil.rmtree(bad, ignore_errors=True)
                os.replace(path, bad)
                print(f"mend: checkpoint {path} cannot be read ({reason}); it is kept as "
                      f"{bad.name}, and the run resumes from the checkpoint before it.",
                      flush=True)
            accelerator.wait_for_everyone()
            continue
        if accelerator.is_main_process:
            print(f"mend: resuming from {path} (step {state.step})", flush=True)
        return path
    if tried:
        raise CheckpointError(
            f"No checkpoint under {checkpoints} can be read ({', '.join(p.name for p in tried)} "
            f"failed; they are kept as unreadable-step-*). Delete them to start over, or set "
            f"train.resume=never.")
    return None


def save_checkpoint(accelerator: Accelerator, checkpoints: Path, state: TrainState,
                    counters: Counters, keep: int, run: dict | None = None) -> None:
    """Save the run's state as ``step-N`` (atomically: a temporary directory, then a
    rename), keeping the newest ``keep`` checkpoints."""
    state.counts = sum_counts(gather_object([counters.counts]))
    final = checkpoints / f"step-{state.step:08d}"
    tmp = checkpoints / f".tmp-step-{state.step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        checkpoints.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), **save_state_kwargs(accelerator))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / ENGINE_FILE).write_text(json.dumps(
            {"engine": engine_of(accelerator), "processes": accelerator.num_processes,
             **(run or {})}))
        user_mode(*(f for f in tmp.rglob("*") if f.is_file()))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # atomic: a checkpoint directory is complete or absent
        for old in sorted(p for p in checkpoints.glob("step-*") if p.is_dir())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _check_engine(accelerator: Accelerator, path: Path) -> None:
    """A checkpoint written by a sharding engine holds that engine's files (FSDP's DCP shards,
    DeepSpeed's partitions), which another engine cannot read: say so, rather than take it
    for a damaged checkpoint."""
    record = path / ENGINE_FILE
    if not record.is_file():  # written before engines were recorded: one device or DDP
        saved = {"engine": "ddp"}
    else:
        saved = json.loads(record.read_text())
    now = engine_of(accelerator)
    if (saved["engine"] == now == "deepspeed"
            and saved.get("processes", accelerator.num_processes) != accelerator.num_processes):
        raise CheckpointError(
            f"{path} was written by {saved['processes']} DeepSpeed processes, whose ZeRO "
            f"partitions {accelerator.num_processes} cannot read: processes differ "
            f"({saved['processes']} there, {accelerator.num_processes} here). Launch "
            f"{saved['processes']} processes, or start over in a new output_dir.")
    if saved["engine"] != now and (saved["engine"] in SHARDED or now in SHARDED):
        raise CheckpointError(
            f"{path} was written under {saved['engine']}, and this run is launched under "
            f"{now}, which cannot read it. Launch it as it was launched (the accelerate config "
            f"of engine {saved['engine']}; the number of processes may differ), or start over "
            f"in a new output_dir.")


def _check_identity(path: Path, run: dict) -> None:
    """Refuse a checkpoint of another model (its trained parameters of other shapes), naming
    the config fields that differ, before accelerate's loader fails on it and it is taken
    for a damaged one."""
    record = path / ENGINE_FILE
    saved = json.loads(record.read_text()) if record.is_file() else {}
    if "shapes" not in saved or saved["shapes"] == run["shapes"]:
        return
    old, new = saved.get("config") or {}, run.get("config") or {}
    fields = [f"{k} ({old.get(k)!r} there, {new.get(k)!r} here)" for k in sorted(old.keys()
              | new.keys()) if old.get(k) != new.get(k)]
    params = sorted(saved["shapes"].keys() ^ run["shapes"].keys()) or [
        n for n in saved["shapes"] if saved["shapes"][n] != run["shapes"][n]]
    raise CheckpointError(
        f"{path} was written for another model: "
        + (f"{', '.join(fields[:4])} differ" if fields else f"parameter {params[0]} differs")
        + ". Resume with the config that wrote it, or start over in a new output_dir (the "
          "checkpoint is left as it is).")


class SigtermFlag:
    """Turns SIGTERM into a flag the loop checks between steps (main thread only)."""

    def __init__(self) -> None:
        self.raised = False
        self._previous = None
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.raised = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
