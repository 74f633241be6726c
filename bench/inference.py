"""Per-query cost of zero-shot, vanilla ICL, ICL with a reused KV cache, prompt tuning and MEND.

    python bench/inference.py                          # CPU, the zoo pair, small settings
    python bench/inference.py --device cuda --queries 100 --latency-queries 100

One context (K demonstrations of a real MetaICL task) serves ``--queries`` queries; each
query's options are scored together. Per method and K:

- ``llm_flops``: the frozen LLM's forward FLOPs per query (``torch.utils.flop_counter``), with
  one-off work (reading a cached prefix) amortised over the queries;
- ``distiller_flops``: MEND's compress pass, amortised the same way (``..._once``: in total);
- ``latency_s``: median wall time of one query at batch 1, one-off work excluded;
- ``qps``: queries per second at the best batch size, one-off work included;
- ``peak_mb``: peak memory of serving one query (``setup_peak_mb``: of the one-off work);
- ``*_vs_icl``: each divided by vanilla ICL's at the same K.

Methods: ``icl`` reads the demonstrations with every query (a query's options share that
read); ``icl_kv`` reads them once and continues every query from their KV cache; ``mend``
compresses once and continues from the vectors' KV cache; ``prompt_tuning`` the same with
fixed vectors; ``zero_shot`` reads no context. The distiller is freshly initialised: speed does
not depend on its weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

METHODS = ("zero_shot", "icl", "icl_kv", "prompt_tuning", "mend")


def main(argv=None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--ks", default="1,4,16,64")
    p.add_argument("--queries", type=int, default=100, help="queries served per context")
    p.add_argument("--latency-queries", type=int, default=5,
                   help="queries timed one at a time (median)")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--placeholders", type=int, default=100, help="l, MEND's vectors")
    p.add_argument("--output", default="embeddings", choices=("embeddings", "kv"),
                   help="MEND's output: input vectors, or a key/value prefix (needs a "
                        "distiller of the LLM's architecture, as the zoo pair is)")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--data", default="../shared/data/metaicl")
    p.add_argument("--task", default="glue-sst2")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    torch.manual_seed(0)
    with torch.inference_mode():
        rows = run(args)
    return 0 if common.write(args, "inference", rows, COLUMNS, targets(rows), NOTES) else 1


COLUMNS = ["k", "method", "context_tokens", "llm_flops", "distiller_flops", "flops_vs_icl",
           "total_flops_vs_icl", "latency_s", "latency_vs_icl", "qps", "best_batch",
           "qps_vs_icl", "peak_mb", "peak_vs_icl", "setup_s", "setup_peak_mb"]
NOTES = ["flops_vs_icl: LLM FLOPs per query over vanilla ICL's; total_flops_vs_icl adds "
         "MEND's amortised distiller pass.",
         "qps includes the one-off work (compress, prefill) in the elapsed time.",
         "CPU peak memory is the growth of resident memory (coarse: ~1 MB); CUDA's is the "
         "allocator's peak above what was allocated before."]


def run(args) -> list[dict]:
    from transformers import AutoConfig

    from mend.core.backbones import resolve
    from mend.core.config import MendConfig
    from mend.core.distiller import Distiller
    from mend.data.metaicl import ContextBuilder, ContextConfig, load_task
    from mend.evaluation.harness import demo_pool

    distiller_path, llm_path = common.models(args)
    ks = [int(k) for k in args.ks.split(",")]
    task = load_task(args.data, args.task)
    if task is None:
        raise SystemExit(f"Task {args.task} is not under {args.data}; pass --data/--task.")
    pool, queries = demo_pool(task, 100, "all"), task.rows("test", 100)[:args.queries]
    if len(pool) < max(ks) or len(queries) < args.queries:
        raise SystemExit(f"{args.task} has {len(pool)} demonstrations and {len(queries)} test "
                         f"rows; lower --ks or --queries.")
    # The distiller reads every demonstration: as many positions as it was built for.
    source, gguf = resolve(distiller_path)
    positions = getattr(AutoConfig.from_pretrained(source, gguf_file=gguf),
                        "max_position_embeddings", None)
    d = Distiller.from_config(MendConfig(
        distiller=distiller_path, llm=llm_path, num_placeholders=args.placeholders,
        max_distiller_length=min(8192, positions or 8192), distiller_dtype=args.dtype,
        llm_dtype=args.dtype, output=args.output),
        device=args.device).eval()
    llm = d.llm
    builder = ContextBuilder.for_method(d, ContextConfig(max_context_tokens=8192))
    groups = [[(builder.query(r["input"]), builder.option(o)) for o in r["options"]]
              for r in queries]
    zero_groups = [[(builder.query(r["input"], False), builder.option(o)) for o in r["options"]]
                   for r in queries]
    vectors = torch.randn(1, args.placeholders, llm.hidden_size, dtype=llm.dtype,
                          device=args.device) * llm.embed(torch.tensor([[0]])).std()
    rows = []
    for k in ks:
        demos = [(r["input"], r["output"]) for r in pool[:k]]
        _, context = builder.context(demos, reserve=max(len(p) + len(t) for g in groups
                                                        for p, t in g))
        prefix, _ = llm.embed_context([context])
        setups = {
            "zero_shot": lambda: None,
            "icl": lambda: None,
            "icl_kv": lambda prefix=prefix: llm.prefill(prefix),
            "prompt_tuning": lambda: llm.prefill(vectors),
            # A key/value prefix is the cache itself: no LLM pass reads it.
            "mend": lambda demos=demos: (d.compress(demos).prefill if args.output == "kv"
                                         else llm.prefill(d.compress(demos).vectors)),
        }
        for name in METHODS:
            row = measure(args, llm, d, name, setups[name], demos, prefix,
                          zero_groups if name == "zero_shot" else groups)
            rows.append({"k": k, "method": name, "context_tokens": len(context), **row})
            print(rows[-1], flush=True)
    for row in rows:
        icl = next(r for r in rows if r["k"] == row["k"] and r["method"] == "icl")
        row["flops_vs_icl"] = row["llm_flops"] / icl["llm_flops"]
        row["total_flops_vs_icl"] = (row["llm_flops"] + row["distiller_flops"]) / icl["llm_flops"]
        row["latency_vs_icl"] = row["latency_s"] / icl["latency_s"]
        row["qps_vs_icl"] = row["qps"] / icl["qps"]
        row["peak_vs_icl"] = row["peak_mb"] / max(icl["peak_mb"], 1e-9)
    return rows


def measure(args, llm, d, name, setup, demos, prefix, groups) -> dict:
    """One method at one K: FLOPs, batch-1 latency, best throughput, peak memory."""
    n = len(groups)
    # One-off work, and its FLOPs split into the distiller's and the LLM's.
    distiller_once = 0
    if name == "mend":
        _, distiller_once = common.count_flops(lambda: d.compress(demos))
    with common.PeakMemory(args.device) as setup_memory:
        began = _now(args)
        prefill = setup()
        setup_s = _now(args) - began
    _, setup_flops = common.count_flops(setup)
    llm_once = setup_flops - distiller_once

    def serve(batch: list, prefill=prefill):
        if name == "icl":  # every query carries its own copy of the demonstrations
            return llm.score_pairs(batch, prefix.expand(len(batch), -1, -1))
        return llm.score_pairs(batch, prefill=prefill)

    _, query_flops = common.count_flops(lambda: serve(groups[:1]))
    latency = common.timed(lambda: [serve([g]) for g in groups[:args.latency_queries]],
                           args.device) / args.latency_queries
    with common.PeakMemory(args.device) as memory:
        serve(groups[:1])
    qps, best = 0.0, None
    for b in (int(x) for x in args.batch_sizes.split(",")):
        def everything(b=b):
            state = setup()  # one-off work counts against throughput
            for i in range(0, n, b):
                serve(groups[i:i + b], prefill=state)
        rate = n / common.timed(everything, args.device, warmup=False)  # warmed by latency
        if rate > qps:
            qps, best = rate, b
    return {"llm_flops": query_flops + llm_once / n, "distiller_flops": distiller_once / n,
            "distiller_flops_once": distiller_once, "llm_flops_once": llm_once,
            "latency_s": latency, "qps": qps, "best_batch": best,
            "peak_mb": memory.peak / 2**20, "setup_s": setup_s,
            "setup_peak_mb": setup_memory.peak / 2**20}


def _now(args) -> float:
    import time
    common.sync(args.device)
    return time.perf_counter()


def targets(rows: list[dict]) -> list[dict]:
    def get(k, method, key):
        return next((r[key] for r in rows if r["k"] == k and r["method"] == method), None)

    out = []
    if get(16, "mend", "llm_flops") is not None:
        out.append(common.target("K=16 MEND LLM FLOPs / ICL <= 1/5",
                                 get(16, "mend", "flops_vs_icl"), 0.2, higher_is_better=False))
        out.append(common.target("K=16 MEND LLM+distiller FLOPs / ICL <= 1/3",
                                 get(16, "mend", "total_flops_vs_icl"), 1 / 3,
                                 higher_is_better=False))
    for k in (16, 64):
        if get(k, "mend", "qps") is None:
            continue
        out.append(common.target(f"K={k} MEND qps / ICL qps >= 3", get(k, "mend", "qps_vs_icl"),
                                 3.0))
        out.append(common.target(f"K={k} MEND qps / ICL-KV qps >= 1",
                                 get(k, "mend", "qps") / get(k, "icl_kv", "qps"), 1.0))
    if get(64, "mend", "peak_mb") is not None:
        out.append(common.target("K=64 ICL peak memory / MEND's >= 4",
                                 get(64, "icl", "peak_mb") / max(get(64, "mend", "peak_mb"),
                                                                  1e-9), 4.0))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
