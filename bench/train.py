"""Tokens/s of a MEND training step, today's path beside each lever alone and all together.

    python bench/train.py --tiny                          # seconds
    python bench/train.py                                 # the zoo pair on the CPU, both recipes
    python bench/train.py --device cuda --recipes paper --batch 8 --demo-tokens 800 \
        --input-tokens 300 --placeholders 100             # the H100 setting of ../shared/GPU.md

A step is the whole of training's inner loop: the distiller's forward and backward, the frozen
LLM's teacher forward (no grad), the student forward and backward through the frozen LLM, and
AdamW, on a stage-1 batch (``pretrain``: text windows, L_distill) and a stage-2 batch
(``finetune``: a longer context, L_distill + L_pred on the last 8 tokens).

**Recipes** (the model config trained): ``kv``, the shipped distiller's (LoRA r = 8 on the LLM
itself, ``output: kv``, 16 placeholders); ``compacted``, the warm start's (the same LoRA,
``output: compacted`` with Attention Matching: it reads the context twice); ``paper``, the
paper's (a fully trained distiller, ``output: embeddings``).

**Variants** (rows): ``old`` is the step as mend trained it before the levers: float32 weights
under bf16 autocast, LoRA dropout 0.05, the sdpa kernel. Each lever alone:
``bf16-weights`` (the frozen LLM and the frozen distiller stored in bf16; trainable weights,
LoRA's adapters included, stay float32), ``no-dropout`` (LoRA dropout 0: no random mask per
adapter), ``eager-attention`` (the eager kernel, faster than sdpa at a CPU step's short
lengths); ``new``, all three; ``new+compile``, the same under ``torch.compile`` (the first
step compiles). ``eager-fp32`` (no autocast) counts the model FLOPs; ``checkpointing`` and
``8bit`` are kept from the earlier bench. A CPU without bf16 matmul units skips bf16, saying
so.

**MFU** = model FLOPs per step x steps/s / peak FLOP/s. Model FLOPs are counted once with
``torch.utils.flop_counter`` on an eager step without recomputation. The peak is the H100 SXM's
dense bf16 (989 TFLOP/s) or fp32 (67 TFLOP/s) on CUDA, by the variant's dtype; on a CPU it is
measured here, as the best of large fp32 and bf16 matmuls, and stated in the results.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

H100_PEAK = {"bfloat16": 989.4e12, "float32": 66.9e12}

RECIPES = {
    "kv": dict(output="kv", train_mode="lora", lora_r=8, lora_alpha=16,
               placeholder_init="vocab"),
    "compacted": dict(output="compacted", compaction="attention_matching", train_mode="lora",
                      lora_r=8, lora_alpha=16),
    "paper": dict(output="embeddings", train_mode="full"),
}
"""The model configs a step trains (separators and sizes come from the command line)."""

LEVERS = {
    "bf16-weights": dict(distiller_dtype="bfloat16", llm_dtype="bfloat16"),
    "no-dropout": dict(lora_dropout=0.0),
    "eager-attention": dict(attn_implementation="eager"),
}
"""What each lever changes in the model config; ``old`` is none of them."""

VARIANTS = {"old": (), **{name: (name,) for name in LEVERS}, "new": tuple(LEVERS),
            "new+compile": (*LEVERS, "compile")}


def main(argv=None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    batch_arguments(p, batch=4, demo_tokens=102, input_tokens=26)
    p.add_argument("--finetune-batch", type=int, default=2)
    p.add_argument("--finetune-demo-tokens", type=int, default=300)
    p.add_argument("--finetune-input-tokens", type=int, default=40)
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant (median)")
    p.add_argument("--recipes", default="kv,compacted")
    p.add_argument("--stages", default="pretrain,finetune")
    p.add_argument("--variants", default="eager-fp32,old,bf16-weights,no-dropout,"
                                         "eager-attention,new")
    p.add_argument("--profile", action="store_true",
                   help="also count what one step asks of the host (torch.profiler)")
    p.add_argument("--repeats", type=int, default=2,
                   help="times each variant is measured, the variants in turn (the median "
                        "kept; spread: slowest over fastest)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:  # one row, in a process of its own: print it as JSON
        recipe, stage, variant = args.one.split(":")
        print("ROW " + json.dumps(measure(args, recipe, stage, variant, None)), flush=True)
        return 0
    peaks = peak_flops(args.device)
    rows = []
    for recipe in args.recipes.split(","):
        for stage in args.stages.split(","):
            rows += measure_in_turn(args, argv, recipe, stage, peaks)
    rate = matmul_rate(args, peaks)
    from mend.training import precision
    mixed, why = precision.resolve("auto", "cuda" if args.device == "cuda" else "cpu")
    for row in rows:  # what the matmuls alone would take at the rate of the step's shapes
        if row.get("model_flops") and row.get("step_s"):
            row["bound_tokens_per_s"] = row["tokens_per_s"] * row["step_s"] / (
                row["model_flops"] / rate)
    notes = [f"Peak FLOP/s used for MFU: {peaks} ({peaks['source']}).",
             f"bound_tokens_per_s: the tokens/s of a step that did nothing but its model FLOPs "
             f"at {rate / 1e9:.0f} GFLOP/s, the bf16 matmul rate measured here at the step's "
             f"own shapes ((batch tokens x hidden) by (hidden x 1536)): no lever of the step "
             f"itself can pass it.",
             f"train.mixed_precision=auto resolves to {mixed} here: {why}.",
             "speedup: tokens/s over the `old` row of the same recipe and stage, measured in "
             "the same run."]
    targets = []
    if args.device == "cuda":
        best = max((r.get("mfu") or 0) for r in rows if r["stage"] == "pretrain")
        targets = [common.target("pretraining MFU on one H100 >= 25%", best, 0.25)]
    else:
        notes.append("The 25% MFU target is an H100 target; this CPU run measures the same "
                     "step against the CPU's own measured matmul peak.")
        for r in rows:
            if r["variant"] == "new" and r.get("speedup"):
                targets.append(common.target(f"{r['recipe']} {r['stage']}: new >= 3x old "
                                             f"tokens/s", r["speedup"], 3.0))
    columns = ["recipe", "stage", "variant", "status", "step_s", "spread", "tokens_per_s",
               "speedup", "bound_tokens_per_s", "model_flops", "mfu", "peak_mb",
               "first_step_s"]
    if args.profile:
        columns += ["aten_calls", "host_reads", "kernel_launches", "device_syncs", "top_calls"]
        notes.append(PROFILE_NOTE)
    common.write(args, "train", rows, columns, targets, notes)
    return 0


PROFILE_NOTE = (
    "Profile of one step (torch.profiler): aten_calls counts ATen operator calls (views "
    "included), the host-side work a step asks for; host_reads counts reads of a tensor's value "
    "by the host (aten::_local_scalar_dense: .item(), float()), including AdamW's reads of its "
    "step counters, which live on the CPU; on CUDA, kernel_launches counts cudaLaunchKernel "
    "calls and device_syncs the stream, event and device synchronisations, the reads that "
    "leave the GPU idle. top_calls: the five most frequent operators.")


def profile_step(step, device: str) -> dict:
    """What one call of ``step`` asks of the host (see PROFILE_NOTE)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        common.sync(device)
    events = prof.key_averages()

    def calls(match) -> int:
        return sum(e.count for e in events if match(e.key))
    aten = sorted((e for e in events if e.key.startswith("aten::")), key=lambda e: -e.count)
    row = {"aten_calls": calls(lambda k: k.startswith("aten::")),
           "host_reads": calls(lambda k: k == "aten::_local_scalar_dense"),
           "top_calls": ", ".join(f"{e.key[6:]} {e.count}" for e in aten[:5])}
    if device == "cuda":
        row["kernel_launches"] = calls(lambda k: k.startswith(("cudaLaunchKernel",
                                                               "cuLaunchKernel")))
        row["device_syncs"] = calls(lambda k: k in ("cudaStreamSynchronize",
                                                    "cudaDeviceSynchronize",
                                                    "cudaEventSynchronize"))
    return row


