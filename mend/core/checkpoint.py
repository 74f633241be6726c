"""Checkpoints of trained weights only, as PEFT writes them: safetensors plus a JSON config.

A checkpoint directory holds ``<kind>_weights.safetensors`` (only what was trained) and
``<kind>_config.json`` (the config that rebuilds the model around them, naming its base
models). The directory may hold other things (a training run's logs and checkpoints), so a
save replaces the two files, never the directory:

- both are written in full under temporary names beside them first; a save that fails there
  (a read-only file, a full disk, a kill) leaves the checkpoint that was there as it was,
  and removes what it wrote (a kill's leftovers go at the next save);
- then each is renamed over its old self. Both carry one save id (the config's ``save``, the
  weights' metadata), so a kill between the two renames reads as a mismatch, never as a
  model of one save's weights and another's config;
- files get the user's umask, as any file the user writes does.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mend._files import user_mode
from mend._version import __version__
from mend.errors import CheckpointError


def paths(directory: str | os.PathLike, kind: str) -> tuple[Path, Path]:
    directory = Path(directory)
    return directory / f"{kind}_config.json", directory / f"{kind}_weights.safetensors"


def save(directory: str | os.PathLike, kind: str, config: dict[str, Any],
         tensors: dict[str, torch.Tensor]) -> None:
    config_path, weights_path = paths(directory, kind)
    folder = config_path.parent
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"Cannot save a checkpoint to {folder}: it is a file, and a "
                              f"checkpoint is a directory. Choose another path (the file was "
                              f"left as it is).")
    save_id = uuid.uuid4().hex
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {"mend_version": __version__, "kind": kind, "save": save_id, "config": config}
    staged = [folder / f".{weights_path.name}.{save_id}.tmp",
              folder / f".{config_path.name}.{save_id}.tmp"]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob(f".{kind}_*.tmp"):  # a killed save's leftovers
            old.unlink(missing_ok=True)
        save_file(tensors, str(staged[0]), metadata={"format": "pt", "mend_save": save_id})
        staged[1].write_text(json.dumps(meta, indent=2))
        user_mode(*staged)
    except OSError as e:
        for path in staged:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        raise CheckpointError(
            f"Cannot write the checkpoint to {folder} ({type(e).__name__}: {e.strerror or e}). "
            f"Choose a writable path with room for it; any checkpoint that was there is "
            f"unchanged.") from None
    os.replace(staged[0], weights_path)
    os.replace(staged[1], config_path)


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
        config = meta["config"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        reason = "has no `config` entry" if isinstance(e, (KeyError, TypeError)) else (
            f"is not valid JSON ({e})")
        raise CheckpointError(
            f"{config_path} {reason}, so the checkpoint is damaged (an interrupted copy?). "
            f"Copy or save the checkpoint again, or point at another one.") from None
    if meta.get("kind", kind) != kind:
        raise CheckpointError(f"{directory} holds a `{meta['kind']}` checkpoint, not a `{kind}` "
                              f"one. Point at a {kind} checkpoint.")
    if _newer(meta.get("mend_version")):
        raise CheckpointError(
            f"{directory} was written by mend {meta['mend_version']}, newer than this mend "
            f"({__version__}), and may hold what this one cannot read. Upgrade mend "
            f"(pip install -U mend, or pull and reinstall it).")
    if "save" in meta:
        try:
            with safe_open(str(weights_path), "pt") as f:
                weights_save = (f.metadata() or {}).get("mend_save")
        except Exception:  # noqa: BLE001 - a damaged file: load_weights names the damage
            weights_save = None
        if weights_save is not None and weights_save != meta["save"]:
            raise CheckpointError(
                f"{directory}: {weights_path.name} and {config_path.name} come from two "
                f"different saves (one was interrupted between its two files). Save the "
                f"checkpoint again, or point at another one.")
    return config


def _newer(version: Any) -> bool:
    """Whether a checkpoint's ``mend_version`` is newer than this mend's."""
    def parts(v: str) -> tuple[int, ...]:
        return tuple(int(p) for p in v.split(".")[:3] if p.isdigit())
    try:
        return parts(str(version)) > parts(__version__)
    except ValueError:
        return False


def load_weights(directory: str | os.PathLike, kind: str) -> dict[str, torch.Tensor]:
    weights_path = paths(directory, kind)[1]
    try:
        return load_file(weights_path)
    except Exception as e:  # safetensors raises its own SafetensorError (or OSError)
        raise CheckpointError(
            f"{weights_path} cannot be read ({type(e).__name__}: {e}): the file is truncated "
            f"or damaged. Copy or save the checkpoint again, or point at another one."
        ) from None
