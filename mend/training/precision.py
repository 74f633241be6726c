"""Which training precision pays on this machine: ``train.mixed_precision: auto``.

bf16 autocast is a win only where the hardware multiplies bf16 natively: CUDA GPUs from Ampere
on, and CPUs with AMX or AVX512-BF16. Elsewhere a CPU emulates it, several to hundreds of times
slower than fp32. CPU flags do not say what torch's kernels do with them, so on a CPU this is
measured, not assumed: a few square matmuls in each dtype, about a tenth of a second.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable

import torch


def matmul_rate(dtype: torch.dtype, size: int = 512, repeats: int = 5,
                device: str = "cpu") -> float:
    """FLOP/s of a ``size``-square matmul in ``dtype`` (best of ``repeats``, after a warm-up)."""
    a = torch.randn(size, size, device=device).to(dtype)
    a @ a
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        a @ a
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - began)
    return 2 * size ** 3 / best


@functools.cache
def resolve(setting: str, device_type: str) -> tuple[str, str]:
    """``(no | bf16 | fp16, why)`` for ``train.mixed_precision``; only ``auto`` is decided here.

    ``auto`` is bf16 on a CUDA GPU that supports it, and on a CPU whose measured bf16 matmul
    rate is at least its fp32 rate; otherwise ``no`` (fp32).
    """
    if setting != "auto":
        return setting, "as configured"
    if device_type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "this CUDA GPU supports bf16"
        return "no", "this CUDA GPU does not support bf16"
    if device_type != "cpu":
        return "no", f"no bf16 check for {device_type} devices"
    fp32, bf16 = cpu_rates()
    rates = f"bf16 matmul {bf16 / 1e9:.0f} GFLOP/s, fp32 {fp32 / 1e9:.0f}"
    if bf16 >= fp32:
        return "bf16", f"this CPU computes bf16 natively ({rates})"
    return "no", f"this CPU emulates bf16 ({rates}), so training stays in fp32"


@functools.cache
def cpu_rates() -> tuple[float, float]:
    """This CPU's ``(fp32, bf16)`` matmul FLOP/s, measured once a process."""
    return matmul_rate(torch.float32), matmul_rate(torch.bfloat16)


def bf16_warning(asks: Iterable[str], device_type: str) -> str | None:
    """Why the settings in ``asks`` (those that compute in bf16: ``train.mixed_precision=bf16``,
    frozen weights stored in bf16) will be slow here, or None: on a CPU whose measured bf16
    matmul rate is under half its fp32 rate (an emulating CPU runs bf16 tens of times slower)."""
    asks = list(asks)
    if device_type != "cpu" or not asks:
        return None
    fp32, bf16 = cpu_rates()
    if bf16 >= fp32 / 2:
        return None
    return (f"{' and '.join(asks)} compute in bf16, but this CPU emulates it (bf16 matmul "
            f"{bf16 / 1e9:.0f} GFLOP/s, fp32 {fp32 / 1e9:.0f}: {fp32 / bf16:.0f}x slower). "
            f"Train in fp32 here: train.mixed_precision=auto (or no) and the model's dtypes "
            f"float32.")