def low_precision(args, variant: str) -> bool:
    """Every variant runs under bf16 autocast but ``eager-fp32``, ``checkpointing`` (fp32
    references) and, on a CPU, ``compile`` of the fp32 step where bf16 is emulated."""
    return variant not in ("eager-fp32", "checkpointing")


def peak_for(args, variant: str, peaks: dict) -> float:
    """On CUDA, the peak of the variant's dtype. On a CPU, the best measured peak whatever the
    variant: MFU then says how much of the machine a step uses."""
    if args.device == "cuda":
        return peaks["bfloat16" if low_precision(args, variant) else "float32"]
    return max(peaks["float32"], peaks["bfloat16"])


def peak_flops(device: str) -> dict:
    if device == "cuda":
        return {**H100_PEAK, "source": "H100 SXM datasheet, dense"}
    peaks = {}
    # fp32 at 2048^3; bf16 at 512^3 first, since a CPU without bf16 units runs it ~300x
    # slower, and only grown to 2048^3 where it is fast enough for that to take a moment.
    for dtype, size in ((torch.float32, 2048), (torch.bfloat16, 512), (torch.bfloat16, 2048)):
        name = str(dtype).split(".")[-1]
        if size == 2048 and name in peaks and peaks[name] < peaks["float32"] / 10:
            continue
        a = torch.randn(size, size, dtype=dtype)
        seconds = common.timed(lambda a=a: a @ a, device, repeats=3)
        peaks[name] = 2 * size ** 3 / seconds
    return {**peaks, "source": "measured: square matmuls on this CPU"}


