"""How a result was made: the config, package versions, git commit, machine, command and time
that every results file and training log carries, and the atomic JSON writer they go through.
Below every layer that writes results (training, evaluation, the jobs, the benches)."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import torch

PACKAGES = ("mend", "torch", "transformers", "accelerate", "peft", "datasets", "safetensors",
            "numpy", "scikit-learn", "bitsandbytes")


def provenance(config: dict[str, Any] | None = None) -> dict[str, Any]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"config": config, "versions": versions, "git": git_state(),
            "machine": {"platform": platform.platform(), "python": platform.python_version(),
                        "device": device, "cpu_count": os.cpu_count(),
                        "torch_threads": torch.get_num_threads()},
            "command": " ".join(sys.argv),
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def git_state() -> dict[str, Any] | None:
    """The commit of the repository mend was installed from, and whether it was dirty.

    A copy of the tree without ``.git`` (a remote GPU machine, say) reports the commit that
    ``MEND_GIT_COMMIT`` names, marked as such.
    """
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, timeout=10,
                               check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = os.environ.get("MEND_GIT_COMMIT")
        return {"commit": commit, "dirty": None, "source": "MEND_GIT_COMMIT"} if commit else None
    return {"commit": commit, "dirty": bool(dirty)}


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (a temporary file beside it, then a rename), with the user's
    umask, as any file the user writes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        staged.write_text(json.dumps(data, indent=2))
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    os.replace(staged, path)
