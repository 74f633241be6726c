"""Model selection and monitoring inside the training loop (:func:`mend.training.loop.train`):
every ``eval_every`` steps the method is scored, the best model kept and early stopping
decided (:func:`select`), and the monitored controls logged, which select nothing
(:func:`monitor`). Under a sharding engine every rank takes part, each gathering what it reads.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast
from torch import nn

from mend.methods.base import Trainable
from mend.training import engine
from mend.training.config import TrainConfig, TrainState



def select(accelerator: Accelerator, model: nn.Module, method: Trainable,
           evaluate: Callable[[nn.Module], dict[str, Any]], state: TrainState, cfg: TrainConfig,
           output_dir: Path, keep_best: dict[str, str]) -> None:
    """Evaluate, keep the best model(s), and decide on early stopping."""
    keys = ["score", *keep_best.values()]
    values = torch.zeros(len(keys), device=accelerator.device, dtype=torch.float64)
    metrics = run_on_model(accelerator, model, evaluate)
    if metrics is not None:
        values[:] = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    if accelerator.is_main_process:
        with open(output_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": state.step, **{f"eval_{k}": v for k, v in
                                                       metrics.items()}}) + "\n")
    values = broadcast(values).tolist()
    score = values[0]
    for name, value in zip(keep_best, values[1:]):
        if name not in state.best_by or value > state.best_by[name]:
            state.best_by[name] = value
            save_model(accelerator, model, method, output_dir / name)
    if state.best_score is None or score > state.best_score:
        state.best_score, state.best_step, state.evals_without_improvement = (
            score, state.step, 0)
        if not keep_best:
            save_model(accelerator, model, method, output_dir)
    else:
        state.evals_without_improvement += 1
        state.stopped = state.evals_without_improvement >= cfg.patience
    accelerator.wait_for_everyone()


def monitor(accelerator: Accelerator, model: nn.Module,
            controls: Callable[[nn.Module], dict[str, Any]], step: int, output_dir: Path) -> None:
    """Log the ``controls``' metrics as ``monitor_<name>`` (main process); nothing is selected
    by them."""
    metrics = run_on_model(accelerator, model, controls)
    if accelerator.is_main_process:
        with open(output_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **{f"monitor_{k}": v for k, v in
                                                 metrics.items()}}) + "\n")
        print(f"mend: step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                                                 if isinstance(v, float)), flush=True)
    accelerator.wait_for_everyone()


def run_on_model(accelerator: Accelerator, model: nn.Module, fn: Callable[[nn.Module], Any]
                  ) -> dict[str, Any] | None:
    """``fn(trained module)`` in eval mode: on the main process alone (None elsewhere), or,
    where the model is sharded, on every rank in step, each gathering what it reads."""
    sharded = engine.engine_of(accelerator) in engine.SHARDED
    if not (sharded or accelerator.is_main_process):
        return None
    model.eval()
    try:
        with engine.gathered(accelerator, model):
            return fn(accelerator.unwrap_model(model).trained)
    finally:
        model.train()


def save_model(accelerator: Accelerator, model: nn.Module, method: Trainable, path: Path) -> None:
    """``method.save_pretrained(path)`` on the main process, from weights gathered off every
    rank where the model is sharded."""
    if engine.engine_of(accelerator) in engine.SHARDED:
        state = engine.trained_state_dict(accelerator, model)
        if accelerator.is_main_process:
            method.save_pretrained(path, state_dict=state)
    elif accelerator.is_main_process:
        method.save_pretrained(path)
    accelerator.wait_for_everyone()
