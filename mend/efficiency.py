"""What a query costs each method: forward FLOPs, peak memory, wall time (batch size 1).

For every query, a method builds its context from the query's demonstrations and then the LLM
scores the query's options:

- ICL: the context is the demonstrations' tokens, read by the LLM with the query;
- prompt tuning: the context is its fixed vectors;
- MEND: the distiller reads the demonstrations and emits vectors (its pass is counted).

- **FLOPs** come from ``torch.utils.flop_counter`` (matmuls and attention), split into the
  context step (MEND's distiller pass) and the LLM step.
- **Peak memory:** on CUDA, the allocator's peak above what was allocated before the query; on
  the CPU, the peak growth of the process's resident memory, sampled every millisecond after
  returning freed memory to the system (glibc ``malloc_trim``). It is coarser, so compare CPU
  numbers across methods, not with CUDA ones.
- **Time:** the median wall time per query, after one warm-up query.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from mend.data.metaicl import ContextBuilder
from mend.methods.base import Method


def count_flops(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn`` once under a FLOP counter; returns its result and its forward FLOPs."""
    counter = FlopCounterMode(display=False)
    with counter:
        out = fn()
    return out, counter.get_total_flops()


class PeakMemory:
    """Context manager measuring peak memory growth in bytes (``.peak`` after exit)."""

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            _trim()
            self._base = _rss()
            self._max, self._stop = self._base, threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, _rss()) - self._base


def _rss() -> int:
    import psutil  # a dependency of accelerate
    return psutil.Process().memory_info().rss


def _trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@torch.no_grad()
def query_costs(method: Method, builder: ContextBuilder, demo_sets: Sequence[list],
                rows: Sequence[dict], device: torch.device | str) -> dict[str, float]:
    """Cost per query of ``method``: query ``i`` reads demonstration set ``i``.

    Returns medians over the queries (after one warm-up) of ``context_flops`` (MEND's distiller
    pass; 0 otherwise), ``llm_flops``, ``flops`` (their sum), ``seconds`` and ``peak_bytes``.
    """
    if len(demo_sets) != len(rows) or len(rows) < 2:
        raise ValueError("Need one demonstration set per query and at least two queries.")
    records = []
    for demos, row in zip(demo_sets, rows):
        query = builder.query(row["input"], method.reads_context)
        pairs = [[(query, builder.option(o)) for o in row["options"]]]

        def context(demos=demos, query=query, pairs=pairs):
            if not method.reads_context:
                return None, None
            kept, ids = builder.context(demos, max(len(p) + len(t) for p, t in pairs[0]))
            return method.prefix([kept], [ids])

        def score(prefix, pairs=pairs):
            return method.llm.score_pairs(pairs, *prefix)

        prefix, context_flops = count_flops(context)
        _, llm_flops = count_flops(functools.partial(score, prefix))
        with PeakMemory(device) as memory:
            began = time.perf_counter()
            score(context())
            _sync(device)
            seconds = time.perf_counter() - began
        records.append({"context_flops": context_flops, "llm_flops": llm_flops,
                        "flops": context_flops + llm_flops, "seconds": seconds,
                        "peak_bytes": memory.peak})
    records = records[1:]  # the first query warms up kernels and caches
    return {k: float(statistics.median(r[k] for r in records)) for k in records[0]}


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
