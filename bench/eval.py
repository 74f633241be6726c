"""Wall time of a whole partition evaluation, against a naive one that reads the context again
for every option.

    python bench/eval.py                                  # CPU: 8 rows per task, one seed
    python bench/eval.py --device cuda --limit 0          # every row

Both paths run :func:`mend.evaluation.harness.evaluate_task` on every meta-test task of the
partition; the naive one passes ``reuse_head=False``. Methods: vanilla ICL (``fixed``
demonstrations, one context per task) and MEND (``resample``, a context per query, as in the paper),
with a freshly initialised distiller (speed does not depend on its weights). The predictions of the
two paths are compared; they must agree.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def main(argv=None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/metaicl")
    p.add_argument("--partition", default="class_to_class")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--limit", type=int, default=8, help="rows per task (0: all)")
    p.add_argument("--max-tasks", type=int, default=0, help="first N tasks only (0: all)")
    p.add_argument("--seed", type=int, default=100)
    p.add_argument("--placeholders", type=int, default=100)
    p.add_argument("--methods", default="icl,mend")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    rows = run(args)
    speedups = {r["method"]: r["speedup"] for r in rows}
    targets = [common.target(f"{m}: full evaluation speed-up over naive >= 3", s, 3.0)
               for m, s in speedups.items()]
    common.write(args, "eval", rows, ["method", "demos", "tasks", "rows", "options",
                                      "fast_s", "naive_s", "speedup", "context_s",
                                      "llm_speedup", "agreement"], targets,
                 ["fast: a context is read once and its KV cache serves every option (and, "
                  "for a shared context, every query); naive: each option re-reads it.",
                  "context_s: time spent making the contexts (MEND's distiller pass, ICL's "
                  "embedding lookup), the same in both paths; llm_speedup: the speed-up of "
                  "the rest, the LLM's scoring."])
    return 0


def run(args) -> list[dict]:
    from mend.core.config import MendConfig
    from mend.core.distiller import Distiller
    from mend.data.metaicl import ContextBuilder, ContextConfig, load_partition
    from mend.evaluation.harness import DemoConfig, evaluate_task
    from mend.methods.icl import ICL
    from mend.methods.mend import Mend

    distiller_path, llm_path = common.models(args)
    torch.manual_seed(0)
    d = Distiller.from_config(MendConfig(
        distiller=distiller_path, llm=llm_path, num_placeholders=args.placeholders,
        distiller_dtype=args.dtype, llm_dtype=args.dtype), device=args.device).eval()
    _, tasks = load_partition(args.data, args.partition)
    tasks = tasks[:args.max_tasks or None]
    rows = []
    chosen = args.methods.split(",")

    def new_builder() -> ContextBuilder:  # fresh counters for each timed pass
        return ContextBuilder.for_method(d, ContextConfig(k=args.k))

    for method, mode in ((ICL(d.llm, d.format), "fixed"), (Mend(d), "resample")):
        if method.name not in chosen:
            continue
        demos = DemoConfig(mode=mode)
        timing, preds, counts, context_s = {}, {}, {"rows": 0, "options": 0}, {}
        with torch.inference_mode():  # warm-up: first-call costs belong to neither path
            warm = new_builder()
            for reuse in (True, False):
                evaluate_task(method, tasks[0], args.seed, "test", warm, demos, limit=1,
                              reuse_head=reuse)
        for reuse in (True, False):
            timer = _Timed(method)
            builder = new_builder()
            common.sync(args.device)
            began = time.perf_counter()
            out = []
            with torch.inference_mode():
                for task in tasks:
                    r = evaluate_task(timer, task, args.seed, "test", builder, demos,
                                      limit=args.limit or None, reuse_head=reuse)
                    if r is not None:
                        out.append(r)
            common.sync(args.device)
            timing[reuse] = time.perf_counter() - began
            context_s[reuse] = timer.seconds
            preds[reuse] = [p for r in out for p in r.predictions]
            if reuse:
                counts["tasks"] = len(out)
                counts["rows"] = len(preds[reuse])
                counts["options"] = sum(len(row["options"]) for t in tasks
                                        for row in t.rows("test", args.seed)[:args.limit or None]
                                        if any(r.task == t.name for r in out))
        agree = sum(a == b for a, b in zip(preds[True], preds[False])) / max(len(preds[True]), 1)
        rows.append({"method": method.name, "demos": f"k={args.k} {mode}", **counts,
                     "fast_s": timing[True], "naive_s": timing[False],
                     "speedup": timing[False] / timing[True], "context_s": context_s[True],
                     "llm_speedup": (timing[False] - context_s[False])
                     / (timing[True] - context_s[True]), "agreement": agree})
        print(rows[-1], flush=True)
    return rows


class _Timed:
    """A method whose ``prefix`` (making the contexts) is timed; everything else passes
    through."""

    def __init__(self, method):
        self.method, self.seconds = method, 0.0

    def __getattr__(self, name):
        return getattr(self.method, name)

    def prefix(self, *args):
        began = time.perf_counter()
        out = self.method.prefix(*args)
        if out[0] is not None and out[0].is_cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - began
        return out


if __name__ == "__main__":
    raise SystemExit(main())
