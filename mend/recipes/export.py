"""``mend export STEP OUTPUT``: one saved step of a MEND training run as a checkpoint.

    mend export out/warm/stage2/checkpoints/step-00000300 out/warm/stage2-300
    mend export out/warm/stage2/checkpoints/step-00000300 weights/ dtype=bfloat16

A run's output directory holds its final (stage 1) or selected (stage 2) model; its
``checkpoints/step-N`` hold the training state (accelerate's files: the trained weights under
the training module's names, the optimizer, the RNG). This writes step N's weights as what
:meth:`~mend.core.distiller.Distiller.save_pretrained` writes, so that ``from_pretrained``,
``mend eval checkpoint=`` and ``mend demo checkpoint=`` read it: for a curve over training
(score each kept step), or the latest weights of a run still going. The model is rebuilt from
the run's ``config.yaml`` and its own saved model (or, before it saved one, its ``init_from``),
so every weight the run did not train (frozen placeholders, say) is the one it trained with.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import yaml
from safetensors.torch import load_file

from mend.config import checked, from_dict
from mend.core.config import MendConfig
from mend.core.distiller import CONFIG_FILE
from mend.errors import CheckpointError, ConfigError
from mend.recipes.run import Recipe, load_distiller, run
from mend.training.checkpoints import ENGINE_FILE

TRAINED = "trained."
"""The prefix of the trained module's weights in a step's ``model.safetensors``
(:class:`~mend.training.engine.TrainStep` holds the module as ``trained``)."""


@dataclass(frozen=True)
@checked
class ExportConfig:
    step: str
    """A training checkpoint: ``<run>/checkpoints/step-N``."""
    output: str
    """The checkpoint directory to write."""
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """Store the weights in this dtype (None: as trained); bfloat16 halves a float32 run's."""


def main(cfg: ExportConfig) -> Path:
    """Write one saved step of a MEND training run as a checkpoint."""
    step, out = Path(cfg.step), Path(cfg.output)
    weights = _step_weights(step)
    run_dir = step.parent.parent
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    if config.get("method", "mend") != "mend" or "model" not in config:
        raise ConfigError(f"{run_dir} is not a MEND training run (its config.yaml names method "
                          f"{config.get('method')!r}); mend export writes MEND distillers.")
    # The run's own saved model, where it wrote one (a selection, or its end), else what it
    # started from: either holds the weights it does not train.
    base = run_dir if (run_dir / CONFIG_FILE).is_file() else config.get("init_from")
    distiller = load_distiller(from_dict(MendConfig, config["model"]), base, "cpu")
    mine = distiller.state_dict()
    trained = {n for n, p in distiller.named_parameters() if p.requires_grad}
    foreign = sorted(weights.keys() - mine.keys())
    missing = sorted(trained - weights.keys())
    if foreign or missing:
        raise CheckpointError(
            f"{step} does not hold this run's trained weights ("
            + (f"{len(foreign)} it has that the model lacks, e.g. {foreign[0]}" if foreign
               else f"{len(missing)} the model trains that it lacks, e.g. {missing[0]}")
            + f"): was {run_dir / 'config.yaml'} changed after it was written?")
    distiller.load_state_dict(weights, strict=False)
    distiller.save_pretrained(out, dtype=getattr(torch, cfg.dtype) if cfg.dtype else None)
    print(f"mend export: {step} -> {out}")
    return out


def _step_weights(step: Path) -> dict[str, torch.Tensor]:
    """The trained module's weights in ``step`` (``model.safetensors``), under its own
    names."""
    path = step / "model.safetensors"
    if not (step / ENGINE_FILE).is_file() or not (step.parent.parent / "config.yaml").is_file():
        raise CheckpointError(f"{step} is not a training checkpoint: point at "
                              f"<run>/checkpoints/step-N of a `mend pretrain` or `mend finetune` "
                              f"run (a run's own directory is a checkpoint already).")
    if not path.is_file():
        raise CheckpointError(f"{step} holds no model.safetensors: a sharded engine (FSDP, "
                              f"DeepSpeed) wrote it in shards. Its run's output directory holds "
                              f"the gathered model.")
    return {k[len(TRAINED):]: v for k, v in load_file(path).items() if k.startswith(TRAINED)}


def cli(argv=None) -> int:
    """``mend export STEP OUTPUT [dtype=bfloat16]`` (or ``step=... output=...``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    for i, name in enumerate(("step", "output")):
        if len(args) > i and "=" not in args[i] and not args[i].startswith("-"):
            args[i] = f"{name}={args[i]}"
    return run(Recipe(ExportConfig, main), args, prog="mend export")
