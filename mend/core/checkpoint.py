"""Checkpoints of trained weights only, as PEFT writes them: safetensors plus a JSON config.

A checkpoint directory holds ``<kind>_weights.safetensors`` (only what was trained) and
``<kind>_config.json`` (the config that rebuilds the model around them, naming its base
models). Each file is written under a temporary name and renamed, so an interrupted save never
leaves a corrupt file behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mend._version import __version__
from mend.errors import CheckpointError


def paths(directory: str | os.PathLike, kind: str) -> tuple[Path, Path]:
    directory = Path(directory)
    return directory / f"{kind}_config.json", directory / f"{kind}_weights.safetensors"


def save(directory: str | os.PathLike, kind: str, config: dict[str, Any],
         tensors: dict[str, torch.Tensor]) -> None:
    config_path, weights_path = paths(directory, kind)
    if config_path.parent.exists() and not config_path.parent.is_dir():
        raise CheckpointError(f"Cannot save a checkpoint to {config_path.parent}: it is a file, "
                              f"and a checkpoint is a directory. Choose another path (the file "
                              f"was left as it is).")
    config_path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with tempfile.NamedTemporaryFile(dir=config_path.parent, suffix=".tmp", delete=False) as f:
        save_file(tensors, f.name, metadata={"format": "pt"})
    os.replace(f.name, weights_path)
    meta = {"mend_version": __version__, "kind": kind, "config": config}
    with tempfile.NamedTemporaryFile("w", dir=config_path.parent, suffix=".tmp",
                                     delete=False) as f:
        json.dump(meta, f, indent=2)
    os.replace(f.name, config_path)


def read_config(directory: str | os.PathLike, kind: str) -> dict[str, Any]:
    config_path, weights_path = paths(directory, kind)
    if not config_path.is_file() or not weights_path.is_file():
        found = sorted(p.name for p in Path(directory).glob("*_config.json")) if Path(
            directory).is_dir() else []
        raise CheckpointError(
            f"{directory} is not a {kind} checkpoint: it needs {config_path.name} and "
            f"{weights_path.name}" + (f" (it has {', '.join(found)})." if found else "."))
    try:
        meta = json.loads(config_path.read_text())
        return meta["config"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        reason = "has no `config` entry" if isinstance(e, (KeyError, TypeError)) else (
            f"is not valid JSON ({e})")
        raise CheckpointError(
            f"{config_path} {reason}, so the checkpoint is damaged (an interrupted copy?). "
            f"Copy or save the checkpoint again, or point at another one.") from None


def load_weights(directory: str | os.PathLike, kind: str) -> dict[str, torch.Tensor]:
    weights_path = paths(directory, kind)[1]
    try:
        return load_file(weights_path)
    except Exception as e:  # safetensors raises its own SafetensorError (or OSError)
        raise CheckpointError(
            f"{weights_path} cannot be read ({type(e).__name__}: {e}): the file is truncated "
            f"or damaged. Copy or save the checkpoint again, or point at another one."
        ) from None
