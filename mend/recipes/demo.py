"""``mend demo``: zero-shot, ICL and MEND side by side on the built-in tasks, offline.

    mend demo                # SmolLM2-135M distiller and LLM from the offline zoo
    mend demo --tiny         # random tiny models: the same pipeline in seconds

It prints, for each method, accuracy with each task's own demonstrations and with another
task's (the swap control: the difference is what the demonstrations are worth), and what
serving a task's queries costs: MEND compresses a task's demonstrations once and every query
reuses the vectors' KV cache; ICL either re-reads the demonstrations per query or reuses
their KV cache. The one-off cost is shown apart from the per-query FLOPs, latency and peak
memory, with the number of queries after which compress-once MEND is the cheaper. It writes
``results.json`` (with provenance) and ``demo.png`` to ``out/demo``.

The MEND checkpoint is, in order: ``--checkpoint``; the trained distiller shipped in the
package (``mend/assets/demo-distiller``, see docs/demo.md); one trained by an earlier demo run
(in ``$MEND_CACHE/demo``). If there is none, the demo first trains one briefly on its
meta-training tasks, and says so.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from mend import tiny as tiny_models
from mend.config import checked, replace
from mend.core.backbones import pick_device, zoo_path
from mend.core.config import FrozenLLM, MendConfig
from mend.core.distiller import read_config
from mend.core.prefix_lm import PrefixLM
from mend.core.zoo import cache_root
from mend.counters import sum_counts
from mend.data.demo import LONG_TASKS, NUM_DEMOS, PARTITION, SEED, materialize
from mend.data.metaicl import ContextBuilder, ContextConfig, MetaICLConfig, load_partition
from mend.errors import ConfigError
from mend.evaluation.efficiency import Serving, break_even, prefix_key, serving_costs
from mend.evaluation.harness import DemoConfig, evaluate_tasks
from mend.evaluation.metrics import recovered_share
from mend.methods import MethodConfig, build_method
from mend.methods.mend import ObjectiveConfig
from mend.recipes.finetune import FinetuneConfig
from mend.recipes.finetune import main as finetune
from mend.recipes.run import Recipe, run, write_results
from mend.reporting import demo_table, plots
from mend.reporting.results import memory
from mend.training.config import TrainConfig
from mend.training.precision import resolve

ASSET = Path(__file__).resolve().parents[1] / "assets" / "demo-distiller"
ZOO_PAIR = ("smollm2-135m", "smollm2-135m")


@dataclass(frozen=True)
@checked
class DemoJobConfig:
    tiny: bool = False
    """Random tiny models instead of the zoo's SmolLM2 (for CI and a quick look)."""
    checkpoint: str | None = None
    """A MEND checkpoint to use instead of the shipped or cached one."""
    train_steps: int = 60
    """Steps of the brief training when no checkpoint is found."""
    queries: int = 32
    """Test queries per task."""
    cost_queries: int = 2
    """Queries per task whose time is measured (after a warm-up), every way of serving them
    in turn, ``cost_rounds`` times; FLOPs and peak memory are measured on the first."""
    cost_rounds: int = 2
    """Rounds of the timed queries: each row's time is the median over all of them."""
    cost_tasks: Literal["one_per_length", "all"] = "one_per_length"
    """Whose costs are measured: ``one_per_length``, the first task with short
    demonstrations and the first with long ones, each standing for its group in the mean
    with its group's share of the tasks (what a way of serving costs depends on the lengths
    of the demonstrations and queries, not on their content); ``all``, every task."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """The weights of the frozen LLM and the distiller, the same for every row. ``auto``:
    bfloat16 where this machine multiplies it at least as fast as float32 (measured: CUDA
    GPUs from Ampere on, CPUs with AMX or AVX512-BF16), else float32."""
    refine_steps: int = 0
    """Also MEND with this many refinement steps per context (``compress(demos,
    refine_steps=N)``): a one-off cost per task; 0 leaves the row out."""
    context: ContextConfig = field(default_factory=lambda: ContextConfig(k=NUM_DEMOS))
    """Each task's demonstrations and the MetaICL truncation rules (the evaluation defaults;
    the demo's tasks never reach them)."""
    output_dir: str = "out/demo"

    def __post_init__(self) -> None:
        for name in ("train_steps", "queries", "cost_queries", "cost_rounds"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.refine_steps < 0:
            raise ConfigError(f"refine_steps must be >= 0, got {self.refine_steps}.")


def main(cfg: DemoJobConfig) -> dict[str, Any]:
    """Zero-shot vs ICL vs MEND on the built-in tasks, with their costs."""
    started = time.perf_counter()
    out = Path(cfg.output_dir)
    root = materialize(out / "tasks")
    distiller, llm = _models(cfg.tiny)
    checkpoint, origin = _checkpoint(cfg, distiller, llm, root)
    fmt = read_config(checkpoint)
    # The equal-memory rows hold what MEND's prefix holds: bos + l positions.
    equal = replace(cfg.context, max_context_tokens=fmt.num_placeholders)
    device = pick_device()
    dtype = _dtype(cfg.dtype, device)
    seps = {"io_sep": fmt.io_sep, "demo_sep": fmt.demo_sep, "llm_dtype": dtype}
    free = {"llm": llm, "num_placeholders": fmt.num_placeholders, **seps}
    trained = {"checkpoint": str(checkpoint), "distiller_dtype": dtype, **seps}
    methods = [(MethodConfig("zero_shot", llm=llm, **seps), cfg.context, SERVING["zero_shot"]),
               (MethodConfig("icl", llm=llm, **seps), cfg.context, SERVING["icl"]),
               (MethodConfig("icl", llm=llm, **seps), equal, SERVING["icl_equal_memory"]),
               *[(MethodConfig("kv_compress", compaction=name, **free), cfg.context,
                  SERVING[name]) for name in ("attention_cut", "kvzip", "attention_matching")],
               (MethodConfig("mend", **trained), cfg.context, SERVING["mend"])]
    if cfg.refine_steps:
        methods.append((MethodConfig("mend", refine_steps=cfg.refine_steps, **trained),
                        cfg.context, [(f"MEND + {cfg.refine_steps} refine steps", True)]))
    tasks = load_partition(root, PARTITION)[1]
    # One frozen LLM for every method that needs only it; MEND loads its own beside it.
    shared = PrefixLM.load(FrozenLLM.of(methods[0][0]), device)
    split = {}  # setup: tasks, zoo conversion, models, checkpoint
    bar = tqdm(total=len(methods) * 2 * len(tasks) + len(tasks), desc="demo",
               dynamic_ncols=True)
    built = []
    for method_cfg, context, serving in methods:
        method = build_method(method_cfg, device=device, llm=shared)
        built.append((method, ContextBuilder.for_method(method, context), serving))
    split["setup"] = time.perf_counter() - started
    # Costs first: each task's context is made there once, timed, and then scored below.
    began, made = time.perf_counter(), {}
    costs = _costs(built, tasks, cfg, device, bar, made)
    split["costs"] = time.perf_counter() - began
    table = []
    for method, builder, serving in built:
        began = time.perf_counter()
        contexts = {k: v for label, _ in serving for k, v in made.get(label, {}).items()}
        accuracy = _accuracy(_MadeOnce(method, contexts), tasks, builder, cfg.queries, bar)
        table += [{"method": label, **accuracy, **costs[label]} for label, _ in serving]
        split[f"accuracy: {serving[0][0]}"] = time.perf_counter() - began
    bar.close()
    _add_shares(table)
    even = break_evens(table)
    result = write_results(cfg, {
        "models": {"distiller": distiller, "llm": llm, "checkpoint": str(checkpoint),
                   "checkpoint_origin": origin, "dtype": dtype},
        "methods": table, "break_even": even, "queries_per_task": cfg.queries, "k": cfg.context.k,
        "cost_queries_per_task": cfg.cost_queries,
        "cost_tasks": cost_weights([t.name for t in tasks], cfg.cost_tasks), "wall_split_s": split,
        "wall_time_s": time.perf_counter() - started})
    plots.demo(table, even, cfg.context.k, out / "demo.png")
    print(f"\nMEND checkpoint: {checkpoint} ({origin})\n")
    print(demo_table.markdown(table, even))
    print(f"written: {out / 'results.json'}, {out / 'demo.png'} "
          f"({result['wall_time_s']:.0f} s in all)")
    return result


SERVING = {"zero_shot": [("zero-shot", False)],
           "icl": [("ICL (re-read per query)", False), ("ICL + KV cache", True)],
           "icl_equal_memory": [("ICL at equal memory + KV cache", True)],
           "attention_cut": [("KV cache cut to equal memory", True)],
           "kvzip": [("KVzip cut to equal memory", True)],
           "attention_matching": [("Attention Matching at equal memory", True)],
           "mend": [("MEND (compress once)", True)]}
"""Each method's rows: its table label, and whether one context serves every query (MEND
compresses a task's demonstrations once; ICL either re-reads them or reuses their KV cache).
The equal-memory rows hold as many prefix positions as MEND: ICL given the whole
demonstrations that fit in its l tokens, and ICL's own KV cache compacted to 1 + l positions
by each training-free compaction (the attention cut, KVzip's, and Attention Matching's fit,
whose bias per kept key counts in its memory)."""


def _add_shares(table: list[dict[str, Any]]) -> None:
    """Each row's recovered share of ICL's gain over zero-shot, over the tasks."""
    rows = {r["method"]: r for r in table}
    zero_shot, icl = rows["zero-shot"]["tasks"], rows["ICL + KV cache"]["tasks"]
    for r in table:
        r["recovered_share"] = recovered_share(r["tasks"], zero_shot, icl)
        r["groups"] = {}
        for group, names in _by_length(r["tasks"]).items():
            own = [r["tasks"][t] for t in names]
            swapped = [r["swapped_tasks"][t] for t in names if t in r["swapped_tasks"]]
            r["groups"][group] = {
                "accuracy": sum(own) / len(own),
                "content_gap": (sum(own) - sum(swapped)) / len(own) if swapped else None,
                "recovered_share": recovered_share({t: r["tasks"][t] for t in names}, zero_shot,
                                                   icl)["share"]}


def _by_length(tasks) -> dict[str, list[str]]:
    """The tasks with short demonstrations and those with long ones (that a prefix of the
    distiller's length cannot hold even one of)."""
    return {"short": [t for t in tasks if t not in LONG_TASKS],
            "long": [t for t in tasks if t in LONG_TASKS]}


def _accuracy(method, tasks, builder, queries: int, bar) -> dict[str, Any]:
    """Accuracy over the tasks with their own demonstrations and, for a method that reads
    them, with the next task's (the swap control): the difference is the content gap."""

    scores: dict[str, dict[str, float]] = {"own": {}, "swapped": {}}
    held = None
    for source in ("own", "swapped"):
        if source == "own" or method.reads_demos:
            bar.set_postfix(method=method.name, demos=source)
            demos = DemoConfig(source="own" if source == "own" else "other_task")
            results, _ = evaluate_tasks(method, tasks, [SEED], "test", builder, demos,
                                        limit=queries)
            scores[source] = {r.task: r.metrics["accuracy"] for r in results}
            if source == "own":
                held = memory(sum_counts(r.counts for r in results))
        bar.update(len(tasks))
    mean = {k: sum(v.values()) / len(v) if v else None for k, v in scores.items()}
    gap = None if mean["swapped"] is None else mean["own"] - mean["swapped"]
    return {"accuracy": mean["own"], "swapped_accuracy": mean["swapped"], "content_gap": gap,
            "tasks": scores["own"], "swapped_tasks": scores["swapped"], "memory": held}


class _MadeOnce:
    """``method``, making each demonstration set's prefix once (``made``: those the costs
    made, by :func:`~mend.evaluation.efficiency.prefix_key`). Every task's own context was
    made while its cost was measured, and the swap control scores each task with the next
    task's demonstrations, whose context is that task's own."""

    def __init__(self, method, made: dict[str, Any]):
        self._method, self._made = method, dict(made)

    def __getattr__(self, name: str):
        return getattr(self._method, name)

    def prefix(self, demo_sets, contexts):
        key = prefix_key(demo_sets, contexts)
        if key not in self._made:
            self._made[key] = self._method.prefix(demo_sets, contexts)
        return self._made[key]


def _costs(built, tasks, cfg: DemoJobConfig, device, bar, made: dict[str, dict[str, Any]]
           ) -> dict[str, dict[str, Any]]:
    """Every row's costs (:func:`~mend.evaluation.efficiency.serving_costs`, every way of
    serving timed in turn) on the tasks :func:`cost_weights` picks, each task's 16
    demonstrations serving ``cost_queries`` test queries, their mean weighted as it says; a
    row's ``spread`` is its widest. ``made`` gains those tasks' contexts, per row."""
    servings = {label: Serving(method, builder, reuse)
                for method, builder, serving in built for label, reuse in serving}
    weights = cost_weights([t.name for t in tasks], cfg.cost_tasks)
    runs = []
    for task in tasks:
        if task.name in weights:
            bar.set_postfix(task=task.name, step="costs")
            runs.append((weights[task.name], serving_costs(
                servings, [(r["input"], r["output"]) for r in task.rows("train", SEED)],
                task.rows("test")[:cfg.cost_queries], device, rounds=cfg.cost_rounds,
                made=made)))
        bar.update(1)
    out = {}
    for label in servings:
        per_task = [(w, run[label]) for w, run in runs]
        out[label] = {part: {k: max(r[part][k] for _, r in per_task) if k == "spread"
                             else sum(w * r[part][k] for w, r in per_task)
                             for k in per_task[0][1][part]}
                      for part in ("once", "per_query")}
    return out


def cost_weights(tasks: list[str], which: str) -> dict[str, float]:
    """The tasks whose costs are measured, each with its weight in the mean: every task
    alike (``all``), or the first of each length group with its group's share of the tasks
    (``one_per_length``)."""
    if which == "all":
        return {t: 1 / len(tasks) for t in tasks}
    return {names[0]: len(names) / len(tasks) for names in _by_length(tasks).values() if names}


def break_evens(table: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, int | None]]]:
    """For each MEND row, after how many queries of one demonstration set it costs less in
    all than each ICL row, in FLOPs and in measured time: ``{mend row: {ICL row: {"flops",
    "seconds"}}}``."""
    rows = {r["method"]: r for r in table}
    return {m: {label: {key: break_even(rows[m], rows[label], key)
                        for key in ("flops", "seconds")}
                for label in rows if label.startswith("ICL")}
            for m in rows if m.startswith("MEND")}


