"""One training loop for every trainable method, on accelerate: one device, DDP, FSDP or
DeepSpeed ZeRO-3, as the launch config chooses (:mod:`mend.training.engine`).

    result = train(cfg.train, method, make_batches, output_dir, evaluate=...)

What it does:

- AdamW (or bitsandbytes' 8-bit AdamW) over the method's trainable parameters and a
  transformers LR schedule with warmup (:mod:`mend.training.optim`), stepped once per
  optimizer step whatever the number of processes; gradient clipping; bf16/fp16 autocast;
  gradient accumulation; gradient checkpointing where the method's module supports it.
- **Checkpoints** every ``save_every`` steps, at the end, and on SIGTERM, under
  ``output_dir/checkpoints/step-NNNNNNNN``: the trainable weights, optimizer, scheduler, RNG
  states (through ``accelerator.save_state``: sharded by DCP under FSDP), and the step and
  the global batches consumed, which fix the position in the data. Each is written to a
  temporary directory and renamed, so a kill never leaves a corrupt one. Started again with
  the same command, a run resumes from its last readable checkpoint and reaches the same
  weights as a run never interrupted (:mod:`mend.training.checkpoints`). Resumed on another
  number of processes, it goes on from the same position in the data where the data allows
  it (see :class:`~mend.training.config.Position`), saying that the run is no longer the
  uninterrupted one.
- **Logs:** a tqdm bar (loss, LR, tokens/s) on the main process; every logged step as one JSON
  line in ``metrics.jsonl`` (with the data pipeline's truncation counts); optional
  TensorBoard; ``loss.png`` at the end; one line per start or resume in ``provenance.jsonl``
  (the step it began at, engine and processes, git commit, machine, versions, command), so a
  run chained over many calls says how and where each part of it was made (all written by
  ``mend.training.run_log``).
- **Model selection:** every ``eval_every`` steps, ``evaluate`` scores the model (higher is
  better); the best is saved as the output directory's checkpoint; ``patience`` evaluations
  without improvement stop the run (:mod:`mend.training.selection`).
- A NaN or infinite loss stops the run with a message naming the step and the usual fixes.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast, set_seed
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from mend import optional
from mend.core.backbones import pick_device
from mend.counters import Counters
from mend.errors import ConfigError, TrainingError
from mend.methods.base import Trainable
from mend.training import engine, optim, precision, selection
from mend.training.checkpoints import SigtermFlag, resume, save_checkpoint
from mend.training.checkpoints import identity as checkpoints_identity
from mend.training.config import BatchFactory, Position, TrainConfig, TrainResult, TrainState
from mend.training.run_log import (
    Window,
    flat,
    log_record,
    plot_metrics,
    record_call,
    truncate_metrics,
    write_record,
)


def compile_modules(module: torch.nn.Module) -> None:
    """``torch.compile`` a trained module and, where it reads through a frozen LLM (MEND,
    prompt tuning), that LLM's transformer body. In place, so parameter names, ``state_dict``
    and checkpoints are those of the eager module. Shapes vary from batch to batch, hence
    ``dynamic=True`` rather than a recompilation per shape."""
    module.compile(dynamic=True)
    llm = getattr(module, "llm", None)
    if llm is not None and hasattr(llm, "body"):
        llm.body.compile(dynamic=True)


def train(cfg: TrainConfig, method: Trainable, make_batches: BatchFactory,
          output_dir: str | Path, *, counters: Counters | None = None,
          evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
          keep_best: dict[str, str] | None = None,
          monitor: Callable[[torch.nn.Module], dict[str, float]] | None = None,
          tracker_config: dict[str, Any] | None = None) -> TrainResult:
    """Train ``method`` for ``cfg.max_steps`` steps, resuming from the output directory.

    ``evaluate`` returns metrics with ``score`` (higher is better), which drives early
    stopping. Without ``keep_best``, the best-scoring model is the output directory's
    checkpoint. With ``keep_best={"best_ood": "ood", ...}``, each named metric's best model is
    saved to ``output_dir/<name>`` and the output directory holds the last model.
    ``monitor`` is also called every ``eval_every`` steps; its metrics are logged (as
    ``monitor_<name>``) but select nothing (the content controls of
    :mod:`mend.evaluation.diagnostics`).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # The device the Accelerator will train on (this process's, as accelerate sees it), not
    # whether CUDA exists: a CPU run on a GPU machine (ACCELERATE_USE_CPU) is a CPU run.
    device_type = torch.device(pick_device()).type
    if cfg.mixed_precision == "fp16" and device_type != "cuda":
        raise ConfigError("train.mixed_precision=fp16 needs CUDA; use bf16 or no on a CPU.")
    mixed, why = precision.resolve(cfg.mixed_precision, device_type)
    asks = [f"train.mixed_precision={mixed}"] if mixed == "bf16" else []
    if any(p.dtype == torch.bfloat16 for p in method.module.parameters()):
        asks.append("the model's weights stored in bfloat16")
    if slow := precision.bf16_warning(asks, device_type):
        warnings.warn(slow, stacklevel=2)
    if cfg.tensorboard:
        optional.require("tensorboard", "train.tensorboard=true (or set it to false)")
    engine.check_launch()
    # The loop steps the scheduler once per optimizer step; accelerate would otherwise step it
    # once per process, running the schedule N times too fast on N processes.
    accelerator = Accelerator(mixed_precision=mixed,
                              log_with="tensorboard" if cfg.tensorboard else None,
                              project_dir=str(output_dir), step_scheduler_with_optimizer=False)
    kind = engine.engine_of(accelerator)
    set_seed(cfg.seed, deterministic=cfg.deterministic)
    counters = counters or Counters()
    module = method.module
    if kind in engine.SHARDED:
        engine.check_shardable(method, accelerator, cfg)
    if cfg.gradient_checkpointing:
        if not hasattr(module, "gradient_checkpointing_enable"):
            raise ConfigError(f"{type(module).__name__} does not support gradient checkpointing.")
        module.gradient_checkpointing_enable()
    if cfg.compile:
        compile_modules(module)
    if not any(p.requires_grad for p in module.parameters()):
        raise ConfigError("The method has no trainable parameters.")
    optimizer = optim.optimizer(cfg, optim.param_groups(cfg, module))
    scheduler = optim.scheduler(cfg, optimizer)
    step = engine.TrainStep(method, shard_frozen=kind in engine.SHARDED)
    with step.whole_state_dict():
        model, optimizer, scheduler = accelerator.prepare(step, optimizer, scheduler)
    # After prepare: a sharding engine replaces the parameters with its own.
    params = [p for p in model.parameters() if p.requires_grad]
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    checkpoints = output_dir / "checkpoints"
    main = accelerator.is_main_process
    run = checkpoints_identity(module)
    last = resume(accelerator, checkpoints, state, run) if cfg.resume == "auto" else None
    # Counts are summed over processes when logged, so only the main process carries the
    # totals so far: the checkpoint's on a resume (they include what was counted before
    # training), else what data loading has counted already.
    if last is not None or not main:
        counters.counts = dict(state.counts) if main else {}
    world, rank = accelerator.num_processes, accelerator.process_index
    if state.batches is None:
        state.batches = state.step * cfg.grad_accum * (state.world_size or world)
    position = Position(state.batches, state.world_size or world)
    batches = make_batches(position, rank, world)  # refuses a position it cannot resume
    if position.world != world and main:
        print(f"mend: the checkpoint was written by {position.world} process(es) and the run "
              f"resumes on {world}: the weights and optimizer state are loaded as they are, "
              f"the data goes on from global batch {position.batches}, and the random streams "
              f"differ, so the run is no longer identical to an uninterrupted one.", flush=True)
    state.world_size = world
    if main:
        truncate_metrics(output_dir / "metrics.jsonl", state.step)
        record_call(output_dir, state.step, mixed_precision=f"{mixed} ({why})",
                    engine=kind, processes=world)
        if cfg.mixed_precision == "auto":
            print(f"mend: train.mixed_precision=auto -> {mixed}: {why}", flush=True)
    if cfg.tensorboard:
        accelerator.init_trackers("mend", config=flat(tracker_config or {}))

    stop_signal = SigtermFlag()
    bar = tqdm(total=cfg.max_steps, initial=state.step, disable=not (main and cfg.progress),
               desc="train", dynamic_ncols=True)
    window = Window()
    status = "finished"
    budget = _Budget(cfg.max_minutes, state, accelerator)
    if cfg.eval_every and cfg.eval_at_start and state.step == 0:
        if evaluate is not None:
            selection.select(accelerator, model, method, evaluate, state, cfg, output_dir,
                    keep_best or {})
        if monitor is not None:
            selection.monitor(accelerator, model, monitor, state.step, output_dir)
    out_of_time = budget.spent()
    counting, flops_per_token = cfg.count_flops, None
    model.train()
    try:
        while state.step < cfg.max_steps and not state.stopped and not out_of_time:
            counter = FlopCounterMode(display=False) if counting else nullcontext()
            tokens_before = window.tokens
            with counter:
                grad_norm = _step(cfg, accelerator, model, optimizer, scheduler, params,
                                  batches, window, state.step + 1)
            if counting:
                flops_per_token = counter.get_total_flops() / max(
                    window.tokens - tokens_before, 1)
                counting = False
            state.step += 1
            state.batches += cfg.grad_accum * world
            bar.update(1)
            out_of_time = budget.spent()
            if state.step % cfg.log_every == 0 or state.step == cfg.max_steps or out_of_time:
                record = log_record(accelerator, window, scheduler, state.step, grad_norm,
                                    counters)
                if flops_per_token is not None:
                    record["model_flops_per_s"] = flops_per_token * record["tokens_per_s"]
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                tok_s=f"{record['tokens_per_s']:.0f}")
                write_record(accelerator, output_dir, record, cfg.tensorboard)
            # The last step of a spent budget is scored too, so its training can be kept.
            scored = cfg.eval_every and (state.step % cfg.eval_every == 0 or out_of_time)
            if evaluate is not None and scored:
                began = time.perf_counter()
                selection.select(accelerator, model, method, evaluate, state, cfg, output_dir,
                        keep_best or {})
                window.start += time.perf_counter() - began  # throughput excludes evaluation
            if monitor is not None and scored:
                began = time.perf_counter()
                selection.monitor(accelerator, model, monitor, state.step, output_dir)
                window.start += time.perf_counter() - began
            if stop_signal.raised:
                accelerator.set_trigger()
            if accelerator.check_trigger():
                status = "interrupted"
                break
            if state.step % cfg.save_every == 0 or state.stopped:
                save_checkpoint(accelerator, checkpoints, state, counters, cfg.keep_checkpoints,
                                run)
        if state.stopped and status != "interrupted":
            status = "early_stopped"
        if out_of_time and status == "finished" and state.step < cfg.max_steps and main:
            print(f"mend: train.max_minutes={cfg.max_minutes:g} spent at step {state.step} of "
                  f"{cfg.max_steps}: the run ends here, as finished.", flush=True)
        if not (checkpoints / f"step-{state.step:08d}").is_dir():
            save_checkpoint(accelerator, checkpoints, state, counters, cfg.keep_checkpoints,
                            run)
        if status != "interrupted" and (keep_best or state.best_step is None
                                        or evaluate is None):
            # nothing selected: the final model is the run's checkpoint
            selection.save_model(accelerator, model, method, output_dir)
        if main and status != "interrupted":
            plot_metrics(output_dir)
    finally:
        bar.close()
        stop_signal.restore()
        if cfg.tensorboard:
            accelerator.end_training()
    if main and status == "interrupted":
        print(f"mend: stopped by SIGTERM at step {state.step}; checkpoint saved. Run the same "
              f"command again to resume.", flush=True)
    return TrainResult(state.step, status, state.best_score, state.best_step)


