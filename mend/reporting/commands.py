"""The reporting commands: ``mend compare``, ``mend controls``, ``mend curve`` and ``mend
report``, each a table, figure or report built from results files that runs have already
written."""

from __future__ import annotations

import argparse
from pathlib import Path

from mend.reporting import controls as controls_table
from mend.reporting import curves, results
from mend.reporting import report as reports


def _parser(prog: str, description: str, output_help: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--output", help=output_help)
    return parser


def compare(argv=None) -> int:
    """``mend compare RESULTS.json ... [--against LABEL] [--output FILE]``."""
    parser = _parser("mend compare", "one markdown table of several results.json",
                     "also write the table to this file")
    parser.add_argument("results", nargs="+")
    parser.add_argument("--against", metavar="LABEL",
                        help="also each run's paired difference from the run of this label, "
                        "over the tasks and seeds both scored, with its standard error")
    args = parser.parse_args(argv)
    results.emit(results.compare(args.results, args.against), args.output)
    return 0


def controls(argv=None) -> int:
    """``mend controls RUN ... [--reference ICL.json [--zero-shot ZS.json]] [--output FILE]``."""
    parser = _parser("mend controls", "one table of the content controls of runs",
                     "also write the table to this file")
    parser.add_argument("runs", nargs="+", help="training output directories")
    parser.add_argument("--reference",
                        help="a results.json whose content gap is the reference (ICL)")
    parser.add_argument("--zero-shot", help="zero-shot's results.json on the same tasks: with "
                        "--reference, each run's recovered share of ICL's gain")
    args = parser.parse_args(argv)
    results.emit(controls_table.table(args.runs, args.reference, args.zero_shot), args.output)
    return 0


def curve(argv=None) -> int:
    """``mend curve RUN RESULTS.json ... [--output FIGURE.png]``."""
    parser = _parser("mend curve", "a training run's recovered share and controls against "
                     "the tokens it read", "the figure (default: RUN/curve.png); the table "
                     "goes beside it as .md")
    parser.add_argument("run", help="the training output directory")
    parser.add_argument("results", nargs="+", help="mend eval results of the run's models")
    parser.add_argument("--beside", nargs="+", default=[], metavar="RUN",
                        help="other training runs whose held-out content controls are drawn "
                        "and tabled beside the run's")
    args = parser.parse_args(argv)
    points = curves.points(args.run, args.results)
    figure = Path(args.output or Path(args.run) / "curve.png")
    controls = curves.held_out([args.run, *args.beside])
    curves.draw(args.run, points, figure, controls)
    tables = curves.table(points)
    if any(controls.values()):
        tables += "\n" + curves.held_out_table(controls)
    results.emit(tables, figure.with_suffix(".md"))
    print(f"wrote {figure}")
    return 0


def report(argv=None) -> int:
    """``mend report RESULTS_ROOT [--output FILE]``."""
    parser = _parser("mend report", "the MEND paper's tables from a reproduction",
                     "default: the root with .md (docs/results.md)")
    parser.add_argument("results", help="the results root, e.g. docs/results")
    args = parser.parse_args(argv)
    print(f"wrote {reports.write(args.results, args.output)}")
    return 0
