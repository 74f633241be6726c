"""What trains and how fast: the trainable parameters grouped by learning rate, the optimizer,
and the learning-rate schedule, each read from :class:`~mend.training.config.TrainConfig`."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler
from transformers import get_scheduler

from mend.core.backbones import bitsandbytes_problem
from mend.errors import ConfigError, TrainingError
from mend.training.config import TrainConfig


def param_groups(cfg: TrainConfig, module: torch.nn.Module) -> list[dict[str, Any]]:
    """The trainable parameters, grouped by their LR (``lr_multipliers``: longest prefix wins)."""
    prefixes = sorted(cfg.lr_multipliers, key=len, reverse=True)
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            hit = next((k for k in prefixes if name.startswith(k)), None)
            groups.setdefault(cfg.lr_multipliers[hit] if hit else 1.0, []).append(p)
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    unused = [k for k in prefixes if not any(n.startswith(k) for n in names)]
    if unused:
        starts = ", ".join(sorted({n.split(".")[0] for n in names}))
        raise ConfigError(f"train.lr_multipliers names {unused}, which starts no trainable "
                          f"parameter's name; names start with: {starts}.")
    # The base group first: the logged "lr" is the first group's.
    return [{"params": groups[m], "lr": cfg.lr * m} for m in sorted(groups, key=lambda m: m != 1.0)]


def optimizer(cfg: TrainConfig, params: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW (CUDA only), over the parameter groups."""
    if cfg.optimizer == "adamw_8bit":
        problem = bitsandbytes_problem()
        if problem is not None:
            raise TrainingError(f"train.optimizer=adamw_8bit needs bitsandbytes on CUDA, but "
                                f"{problem}. Use train.optimizer=adamw.")
        import bitsandbytes as bnb  # optional: mend[8bit]
        return bnb.optim.AdamW8bit(params, lr=cfg.lr, betas=cfg.betas,
                                   weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> LRScheduler:
    """transformers' schedule ``lr_schedule``, warming up for ``warmup_steps`` (or the
    ``warmup_ratio`` of ``max_steps``)."""
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * cfg.max_steps)
    return get_scheduler(cfg.lr_schedule, optimizer, num_warmup_steps=warmup,
                         num_training_steps=cfg.max_steps)
