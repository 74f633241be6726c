"""``mend demo``: zero-shot, ICL and MEND side by side on the built-in tasks, offline.

    mend demo                # SmolLM2-135M distiller and LLM from the offline zoo
    mend demo --tiny         # random tiny models: the same pipeline in seconds

It prints accuracy, LLM FLOPs per query and latency per query for each method, and writes
``results.json`` (with provenance) and ``demo.png`` to ``out/demo``.

The MEND checkpoint is, in order: ``--checkpoint``; the trained distiller shipped in the
package (``mend/assets/demo-distiller``, see the README); one trained by an earlier demo run
(in ``$MEND_CACHE/demo``). If there is none, the demo first trains one briefly on its
meta-training tasks, and says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mend.data import Counters
from mend.data.metaicl import ContextBuilder, load_partition
from mend.errors import ConfigError
from mend.evaluate import DemoConfig, evaluate_task
from mend.methods import MethodConfig, build_method

ASSET = Path(__file__).resolve().parents[1] / "assets" / "demo-distiller"
ZOO_PAIR = ("smollm2-135m", "smollm2-135m")


@dataclass(frozen=True)
class DemoJobConfig:
    tiny: bool = False
    """Random tiny models instead of the zoo's SmolLM2 (for CI and a quick look)."""
    checkpoint: str | None = None
    """A MEND checkpoint to use instead of the shipped or cached one."""
    train_steps: int = 60
    """Steps of the brief training when no checkpoint is found."""
    queries: int = 32
    """Test queries per task."""
    cost_queries: int = 6
    """Queries (after one warm-up) whose FLOPs, memory and time are measured."""
    output_dir: str = "out/demo"


def main(cfg: DemoJobConfig) -> dict[str, Any]:
    """Zero-shot vs ICL vs MEND on the built-in tasks, with their costs."""
    import torch
    from tqdm.auto import tqdm

    from mend.demo import PARTITION, SEED, materialize
    from mend.efficiency import query_costs
    from mend.recipes import write_results

    started = time.perf_counter()
    out = Path(cfg.output_dir)
    root = materialize(out / "tasks")
    distiller, llm = _models(cfg.tiny)
    checkpoint, origin = _checkpoint(cfg, distiller, llm, root)
    from mend.distiller import read_config
    fmt = read_config(checkpoint)
    methods = [MethodConfig("zero_shot", llm=llm, io_sep=fmt.io_sep, demo_sep=fmt.demo_sep),
               MethodConfig("icl", llm=llm, io_sep=fmt.io_sep, demo_sep=fmt.demo_sep),
               MethodConfig("mend", checkpoint=str(checkpoint))]
    tasks = load_partition(root, PARTITION)[1]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    table = []
    bar = tqdm(total=len(methods) * (len(tasks) + 1), desc="demo", dynamic_ncols=True)
    for method_cfg in methods:
        method = build_method(method_cfg, device=device)
        builder = ContextBuilder(method.llm.tokenizer, method.format, method.llm.bos, 256, 900,
                                 method.llm.max_length, Counters())
        scores = {}
        for task in tasks:
            bar.set_postfix(method=method.name, task=task.name)
            result = evaluate_task(method, task, SEED, "test", builder, DemoConfig(k=16),
                                   limit=cfg.queries)
            scores[task.name] = result.metrics["accuracy"]
            bar.update(1)
        task = tasks[0]
        demos = [(r["input"], r["output"]) for r in task.rows("train", SEED)]
        rows = task.rows("test")[:cfg.cost_queries + 1]
        costs = query_costs(method, builder, [demos] * len(rows), rows, device)
        bar.update(1)
        table.append({"method": method.name, "accuracy": sum(scores.values()) / len(scores),
                      "tasks": scores, **costs})
        del method
    bar.close()
    result = write_results(cfg, {
        "models": {"distiller": distiller, "llm": llm, "checkpoint": str(checkpoint),
                   "checkpoint_origin": origin},
        "methods": table, "queries_per_task": cfg.queries, "k": 16,
        "wall_time_s": time.perf_counter() - started})
    _plot(table, out / "demo.png")
    print(f"\nMEND checkpoint: {checkpoint} ({origin})\n")
    print(markdown(table))
    print(f"written: {out / 'results.json'}, {out / 'demo.png'} "
          f"({result['wall_time_s']:.0f} s in all)")
    return result


