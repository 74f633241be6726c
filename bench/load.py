"""Memory under load: ``score`` of many queries after one context, and ``compress_batch`` of
many demonstration sets, a batch at a time, with the process's resident memory sampled after
every call. A call that kept something per call (a cache, a graph) would grow it linearly.

    python bench/load.py                 # the shipped distiller with SmolLM2, 1000 of each
    python bench/load.py --tiny          # tiny random models, in seconds

Each row: the resident memory (RSS) after the first batch, at the half, and at the end, and
the growth from the half to the end; the target is that the second half grows it by less
than 2% (allocator noise), so memory is flat in the number of calls.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

WORDS = ("great movie", "dull plot", "a delightful story", "the cat sat on the mat",
         "what a waste of time", "the river ran past the mill", "an instant classic")


def main(argv=None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--checkpoint", default=str(Path(__file__).resolve().parents[1] / "mend"
                                               / "assets" / "demo-distiller"))
    args = p.parse_args(argv)
    from mend import Distiller

    d = _tiny() if args.tiny else Distiller.from_pretrained(args.checkpoint, device=args.device)
    d.eval().merge_adapters()
    demos = [(w, "positive" if i % 2 else "negative") for i, w in enumerate(WORDS * 2)]
    ctx = d.compress(demos)
    queries = [f"{WORDS[i % len(WORDS)]} number {i}" for i in range(args.queries)]
    sets = [demos[i % 5:] + demos[:i % 5] for i in range(args.queries)]
    rows = [_sampled("score", lambda q: d.score(ctx, q, ["positive", "negative"]), queries,
                     args.batch),
            _sampled("compress_batch", lambda s: d.compress_batch(s, batch_size=16), sets,
                     args.batch)]
    targets = [common.target(f"{r['call']}: RSS grows < 2% over the second half",
                             r["growth_pct"], 2.0, higher_is_better=False) for r in rows]
    common.write(args, "load", rows, ["call", "calls", "items", "rss_first_mb", "rss_half_mb",
                                      "rss_end_mb", "growth_mb", "growth_pct"], targets,
                 [f"{args.queries} items in batches of {args.batch}; RSS sampled after each "
                  f"call (gc run first), the distiller's LoRA merged for inference."])
    return 0


def _sampled(name: str, call, items: list, batch: int) -> dict:
    """RSS after each call of ``call`` on consecutive batches of ``items``."""
    from mend.evaluation.efficiency import _rss, _trim

    rss = []
    for i in range(0, len(items), batch):
        call(items[i:i + batch])
        gc.collect()
        _trim()
        rss.append(_rss() / 2**20)
    half, end = rss[len(rss) // 2], rss[-1]
    return {"call": name, "calls": len(rss), "items": len(items), "rss_first_mb": rss[0],
            "rss_half_mb": half, "rss_end_mb": end, "growth_mb": end - half,
            "growth_pct": 100 * (end - half) / half}


def _tiny():
    from mend import Distiller, MendConfig, tiny
    path = str(tiny.build("/tmp/mend-bench-tiny/llm", "llama", hidden=64))
    return Distiller.from_config(MendConfig(distiller=path, llm=path, output="kv",
                                            num_placeholders=4, train_mode="lora"))


if __name__ == "__main__":
    raise SystemExit(main())
