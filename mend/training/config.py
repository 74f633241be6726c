"""How long and in what order a run trains: :class:`TrainConfig` (the ``train:`` section of
every training config), where a run stands (:class:`TrainState`, which checkpoints carry),
what it ends with, and :func:`by_epochs` for jobs counted in epochs (the NLI and
step-by-step baselines)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from mend.config import checked, replace
from mend.counters import Counters
from mend.data import batches
from mend.errors import ConfigError


@dataclass(frozen=True)
@checked
class TrainConfig:
    max_steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 8
    """Examples per device per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (the global batch is batch_size x grad_accum x GPUs)."""
    lr: float = 5e-5
    lr_multipliers: dict[str, float] = field(default_factory=dict)
    """Per-parameter-group LR factors, keyed by the start of the parameter's name, e.g.
    ``{placeholders: 10, projection: 10}`` trains MEND's placeholders and projection 10x
    faster than the distiller (a name matching none keeps ``lr``)."""
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    lr_schedule: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    """Warmup as a fraction of max_steps; used when warmup_steps is 0."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this (null: no clipping)."""
    optimizer: Literal["adamw", "adamw_8bit"] = "adamw"
    mixed_precision: Literal["no", "bf16", "fp16", "auto"] = "no"
    """``auto``: bf16 where this machine computes it natively, measured on a CPU, else fp32
    (:mod:`mend.training.precision`); the choice and its reason are printed and kept in
    ``provenance.jsonl``."""
    gradient_checkpointing: bool = False
    count_flops: bool = False
    """Count the model FLOPs of this start's first step (``torch.utils.flop_counter``: matmuls
    and attention, forward and backward); every log line then carries ``model_flops_per_s``,
    its FLOPs per token times the tokens/s, from which MFU is one division by the device's
    peak."""
    compile: bool = False
    """``torch.compile`` the trained module and the frozen LLM's body, in place (checkpoint keys
    are unchanged); ``bench/train.py`` measures when it pays."""
    seed: int = 42
    deterministic: bool = False
    """Also ask torch for deterministic kernels (slower on GPU)."""
    log_every: int = 10
    save_every: int = 200
    keep_checkpoints: int = 2
    max_minutes: float | None = None
    """A wall-clock budget for training (resumes included): once spent, the run saves a
    checkpoint, writes its model, metrics and curves, and ends as a finished run, before
    ``max_steps`` if need be. null: no budget. The schedule still runs over ``max_steps``."""
    eval_every: int = 0
    """Steps between model-selection evaluations (0: never)."""
    eval_at_start: bool = False
    """Also evaluate (and log the monitored controls) before the first step, so selection
    keeps the starting model when no step beats it (a warm-started distiller, ``output:
    compacted``), and the curves start where training did."""
    patience: int = 5
    """Stop after this many evaluations without improvement."""
    tensorboard: bool = False
    resume: Literal["auto", "never"] = "auto"
    """``auto``: continue from the last checkpoint in the output directory, if any."""
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "log_every", "save_every",
                     "keep_checkpoints", "patience"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}.")
        if any(v <= 0 for v in self.lr_multipliers.values()):
            raise ConfigError(f"train.lr_multipliers must all be > 0, got {self.lr_multipliers}.")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ConfigError(f"train.max_minutes must be > 0 (or null), got {self.max_minutes}.")
        if self.lr <= 0 or not 0.0 <= self.warmup_ratio < 1.0 or self.warmup_steps < 0:
            raise ConfigError("train.lr must be > 0, train.warmup_ratio in [0, 1) and "
                              "train.warmup_steps >= 0.")


@dataclass
class TrainState:
    """What a checkpoint records beyond accelerate's model/optimizer/scheduler/RNG state."""

    step: int = 0
    best_score: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    best_by: dict[str, float] = field(default_factory=dict)
    """Best value of each ``keep_best`` metric so far."""
    stopped: bool = False
    counts: dict[str, int] = field(default_factory=dict)
    """The data pipeline's counts over all processes, at this step."""
    batches: int | None = None
    """Global micro-batches consumed (None in checkpoints older than this field: then
    ``step * grad_accum * world_size``)."""
    world_size: int | None = None
    """The number of processes that trained up to this step."""
    seconds: float = 0.0
    """Wall-clock seconds of training so far, over every start (``train.max_minutes``)."""

    def state_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


@dataclass
class TrainResult:
    step: int
    status: str
    """``finished`` (``max_steps`` or ``max_minutes`` reached), ``early_stopped`` or
    ``interrupted`` (SIGTERM: run again to resume)."""
    best_score: float | None
    best_step: int | None


class Position(NamedTuple):
    """Where a run stands in its data: ``batches`` global micro-batches consumed so far (one
    per process per micro-step), by ``world`` processes (the checkpoint's, on a resume).

    Data read round-robin (global batch ``g`` to rank ``g % world``) goes on from
    ``batches`` whatever the number of processes now; data each rank reads on its own
    (stage 1's ``data.split_by_node``) can resume only on ``world`` processes."""

    batches: int
    world: int


BatchFactory = Callable[[Position, int, int], Iterator[dict[str, Any]]]
"""``(position to start from, rank, world size) -> this rank's batches``."""


def by_epochs(cfg: TrainConfig, items: Sequence[Any], epochs: int, collate,
              counters: Counters) -> tuple[TrainConfig, BatchFactory]:
    """Train on ``items`` for ``epochs`` passes, each in its own order (seeded by
    ``cfg.seed`` and the epoch), evaluating and saving once an epoch and never stopping
    early: the config for :func:`train` and its batch factory."""
    steps = math.ceil(len(items) / cfg.batch_size)
    cfg = replace(cfg, max_steps=epochs * steps, eval_every=steps, save_every=steps,
                  patience=epochs + 1)

    def epoch_items(epoch: int) -> list[Any]:
        order = list(items)
        random.Random(f"{cfg.seed}-{epoch}").shuffle(order)
        return order

    def make_batches(start: Position, rank: int, world: int):
        return batches(epoch_items, cfg.batch_size, collate, start=start.batches, rank=rank,
                       world=world, counters=counters)

    return cfg, make_batches