def markdown(table: list[dict[str, Any]]) -> str:
    lines = ["| method | accuracy | LLM GFLOPs/query | total GFLOPs/query | ms/query |",
             "|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['method']} | {r['accuracy'] * 100:.1f}% | "
                     f"{r['llm_flops'] / 1e9:.2f} | {r['flops'] / 1e9:.2f} | "
                     f"{r['seconds'] * 1e3:.0f} |")
    return "\n".join(lines) + "\n"


def _models(tiny: bool) -> tuple[str, str]:
    if not tiny:
        from mend import zoo
        for name in set(ZOO_PAIR):
            zoo.path(name)  # converts on first use; a missing package names its pip command
        return ZOO_PAIR
    from mend import tiny as tiny_models
    from mend.zoo import cache_root
    base = cache_root() / "demo"
    return (str(tiny_models.build(base / "tiny-distiller", "llama", "metaspace", hidden=32)),
            str(tiny_models.build(base / "tiny-llm", "gpt2", "bytelevel", hidden=48)))


def _checkpoint(cfg: DemoJobConfig, distiller: str, llm: str, root: Path) -> tuple[Path, str]:
    from mend.distiller import read_config
    from mend.zoo import cache_root

    if cfg.checkpoint:
        return Path(cfg.checkpoint), "given with --checkpoint"
    if not cfg.tiny and (ASSET / "mend_config.json").is_file():
        saved = read_config(ASSET)
        if (saved.distiller, saved.llm) == (distiller, llm):
            return ASSET, "the trained distiller shipped with mend"
    cached = cache_root() / "demo" / ("trained-tiny" if cfg.tiny else "trained-smollm2")
    if (cached / "mend_config.json").is_file():
        return cached, f"trained briefly by an earlier `mend demo` run, {cached}"
    print(f"mend demo: no trained MEND checkpoint found, so training one briefly first: "
          f"{cfg.train_steps} steps of meta-distillation finetuning on the demo's "
          f"meta-training tasks. A checkpoint trained for longer scores better; see the "
          f"README (\"The demo's checkpoint\").", flush=True)
    _train_briefly(cfg, distiller, llm, root, cached)
    return cached, "trained briefly by this run (no shipped checkpoint was found)"


def _train_briefly(cfg: DemoJobConfig, distiller: str, llm: str, root: Path, out: Path) -> None:
    from mend.config import MendConfig
    from mend.data.metaicl import MetaICLConfig
    from mend.demo import PARTITION
    from mend.methods.mend import ObjectiveConfig
    from mend.recipes.finetune import FinetuneConfig
    from mend.recipes.finetune import main as finetune
    from mend.train import TrainConfig

    if cfg.train_steps < 1:
        raise ConfigError("train_steps must be >= 1 when no checkpoint is available.")
    finetune(FinetuneConfig(
        model=MendConfig(distiller=distiller, llm=llm, num_placeholders=16,
                         max_distiller_length=512),
        data=MetaICLConfig(root=str(root), partition=PARTITION, k=8, max_input_tokens=64,
                           max_context_tokens=512),
        train=TrainConfig(max_steps=cfg.train_steps, batch_size=4, lr=1e-4, warmup_steps=5,
                          log_every=5, save_every=cfg.train_steps),
        objective=ObjectiveConfig(pred=1.0, distill=1.0), output_dir=str(out)))


def _plot(table: list[dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in table]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3))
    panels = [("accuracy (%)", [r["accuracy"] * 100 for r in table]),
              ("LLM GFLOPs per query", [r["llm_flops"] / 1e9 for r in table]),
              ("ms per query", [r["seconds"] * 1e3 for r in table])]
    for ax, (title, values) in zip(axes, panels):
        ax.bar(names, values, color=["#999999", "#4477aa", "#228833"])
        ax.set_title(title)
    fig.suptitle("mend demo: built-in tasks, k = 16")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cli(argv=None) -> int:
    """``mend demo [--tiny] [--checkpoint DIR] [key=value ...]``."""
    import sys

    from mend.recipes import run

    args = list(sys.argv[1:] if argv is None else argv)
    flags = {"--tiny": "tiny=true"}
    args = [flags.get(a, a) for a in args]
    for flag, key in (("--checkpoint", "checkpoint"), ("--output-dir", "output_dir")):
        if flag in args[:-1]:
            i = args.index(flag)
            args[i:i + 2] = [f"{key}={args[i + 1]}"]
    return run(DemoJobConfig, main, args, prog="mend demo")
