"""``mend memory``: a stage-1 config's memory per GPU under each engine, before any run.

    mend memory --config configs/pretrain/smollm2-llama2-7b-fsdp.yaml --processes 8
    mend memory --config configs/pretrain/gpt2-llama2-13b-8bit.yaml --engines 8bit ddp \\
        model.llm=bench/architectures/llama-2-13b

Engines: ``ddp`` (the LLM in ``model.llm_dtype`` on every GPU), ``fsdp`` (everything sharded
over ``--processes``) and ``8bit`` (DDP with the LLM in int8). How each part is counted is in
:mod:`mend.training.memory`. Prints a markdown table; ``--output FILE`` also writes JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mend.config import config_data, from_dict
from mend.recipes.pretrain import PretrainConfig
from mend.training import memory


def table(rows: list[dict]) -> str:
    """Rows of :meth:`mend.training.memory.Estimate.row` as a markdown table (GiB)."""
    keys = [k for k in rows[0] if k != "config"]
    lines = ["| " + " | ".join(k.replace("_gib", " (GiB)") for k in keys) + " |",
             "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(config: str, overrides: list[str], engines: list[str], processes: int,
         checkpointing: bool = False) -> list[dict]:
    """One row per engine for the stage-1 config ``config`` (with ``overrides``)."""

    cfg = from_dict(PretrainConfig, config_data(config, overrides))
    return [memory.estimate(cfg.model, cfg.data, cfg.train.batch_size, engine,
                            processes if engine == "fsdp" else 1, cfg.train.mixed_precision,
                            checkpointing or cfg.train.gradient_checkpointing).row()
            for engine in engines]


def cli(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mend memory", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="a stage-1 YAML config")
    parser.add_argument("--engines", nargs="+", default=["ddp", "fsdp", "8bit"],
                        choices=["ddp", "fsdp", "8bit"])
    parser.add_argument("--processes", type=int, default=8, help="GPUs FSDP shards over")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="count activations with layers recomputed in backward")
    parser.add_argument("--output", help="also write the rows as JSON here")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.llm=DIR")
    args = parser.parse_args(argv)
    rows = main(args.config, args.overrides, args.engines, args.processes,
                args.activation_checkpointing)  # a MendError is printed by mend's cli
    print(table(rows))
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=1) + "\n")
    return 0
