"""Steps/s, tokens/s and MFU of a MEND pretraining step and a finetuning step.

    python bench/train.py --tiny                          # seconds
    python bench/train.py                                 # the zoo pair on the CPU
    python bench/train.py --device cuda --batch 8 --demo-tokens 800 --input-tokens 300 \\
        --placeholders 100                                # the H100 setting of ../shared/GPU.md

A step is the whole of training's inner loop: the distiller's forward and backward, the frozen
LLM's teacher forward (no grad), the student forward and backward through the frozen LLM, and
AdamW. Variants: eager fp32 (the reference), bf16 autocast, gradient checkpointing,
torch.compile (bf16 on CUDA, fp32 on a CPU), and an 8-bit LLM (CUDA only; recorded as skipped
elsewhere). A CPU without bf16 matmul units skips bf16, saying so.

**MFU** = model FLOPs per step x steps/s / peak FLOP/s. Model FLOPs are counted once with
``torch.utils.flop_counter`` on an eager step without recomputation. The peak is the H100 SXM's
dense bf16 (989 TFLOP/s) or fp32 (67 TFLOP/s) on CUDA, by the variant's dtype; on a CPU it is
measured here, as the best of large fp32 and bf16 matmuls, and stated in the results.
"""

from __future__ import annotations

import contextlib
import gzip
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

H100_PEAK = {"bfloat16": 989.4e12, "float32": 66.9e12}


def main(argv=None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    batch_arguments(p, batch=2, demo_tokens=192, input_tokens=64)
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant (median)")
    p.add_argument("--variants", default="eager-fp32,bf16,checkpointing,compile,8bit")
    p.add_argument("--profile", action="store_true",
                   help="also count what one step asks of the host (torch.profiler)")
    args = p.parse_args(argv)
    peaks = peak_flops(args.device)
    rows = []
    for stage in ("pretrain", "finetune"):
        flops = None
        for variant in args.variants.split(","):
            row = measure(args, stage, variant, peaks)
            if variant == "eager-fp32":
                flops = row.get("model_flops")
            if flops and row.get("step_s"):
                row["model_flops"] = flops
                row["mfu"] = flops / row["step_s"] / peak_for(args, variant, peaks)
            rows.append(row)
            print(row, flush=True)
    from mend.training import precision
    mixed, why = precision.resolve("auto", "cuda" if args.device == "cuda" else "cpu")
    notes = [f"Peak FLOP/s used for MFU: {peaks} ({peaks['source']}).",
             f"train.mixed_precision=auto resolves to {mixed} here: {why}. Both the fp32 "
             f"(eager-fp32) and the bf16 step are measured above."]
    if args.device == "cuda":
        best = max((r.get("mfu") or 0) for r in rows if r["stage"] == "pretrain")
        targets = [common.target("pretraining MFU on one H100 >= 25%", best, 0.25)]
    else:
        targets = []
        notes.append("The 25% MFU target is an H100 target; this CPU run measures the same "
                     "step against the CPU's own measured matmul peak.")
    columns = ["stage", "variant", "status", "step_s", "steps_per_s", "tokens_per_s",
               "model_flops", "mfu", "peak_mb", "first_step_s"]
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
    """Variants run under bf16 autocast: bf16 and 8-bit; compile too on CUDA (on a CPU it
    compiles the fp32 step, bf16 being emulated there)."""
    return variant in ("bf16", "8bit") or (variant == "compile" and args.device == "cuda")


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
    """``--batch`` examples of real WikiText text: the distiller reads ``--demo-tokens``, the
    teacher the same text in LLM tokens, and both read ``--input-tokens`` after it."""
    from mend.data import Example

    d = objective.module
    path = Path(args.text)
    text = (gzip.open(path, "rt").read() if path.exists() else
            "The quick brown fox jumps over the lazy dog. " * 2000)
    ids = d.llm.tokenizer(text[:400_000], add_special_tokens=False)["input_ids"]
    examples, span = [], args.demo_tokens + args.input_tokens
    for i in range(args.batch):
        window = ids[i * span:(i + 1) * span]
        context, inp = window[:args.demo_tokens], window[args.demo_tokens:]
        demos = d.llm.tokenizer.decode(context)
        # Finetuning counts L_pred on the last 8 tokens (an output); pretraining has none.
        examples.append(Example(demos, context, inp,
                                len(inp) - 8 if stage == "finetune" else len(inp)))
    return objective.collate(examples)


def measure(args, stage: str, variant: str, peaks: dict) -> dict:
    from mend.config import MendConfig
    from mend.core.distiller import Distiller
    from mend.methods.mend import MendObjective, ObjectiveConfig
    from mend.training.loop import compile_modules

    row = {"stage": stage, "variant": variant}
    if variant == "8bit" and args.device != "cuda":
        return {**row, "status": "skipped: bitsandbytes 8-bit needs CUDA"}
    if variant == "bf16" and args.device != "cuda" and peaks["bfloat16"] < peaks["float32"] / 10:
        return {**row, "status": f"skipped: this CPU multiplies bf16 at "
                                 f"{peaks['bfloat16'] / 1e9:.2f} GFLOP/s (emulated), "
                                 f"fp32 at {peaks['float32'] / 1e9:.0f}"}
    distiller_path, llm_path = common.models(args)
    torch.manual_seed(0)
    d = Distiller.from_config(MendConfig(
        distiller=distiller_path, llm=llm_path, num_placeholders=args.placeholders,
        max_distiller_length=args.demo_tokens + args.placeholders + 8,
        llm_8bit=variant == "8bit", llm_dtype="bfloat16" if variant == "8bit" else "float32"),
        device=args.device)
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
    if variant == "compile":
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