def batch_arguments(p, batch: int, demo_tokens: int, input_tokens: int) -> None:
    """The command-line arguments :func:`make_batch` and the distiller it feeds read."""
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--demo-tokens", type=int, default=demo_tokens)
    p.add_argument("--input-tokens", type=int, default=input_tokens)
    p.add_argument("--placeholders", type=int, default=16)
    p.add_argument("--text", default="../shared/data/text/wikitext-2/wiki.valid.tokens.gz")


def make_batch(args, objective, stage: str):
    """A batch of real WikiText text: the distiller reads ``demo`` tokens, the teacher the same
    text in LLM tokens, and both read ``input`` tokens after it (stage 1: ``--batch``,
    ``--demo-tokens``, ``--input-tokens``; stage 2: the ``--finetune-`` ones, L_pred on the
    last 8 tokens, an output)."""
    from mend.data import Example

    d = objective.module
    path = Path(args.text)
    text = (gzip.open(path, "rt").read() if path.exists() else
            "The quick brown fox jumps over the lazy dog. " * 2000)
    ids = d.llm.tokenizer(text[:400_000], add_special_tokens=False)["input_ids"]
    finetune = stage == "finetune"
    batch, demo, inp = ((args.finetune_batch, args.finetune_demo_tokens,
                         args.finetune_input_tokens) if finetune else
                        (args.batch, args.demo_tokens, args.input_tokens))
    examples, span = [], demo + inp
    for i in range(batch):
        window = ids[i * span:(i + 1) * span]
        context, query = window[:demo], window[demo:]
        examples.append(Example(d.llm.tokenizer.decode(context), context, query,
                                len(query) - 8 if finetune else len(query)))
    return objective.collate(examples)


def model_config(args, recipe: str, variant: str):
    """The recipe's config with the variant's levers; ``None`` where the variant cannot apply
    (8-bit where bitsandbytes cannot run it)."""
    from mend.core.config import MendConfig

    distiller_path, llm_path = common.models(args)
    levers = {}
    for name in VARIANTS.get(variant, ()):
        levers.update(LEVERS.get(name, {}))
    if recipe == "paper" and "distiller_dtype" in levers:
        del levers["distiller_dtype"]  # a fully trained distiller keeps float32 weights
    if variant == "8bit":
        levers.update(llm_8bit=True, llm_dtype="bfloat16")
    length = max(args.demo_tokens, args.finetune_demo_tokens) + args.placeholders + 8
    return MendConfig(distiller=distiller_path, llm=llm_path, num_placeholders=args.placeholders,
                      max_distiller_length=length, io_sep="\n", demo_sep="\n\n",
                      **{"lora_dropout": 0.05, **RECIPES[recipe], **levers})


