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

:func:`query_costs` gives every query its own demonstrations, so MEND's distiller and ICL's
context run per query (the paper's Figure 3). :func:`serving_costs` measures the use case
of a deployment instead: one demonstration set serves many queries. The context is built
and read by the LLM once (MEND: distiller pass plus the vectors' KV cache; ICL: the
demonstrations' KV cache), that one-off cost is reported apart, and each query continues from
the cache. :func:`break_even` says after how many queries one way becomes cheaper than
another.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import math
import statistics
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from mend.core.kv_cache import Prefill
from mend.data.metaicl import ContextBuilder
from mend.evaluation.flops import FORMULAS
from mend.methods.base import Method, prefix_kwargs

_UNCOUNTED: dict[str, None] = {}  # why counts failed in this process, in the order first seen


def count_flops(fn: Callable[[], Any]) -> tuple[Any, float]:
    """Run ``fn`` once under a FLOP counter; returns its result and its FLOPs (matmuls, and
    attention through mend's own formula for every SDPA kernel: :mod:`mend.evaluation.flops`).

    Accounting never costs the measurement: where the counter fails (an op whose formula
    raises on a kernel or shape it was not written for), ``fn`` runs again uncounted and its
    FLOPs are NaN, which every cost column prints as "n/a", and :func:`uncounted` keeps the
    reason. A failure of ``fn`` itself is raised again by that second run.
    """
    counter = FlopCounterMode(display=False, custom_mapping=FORMULAS)
    try:
        with counter:
            out = fn()
    except Exception as exc:  # noqa: BLE001 - any failure of the counter, see above
        out = fn()  # raises again where fn itself failed, and then nothing is recorded
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
        if reason not in _UNCOUNTED:
            warnings.warn(f"FLOPs not counted ({reason}); the cost column says n/a.",
                          stacklevel=2)
            _UNCOUNTED[reason] = None
        return out, math.nan
    return out, counter.get_total_flops()


def uncounted() -> list[str]:
    """Why :func:`count_flops` could not count, each reason once, for the note under a cost
    table whose column says "n/a"."""
    return list(_UNCOUNTED)


def gflops(flops: float) -> str:
    """FLOPs as GFLOPs with two decimals, or "n/a" where they could not be counted."""
    return "n/a" if math.isnan(flops) else f"{flops / 1e9:.2f}"


class PeakMemory:
    """Context manager measuring peak memory growth in bytes (``.peak`` after exit).

    ``collect``: run the garbage collector first, so that garbage freed during the measured
    code does not lower the peak. It takes a third of a second in a process holding a
    transformers model, so a caller measuring many runs collects once before them and passes
    False."""

    def __init__(self, device: torch.device | str, collect: bool = True):
        self.cuda = torch.device(device).type == "cuda"
        self.collect = collect
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        if self.collect:
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


def measure(fn: Callable[[], Any], device: torch.device | str, collect: bool = True
            ) -> tuple[Any, float, int]:
    """``fn()``'s result, its wall seconds (the device synchronised before the clock stops)
    and its peak memory in bytes (:class:`PeakMemory`, ``collect`` as there)."""
    with PeakMemory(device, collect) as memory:
        began = time.perf_counter()
        out = fn()
        _sync(device)
        seconds = time.perf_counter() - began
    return out, seconds, memory.peak


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
        pairs = _pairs(method, builder, row)
        context = functools.partial(_read_context, method, builder, demos,
                                    max(len(p) + len(t) for p, t in pairs[0]))

        def score(prefix, pairs=pairs):
            return method.llm.score_pairs(pairs, **prefix_kwargs(prefix))

        prefix, context_flops = count_flops(context)
        _, llm_flops = count_flops(functools.partial(score, prefix))
        _, seconds, peak = measure(lambda context=context: score(context()), device)
        records.append({"context_flops": context_flops, "llm_flops": llm_flops,
                        "flops": context_flops + llm_flops, "seconds": seconds,
                        "peak_bytes": peak})
    records = records[1:]  # the first query warms up kernels and caches
    return {k: float(statistics.median(r[k] for r in records)) for k in records[0]}


@dataclass(frozen=True)
class Serving:
    """One way to serve a demonstration set's queries: a method, its context rules, and
    whether one context serves every query (``reuse``; False: ICL re-reads its demonstrations
    with every query, and zero-shot reads bos alone)."""

    method: Method
    builder: ContextBuilder
    reuse: bool = True


@torch.no_grad()
def serving_costs(servings: dict[str, Serving], demos: list, rows: Sequence[dict],
                  device: torch.device | str, rounds: int = 3,
                  made: dict[str, dict[str, Prefill]] | None = None
                  ) -> dict[str, dict[str, Any]]:
    """Every way of ``servings`` serving one demonstration set's queries ``rows``, measured
    together.

    - ``once``: where one context serves every query, its one-off cost
      (:func:`context_cost`); zeros otherwise.
    - ``per_query``: its FLOPs (counted once, on the first query: a task's queries differ by
      a few tokens) and peak memory (on the same query, after it warmed the kernels up),
      the KV cache's size, and its wall ``seconds``: the median over ``rounds`` rounds of
      every query, the servings taken in turn within each query (round-robin), so that a
      burst of load on the machine falls on all of them alike; ``spread`` is the ratio of
      the slowest to the fastest of its rounds' medians.

    ``made``, where given, keeps each serving's context for reuse: ``made[label]`` gains it
    under :func:`context_cost`'s key.
    """
    reserve = max(len(builder.query(r["input"], True)) + max(len(builder.option(o))
                                                             for o in r["options"])
                  for s in servings.values() for builder in [s.builder] for r in rows)
    prepared = {}
    gc.collect()  # once: the runs below measure their peaks without collecting again
    for label, s in servings.items():
        once, prefill = dict(_ZERO), None
        if s.reuse and s.method.reads_context:
            once, prefill = context_cost(s.method, s.builder, demos, device, reserve,
                                         collect=False,
                                         made=None if made is None else made.setdefault(label,
                                                                                        {}))
        queries = [functools.partial(_answer, s, demos, row, prefill, reserve) for row in rows]
        _, flops = count_flops(queries[0])  # also warms the kernels up
        _, _, peak = measure(queries[0], device, collect=False)
        prepared[label] = (once, queries, {"flops": flops, "peak_bytes": peak,
                                           "cache_bytes": once["cache_bytes"]})
    times: dict[str, list[list[float]]] = {label: [] for label in servings}
    for _ in range(rounds):
        for label in servings:
            times[label].append([])
        for i in range(len(rows)):
            for label, (_, queries, _) in prepared.items():
                began = time.perf_counter()
                queries[i]()
                _sync(device)
                times[label][-1].append(time.perf_counter() - began)
    out = {}
    for label, (once, _, per_query) in prepared.items():
        medians = [statistics.median(r) for r in times[label]]
        out[label] = {"once": once, "per_query": {
            **per_query, "seconds": statistics.median(t for r in times[label] for t in r),
            "spread": max(medians) / min(medians)}}
    return out


_ZERO = {"context_flops": 0, "llm_flops": 0, "flops": 0, "seconds": 0.0, "cache_bytes": 0}


def _answer(s: Serving, demos: list, row: dict, prefill: Prefill | None, reserve: int):
    """One query's options scored as ``s`` serves it: after the context read once
    (``prefill``), or building and reading the context again (ICL re-read; zero-shot reads
    the query alone)."""
    pairs = _pairs(s.method, s.builder, row)
    if prefill is not None:
        return s.method.llm.score_pairs(pairs, prefill=prefill)
    prefix = _read_context(s.method, s.builder, demos, reserve)
    return s.method.llm.score_pairs(pairs, **prefix_kwargs(prefix))


def _pairs(method: Method, builder: ContextBuilder, row: dict) -> list[list[tuple]]:
    """One query's ``(query ids, option ids)`` pairs, one per option, as the LLM scores them."""
    query = builder.query(row["input"], method.reads_context)
    return [[(query, builder.option(o)) for o in row["options"]]]


def _read_context(method: Method, builder: ContextBuilder, demos: list, reserve: int):
    """The method's prefix of ``demos`` (vectors and mask, or a key/value prefix), leaving
    ``reserve`` tokens for the query; ``(None, None)`` for a method that reads no context."""
    if not method.reads_context:
        return None, None
    kept, ids = builder.context(demos, reserve)
    return method.prefix([kept], [ids])


@torch.no_grad()
def context_cost(method: Method, builder: ContextBuilder, demos: list,
                 device: torch.device | str, reserve: int = 0, collect: bool = True,
                 made: dict[str, Prefill] | None = None) -> tuple[dict[str, Any], Prefill]:
    """The one-off cost of one demonstration set's context, and the context: the method's
    prefix (MEND's distiller, a compaction's passes and fits: ``context_flops``) and the
    LLM's pass over it where it is read as vectors (``llm_flops``), their wall ``seconds``,
    and the KV cache's size, a compaction's fitted bias included (``cache_bytes``).
    ``reserve``: tokens kept free for the longest query and option; ``collect`` as in
    :class:`PeakMemory`. ``made``, where given, gains the context under the key
    :func:`prefix_key` gives the method's arguments."""
    kept, ids = builder.context(demos, reserve)

    def build() -> Prefill:
        prefix = method.prefix([kept], [ids])
        # A key/value prefix is read by no LLM pass; vectors are prefilled once.
        return prefix if isinstance(prefix, Prefill) else method.llm.prefill(*prefix)

    # Timed apart from the FLOP counter's work.
    prefill, seconds, _ = measure(build, device, collect)
    prefix, context_flops = count_flops(lambda: method.prefix([kept], [ids]))
    prefill_flops = 0 if isinstance(prefix, Prefill) else count_flops(
        lambda: method.llm.prefill(*prefix))[1]
    if made is not None:
        made[prefix_key([kept], [ids])] = prefill
    return ({"context_flops": context_flops, "llm_flops": prefill_flops,
             "flops": context_flops + prefill_flops, "seconds": seconds,
             "cache_bytes": tensor_bytes((prefill.cache, prefill.bias))}, prefill)


def prefix_key(demo_sets: Sequence[Sequence], contexts: Sequence[Sequence[int]]) -> str:
    """The key of a method's prefix for these arguments of ``Method.prefix``: every method's
    prefix is a function of them."""
    return repr((list(map(list, demo_sets)), list(map(list, contexts))))


def break_even(a: dict[str, Any], b: dict[str, Any], key: str = "flops") -> float | None:
    """The fewest queries after which ``a`` (one-off cost plus per query) costs less in all
    than ``b``, both :func:`serving_costs` results; None when it never does. 1 when ``a`` is
    cheaper from the first query; NaN when a cost could not be counted (:func:`count_flops`)."""
    once = a["once"][key] - b["once"][key]
    saved = b["per_query"][key] - a["per_query"][key]
    if math.isnan(once) or math.isnan(saved):
        return math.nan
    if once < 0 and saved >= 0:
        return 1
    if saved <= 0:
        return None
    return max(1, math.floor(once / saved) + 1)


def tensor_bytes(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of every tensor reachable from ``obj`` (a KV cache's layers, lists, dicts)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__"):
        return sum(tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