class _Budget:
    """``train.max_minutes``, counted over every start of a run: ``state.seconds`` holds the
    time of the starts before this one (checkpoints carry it). Every process stops at the
    same step: the main process's clock decides, and is broadcast."""

    def __init__(self, minutes: float | None, state: TrainState, accelerator: Accelerator):
        self.minutes, self.state, self.accelerator = minutes, state, accelerator
        self.began, self.before = time.perf_counter(), state.seconds

    def spent(self) -> bool:
        self.state.seconds = self.before + time.perf_counter() - self.began
        if self.minutes is None:
            return False
        spent = self.state.seconds >= self.minutes * 60
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([float(spent)], device=self.accelerator.device)
            spent = bool(broadcast(flag).item())
        return spent


# --------------------------------------------------------------------------------------------
# One optimizer step


def _step(cfg: TrainConfig, accelerator: Accelerator, model: nn.Module,
          optimizer: torch.optim.Optimizer, scheduler: LRScheduler, params: list[nn.Parameter],
          batches: Iterator[dict[str, Any]], window: Window, step: int) -> float | None:
    """One optimizer step over ``cfg.grad_accum`` micro-batches; returns the gradient norm.

    It reads the device once, after the backward passes: whether any micro-batch's loss was
    non-finite on any process, and the gradient norm, in one transfer. Each read is a host
    sync, which leaves a GPU idle until the host has queued the next kernels; the loss terms
    are summed on the device until a log line needs them (:class:`~.run_log.Window`). A bad
    loss stops the run before the optimizer steps, so no weight takes its gradient.
    """
    finite = torch.ones((), device=accelerator.device)
    losses = []
    for micro in range(cfg.grad_accum):
        batch = next(batches)
        # Only the last micro-batch synchronises gradients across processes.
        sync = accelerator.no_sync(model) if micro < cfg.grad_accum - 1 else nullcontext()
        with sync, accelerator.autocast():
            out = model(batch)
            loss = out["loss"]
            losses.append(loss.detach())
            finite = finite * torch.isfinite(losses[-1]).to(finite.dtype)
            accelerator.backward(loss / cfg.grad_accum)
        window.add(out, batch.get("tokens", 0))
    norm = None
    if cfg.max_grad_norm is not None:
        norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
    # Every process stops together: the flags are summed over processes.
    read = [accelerator.reduce(1 - finite, "sum").reshape(1).float()]
    if isinstance(norm, torch.Tensor):  # DeepSpeed gives none before its first step
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2's DTensor
        read.append(norm.detach().reshape(1).float().to(read[0].device))
    values = torch.cat(read).tolist()
    if values[0] > 0:
        bad = [i for i, x in enumerate(losses) if not math.isfinite(float(x))]
        where = (f"{float(losses[bad[0]])} at step {step} (micro-batch {bad[0]})" if bad else
                 f"non-finite on another process at step {step}")
        raise TrainingError(
            f"The loss became {where}. Lower train.lr (now {cfg.lr:g}), use "
            f"train.mixed_precision=bf16 or no instead of fp16, or keep train.max_grad_norm "
            f"set (now {cfg.max_grad_norm}).")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return values[1] if len(values) > 1 else None