def measure_in_turn(args, argv, recipe: str, stage: str, peaks: dict) -> list[dict]:
    """Every variant of one recipe and stage, ``--repeats`` times in turn (A B C A B C), so
    that a slow spell of the machine falls on all of them: each row the run of median step
    time, with ``spread`` (slowest over fastest), the model FLOPs (counted by ``eager-fp32``)
    and the speedup over ``old``."""
    variants = args.variants.split(",")
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for repeat in range(args.repeats):
        for variant in variants:
            if repeat and (variant == "eager-fp32" or runs[variant][0].get("status") != "ok"):
                continue  # counted once, or cannot run here
            skipped = _skip(args, variant, peaks)
            runs[variant].append({"recipe": recipe, "stage": stage, **skipped} if skipped
                                 else measure_apart(argv, recipe, stage, variant, repeat))
    rows, flops, old = [], None, None
    for variant in variants:
        done = [r for r in runs[variant] if r.get("step_s")]
        row = runs[variant][0]
        if done:
            times = sorted(r["step_s"] for r in done)
            row = {**sorted(done, key=lambda r: r["step_s"])[len(done) // 2],
                   **{k: v for k, v in runs[variant][0].items() if k in PROFILED},
                   "spread": times[-1] / times[0]}
        flops = row.get("model_flops", flops)
        if variant == "old":
            old = row.get("tokens_per_s")
        if flops and row.get("step_s"):
            row["model_flops"] = flops
            row["mfu"] = flops / row["step_s"] / peak_for(args, variant, peaks)
        if old and row.get("tokens_per_s"):
            row["speedup"] = row["tokens_per_s"] / old
        rows.append(row)
        print(row, flush=True)
    return rows


PROFILED = ("aten_calls", "host_reads", "kernel_launches", "device_syncs", "top_calls")


def matmul_rate(args, peaks: dict) -> float:
    """bf16 (fp32 where bf16 is emulated) FLOP/s of a matmul of a step's own shapes: its
    batch's tokens by SmolLM2's hidden size (576), by its MLP's width (1536)."""
    dtype = (torch.bfloat16 if args.device == "cuda" or peaks["bfloat16"] > peaks["float32"]
             else torch.float32)
    a = torch.randn(args.batch * (args.demo_tokens + args.input_tokens), 576, dtype=dtype,
                    device=args.device)
    b = torch.randn(576, 1536, dtype=dtype, device=args.device)
    seconds = common.timed(lambda: a @ b, args.device, repeats=20)
    return 2 * a.shape[0] * 576 * 1536 / seconds


def measure_apart(argv, recipe: str, stage: str, variant: str, repeat: int = 0) -> dict:
    """:func:`measure` in a process of its own: a variant measured after another in the same
    process runs slower (the profiler's and the FLOP counter's state, and the allocator's,
    outlive their step), so each row starts from a clean process."""
    argv = [a for a in (sys.argv[1:] if argv is None else argv)
            if not (repeat and a == "--profile")]  # one profile a variant
    done = subprocess.run([sys.executable, __file__, *argv, "--one",
                           f"{recipe}:{stage}:{variant}"], capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith("ROW "):
            return json.loads(line[4:])
    return {"recipe": recipe, "stage": stage, "variant": variant,
            "status": f"failed: {(done.stderr.strip().splitlines() or [''])[-1][:200]}"}


def _skip(args, variant: str, peaks: dict) -> dict | None:
    """The row of a variant that cannot run here, with the reason; None when it can."""
    if variant == "8bit":
        from mend.core.backbones import bitsandbytes_problem
        problem = bitsandbytes_problem(args.device)
        if problem:
            return {"variant": variant, "status": f"skipped: {problem}"}
    if (low_precision(args, variant) and args.device != "cuda"
            and peaks["bfloat16"] < peaks["float32"] / 10):
        return {"variant": variant, "status": f"skipped: this CPU multiplies bf16 at "
                                              f"{peaks['bfloat16'] / 1e9:.2f} GFLOP/s "
                                              f"(emulated), fp32 at "
                                              f"{peaks['float32'] / 1e9:.0f}"}
    return None


def measure(args, recipe: str, stage: str, variant: str, peaks: dict | None) -> dict:
    from mend.core.distiller import Distiller
    from mend.methods.mend import MendObjective, ObjectiveConfig
    from mend.training.loop import compile_modules

    row = {"recipe": recipe, "stage": stage, "variant": variant}
    torch.manual_seed(0)
    d = Distiller.from_config(model_config(args, recipe, variant), device=args.device)
    if variant == "checkpointing":
        d.gradient_checkpointing_enable()
    objective = MendObjective(d, ObjectiveConfig(distill=1.0, pred=float(stage == "finetune")))
    batch = make_batch(args, objective, stage)
    optimizer = torch.optim.AdamW([p for p in d.parameters() if p.requires_grad], lr=1e-5)
    d.train()
    autocast = (torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16)
                if low_precision(args, variant) else contextlib.nullcontext())

    def step():
        with autocast:
            loss = objective.loss(d, batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if variant == "eager-fp32":
        _, row["model_flops"] = common.count_flops(step)
    if "compile" in variant:
        compile_modules(d)
    with common.PeakMemory(args.device) as memory:
        began = time.perf_counter()
        step()  # warm-up (and compilation)
        common.sync(args.device)
        row["first_step_s"] = time.perf_counter() - began
        times = []
        for _ in range(args.steps):
            began = time.perf_counter()
            step()
            common.sync(args.device)
            times.append(time.perf_counter() - began)
    seconds = statistics.median(times)
    profiled = profile_step(step, args.device) if args.profile else {}
    return {**row, "status": "ok", "step_s": seconds, "steps_per_s": 1 / seconds,
            "tokens_per_s": batch["tokens"] / seconds, "peak_mb": memory.peak / 2**20,
            **profiled}


if __name__ == "__main__":
    raise SystemExit(main())
