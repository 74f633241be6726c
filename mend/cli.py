"""The ``mend`` command: one list of commands, each a module's own ``cli(argv)``.

    mend demo [--tiny]                         zero-shot vs ICL vs MEND on built-in tasks
    mend pretrain --config FILE [key=value]    stage 1 (same as pretrain/run.py)
    mend finetune --config FILE [key=value]    stage 2 (same as finetune/run.py)
    mend eval --config FILE [key=value]        evaluate a method (same as eval/run.py)
    mend memory --config FILE [--processes N]  memory per GPU under DDP, FSDP and 8-bit
    mend nli {icl,pbft,cd,eval,cost} ...       the pattern-based NLI baselines
    mend sbs {train,eval} ...                  distilling step-by-step
    mend zoo list | fetch NAME                 the offline models

Run ``mend`` alone for the whole list.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

from mend.errors import MendError


@dataclass(frozen=True)
class Command:
    name: str
    entry: str
    """``"module:function"``; the function takes the rest of the command line."""
    help: str


COMMANDS = (
    Command("demo", "mend.recipes.demo:cli", "zero-shot vs ICL vs MEND on built-in tasks"),
    Command("pretrain", "mend.recipes.pretrain:cli", "stage 1: meta-distillation pretraining"),
    Command("finetune", "mend.recipes.finetune:cli",
            "stage 2 on a MetaICL partition: MEND and its ablations, or prompt tuning"),
    Command("eval", "mend.recipes.evaluate:cli", "score a method on MetaICL tasks"),
    Command("export", "mend.recipes.export:cli",
            "one saved step of a training run as a checkpoint (from_pretrained reads it)"),
    Command("diagnose", "mend.recipes.diagnose:cli",
            "a distiller's content controls on held-out text"),
    Command("efficiency", "mend.recipes.efficiency:cli",
            "FLOPs, memory and time per query, side by side"),
    Command("memory", "mend.recipes.memory:cli",
            "a stage-1 config's memory per GPU under DDP, FSDP and 8-bit, before a run"),
    Command("nli", "mend.baselines.nli.recipes:cli",
            "pattern-based NLI baselines: icl | pbft | cd | eval | cost"),
    Command("sbs", "mend.baselines.step_by_step.recipe:cli",
            "distilling step-by-step: train | eval"),
    Command("compare", "mend.reporting.commands:compare",
            "one table of several results.json files"),
    Command("controls", "mend.reporting.commands:controls",
            "the content controls of training runs"),
    Command("curve", "mend.reporting.commands:curve",
            "a training run's recovered share against the tokens it read"),
    Command("report", "mend.reporting.commands:report",
            "the paper's tables from a reproduction (docs/results -> docs/results.md)"),
    Command("zoo", "mend.recipes.zoo:cli", "offline models shipped as GGUF files in PyPI packages"),
)


def usage() -> str:
    width = max(len(c.name) for c in COMMANDS)
    return ("usage: mend COMMAND [args ...]   (mend COMMAND --help for its arguments)\n\n"
            + "\n".join(f"  {c.name:{width}s}  {c.help}" for c in COMMANDS))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = {c.name: c for c in COMMANDS}
    if not argv or argv[0] not in commands:
        asked = not argv or argv[0] in ("-h", "--help")
        print(usage() if asked else f"{usage()}\n\nmend: error: unknown command `{argv[0]}`.",
              file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    module, function = commands[argv[0]].entry.split(":")
    try:
        return getattr(importlib.import_module(module), function)(argv[1:])
    except MendError as e:
        print(f"mend: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
