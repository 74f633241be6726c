"""Memory per GPU of the shipped scale configs, before a run, and the estimate checked against
the memory of real runs.

    python bench/memory.py            # the scale configs, and the check on tiny models (CPU)
    python bench/memory.py --tiny     # the check alone (seconds)

**Scale configs** (``configs/pretrain/*-llama2-*.yaml``): :mod:`mend.training.memory`'s
estimate under DDP, FSDP over ``--processes`` GPUs and DDP with the LLM in 8-bit, with and
without activation checkpointing, at each config's batch and lengths. Offline, hub models
are read from ``bench/architectures/`` (their configs, no weights) and SmolLM2 from the zoo.

**The check**: stage 1 on tiny models, two CPU processes under DDP and under FSDP2 (through
the shipped accelerate configs), each measuring what it holds at step 2: its parameters (its
shards under FSDP), what trains, its optimizer state, and the bytes autograd saved for the
backward pass of that step. Beside each, the estimate for the same config, made before the
run. FSDP's gathered copies and DDP's gradient buckets are transient or internal, so they are
compared apart from what is measured.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import common  # noqa: E402

OFFLINE = {"meta-llama/Llama-2-7b-hf": "bench/architectures/llama-2-7b",
           "meta-llama/Llama-2-13b-hf": "bench/architectures/llama-2-13b",
           "gpt2": "bench/architectures/gpt2", "HuggingFaceTB/SmolLM2-135M": "smollm2-135m"}
"""Hub ids of the scale configs -> the same architectures readable here."""
SCALE = ("configs/pretrain/gpt2-llama2-13b-8bit.yaml",
         "configs/pretrain/smollm2-llama2-7b-fsdp.yaml")
COLUMNS = ["config", "engine", "processes", "batch_size", "checkpointing", "parameters_gib",
           "gathered_gib", "gradients_gib", "optimizer_gib", "activations_gib", "total_gib"]


def main(argv=None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, default=8, help="GPUs FSDP shards over")
    args = p.parse_args(argv)
    rows, notes = [] if args.tiny else scale_rows(args.processes), []
    checks, targets = check()
    notes.append("Estimates are per GPU; activations are at the config's train.batch_size per "
                 "GPU, measured on 1- and 2-layer copies of the models (see "
                 "mend/training/memory.py).")
    common.write(args, "memory", rows + checks, COLUMNS + ["measured_total_mib",
                                                          "estimated_total_mib"],
                 targets=targets, notes=notes)
    return 0


def scale_rows(processes: int) -> list[dict]:
    from mend.config import load_config
    from mend.recipes.pretrain import PretrainConfig
    from mend.training import memory

    rows = []
    for path in SCALE:
        cfg = load_config(PretrainConfig, str(ROOT / path), [])
        cfg = load_config(PretrainConfig, str(ROOT / path), [
            f"model.distiller={offline(cfg.model.distiller)}",
            f"model.llm={offline(cfg.model.llm)}"])
        for checkpointing in (False, True):
            for engine in ("ddp", "fsdp", "8bit"):
                est = memory.estimate(cfg.model, cfg.data, cfg.train.batch_size, engine,
                                      processes if engine == "fsdp" else 1,
                                      cfg.train.mixed_precision, checkpointing)
                rows.append({"config": Path(path).name,
                             "checkpointing": "on" if checkpointing else "off", **est.row()})
    return rows


def offline(name: str) -> str:
    """A hub id of the scale configs as a reference readable without the hub."""
    local = OFFLINE.get(name, name)
    return str(ROOT / local) if local.startswith("bench/") else local


def check() -> tuple[list[dict], list[dict]]:
    """Tiny stage-1 runs on two CPU processes, measured, beside their estimates."""
    from mend import tiny
    from mend.config import load_config
    from mend.recipes.pretrain import PretrainConfig
    from mend.training import memory
    from tests.support import launch

    root = Path(tempfile.mkdtemp(prefix="mend-memory-"))
    lines = tiny.CORPUS.splitlines()
    text = root / "text.txt"
    text.write_text("\n".join(" ".join(f"{i}{j} {line}" for j, line in enumerate(lines))
                              for i in range(12)) + "\n")
    args = [f"model.distiller={tiny.build(root / 'llama', 'llama', 'metaspace')}",
            f"model.llm={tiny.build(root / 'gpt2', 'gpt2', 'bytelevel', hidden=48)}",
            "model.num_placeholders=4", "model.max_distiller_length=256", f"data.path={text}",
            "data.max_length=128", "data.min_length=100", "train.batch_size=4",
            "train.max_steps=2", "train.progress=false"]
    cfg = load_config(PretrainConfig, None, args)
    rows, targets = [], []
    for config, engine in (("multi_gpu.yaml", "ddp"), ("fsdp.yaml", "fsdp")):
        measured_dir = root / f"measured-{engine}"
        measured_dir.mkdir()
        run = launch(config, 2, args + [f"output_dir={root / engine}"], root,
                     measure=measured_dir)
        if run.returncode:
            raise SystemExit(run.stderr[-3000:])
        measured = json.loads((measured_dir / "rank-0.json").read_text())
        est = memory.estimate(cfg.model, cfg.data, cfg.train.batch_size, engine, 2)
        buckets = 2 if engine == "ddp" else 1  # DDP's gradient buckets, not measured here
        held = {"parameters": est.parameters, "gradients": est.gradients // buckets,
                "optimizer": est.optimizer, "activations": est.activations}
        seen = {"parameters": measured["parameters"], "gradients": measured["trained"],
                "optimizer": measured["optimizer"], "activations": measured["activations"]}
        rows.append({"config": "tiny, measured on 2 CPU processes", "checkpointing": "off",
                     **est.row(), "measured_total_mib": round(sum(seen.values()) / 2**20, 3),
                     "estimated_total_mib": round(sum(held.values()) / 2**20, 3)})
        for part in held:
            error = abs(held[part] / seen[part] - 1)
            targets.append(common.target(f"{engine} {part}: relative error of the estimate",
                                         error, 0.10, higher_is_better=False))
    return rows, targets


if __name__ == "__main__":
    sys.exit(main())
