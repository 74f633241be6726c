"""The table ``mend demo`` prints: accuracy with own and swapped demonstrations beside what
serving a task's queries costs, split by the length of the demonstrations, with the
break-even of each MEND row."""

from __future__ import annotations

import math
from typing import Any

from mend.evaluation.efficiency import gflops, uncounted
from mend.reporting.results import compression_text


def markdown(table: list[dict[str, Any]], even: dict[str, dict[str, dict[str, int | None]]]
             ) -> str:
    """The demo's table: accuracy with own and swapped demonstrations, then what serving a
    task's queries costs, the one-off context apart from each query."""
    def pct(x):
        return "–" if x is None else f"{x * 100:.1f}%"

    lines = ["| method | accuracy | swapped demos | content gap | recovered share | compression "
             "| one-off GFLOPs | one-off ms | GFLOPs/query | ms/query | peak MB/query "
             "| KV cache MB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        once, q = r["once"], r["per_query"]
        gap = "–" if r["content_gap"] is None else f"{r['content_gap'] * 100:+.1f}"
        share = (r.get("recovered_share") or {}).get("share")
        lines.append(f"| {r['method']} | {pct(r['accuracy'])} | {pct(r['swapped_accuracy'])} "
                     f"| {gap} | {pct(share)} | {compression_text(r.get('memory'))} "
                     f"| {gflops(once['flops'])} | {once['seconds'] * 1e3:.0f} | "
                     f"{gflops(q['flops'])} | {q['seconds'] * 1e3:.0f}{_spread(q)} | "
                     f"{q['peak_bytes'] / 2**20:.1f} | {q['cache_bytes'] / 2**20:.2f} |")
    lines += ["", "By length of the demonstrations (accuracy, content gap, recovered share):", "",
              "| method | short demonstrations | long demonstrations |", "|---|---|---|"]
    for r in table:
        cells = []
        for group in ("short", "long"):
            g = r["groups"].get(group)
            gap = "–" if g["content_gap"] is None else f"{g['content_gap'] * 100:+.1f}"
            cells.append(f"{pct(g['accuracy'])}, gap {gap}, share {pct(g['recovered_share'])}")
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    lines.append("")
    for mend, against in even.items():
        for label, n in against.items():
            lines.append(f"- {mend} is cheaper than {label} {_queries(n['flops'])} in FLOPs, "
                         f"and {_queries(n['seconds'])} in measured time.")
    lines += [f"- FLOPs n/a: {reason}." for reason in uncounted()]
    if any(r["per_query"].get("spread", 1) > WIDE for r in table):
        lines.append(f"- ms/query is the median of every timed query, the rows taken in turn; "
                     f"a spread (the slowest round's median over the fastest's) past "
                     f"{WIDE:g}x says the machine was busy while it was timed.")
    return "\n".join(lines) + "\n"


WIDE = 1.5
"""A timing spread past which the table says so."""


def _spread(q: dict[str, Any]) -> str:
    spread = q.get("spread", 1.0)
    return f" (spread {spread:.1f}x)" if spread > WIDE else ""


def _queries(n: float | None) -> str:
    if n is None:
        return "never (it costs as much or more per query)"
    return "n/a (not counted)" if math.isnan(n) else f"from query {n} on"