def _dtype(setting: str, device: str) -> str:
    """The weights' dtype: ``setting``, or for ``auto`` bfloat16 where it is native here."""
    if setting != "auto":
        return setting
    native = resolve("auto", torch.device(device).type)[0] == "bf16"
    return "bfloat16" if native else "float32"


def _models(tiny: bool) -> tuple[str, str]:
    if not tiny:
        for name in set(ZOO_PAIR):
            zoo_path(name)  # converts on first use; a missing package names its pip command
        return ZOO_PAIR
    base = cache_root() / "demo"
    return (str(tiny_models.build(base / "tiny-distiller", "llama", "metaspace", hidden=32)),
            str(tiny_models.build(base / "tiny-llm", "gpt2", "bytelevel", hidden=48)))


def _checkpoint(cfg: DemoJobConfig, distiller: str, llm: str, root: Path) -> tuple[Path, str]:
    if cfg.checkpoint:
        return Path(cfg.checkpoint), "given with --checkpoint"
    if not cfg.tiny and (ASSET / "mend_config.json").is_file():
        saved = read_config(ASSET)
        if (saved.distiller, saved.llm) == (distiller, llm):
            return ASSET, "the trained distiller shipped with mend"
    cached = cache_root() / "demo" / ("trained-tiny" if cfg.tiny else "trained-smollm2")
    from filelock import FileLock  # a dependency of transformers' hub client

    cached.parent.mkdir(parents=True, exist_ok=True)
    # Two demos at once train one checkpoint: the second waits, then finds it.
    with FileLock(str(cached) + ".lock"):
        if (cached / "mend_config.json").is_file():
            return cached, f"trained briefly by an earlier `mend demo` run, {cached}"
        print(f"mend demo: no trained MEND checkpoint found, so training one briefly first: "
              f"{cfg.train_steps} steps of meta-distillation finetuning on the demo's "
              f"meta-training tasks. A checkpoint trained for longer scores better; see "
              f"docs/demo.md (\"The demo's checkpoint\").", flush=True)
        _train_briefly(cfg, distiller, llm, root, cached)
    return cached, "trained briefly by this run (no shipped checkpoint was found)"


def _train_briefly(cfg: DemoJobConfig, distiller: str, llm: str, root: Path, out: Path) -> None:
    if cfg.train_steps < 1:
        raise ConfigError("train_steps must be >= 1 when no checkpoint is available.")
    finetune(FinetuneConfig(
        model=MendConfig(distiller=distiller, llm=llm, num_placeholders=16,
                         max_distiller_length=512),
        data=MetaICLConfig(root=str(root), partition=PARTITION),
        context=ContextConfig(k=8, max_input_tokens=64, max_context_tokens=512),
        train=TrainConfig(max_steps=cfg.train_steps, batch_size=4, lr=1e-4, warmup_steps=5,
                          log_every=5, save_every=cfg.train_steps),
        objective=ObjectiveConfig(pred=1.0, distill=1.0), output_dir=str(out)))


def cli(argv=None) -> int:
    """``mend demo [--tiny] [--checkpoint DIR] [key=value ...]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    flags = {"--tiny": "tiny=true"}
    args = [flags.get(a, a) for a in args]
    for flag, key in (("--checkpoint", "checkpoint"), ("--output-dir", "output_dir")):
        if flag in args[:-1]:
            i = args.index(flag)
            args[i:i + 2] = [f"{key}={args[i + 1]}"]
    return run(Recipe(DemoJobConfig, main), args, prog="mend demo")
