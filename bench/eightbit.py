"""The frozen LLM in 8-bit: does the distiller still learn through it, and what does it cost?

    python bench/eightbit.py                      # the zoo pair on the CPU (bitsandbytes 0.50)
    python bench/eightbit.py --device cuda        # the zoo pair on CUDA
    python bench/eightbit.py --tiny               # tiny models, in seconds

The same distiller (one seed) is built twice, in front of the LLM in bf16 and in 8-bit
(bitsandbytes' LLM.int8()), and given the same pretraining batch (real WikiText text):

- ``grad_cosine``: the cosine between the distiller's gradient through the 8-bit LLM and
  through the bf16 one, on the first step (1: the same direction);
- ``loss_first`` / ``loss_last``: the loss before and after ``--steps`` AdamW steps on that
  batch, and ``moved``, the distiller's largest weight change: learning through the LLM
  lowers the first and makes the second non-zero;
- ``step_s``: the median wall time of a step; ``peak_mb``: the peak memory the steps took
  (CPU: the process's resident growth).

Where bitsandbytes cannot run LLM.int8() the 8-bit row holds mend's error, as a user gets it;
bitsandbytes 0.50 runs it on the CPU too.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from train import batch_arguments, make_batch  # noqa: E402

COLUMNS = ["llm", "status", "grad_cosine", "loss_first", "loss_last", "moved", "step_s",
           "peak_mb"]


def main(argv=None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    batch_arguments(p, batch=8, demo_tokens=256, input_tokens=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args(argv)
    rows, grads = [], {}
    for llm in ("bf16", "8bit"):
        row, grads[llm] = run(args, llm)
        rows.append(row)
    if grads["bf16"] is not None and grads["8bit"] is not None:
        rows[1]["grad_cosine"] = float(torch.nn.functional.cosine_similarity(
            grads["8bit"], grads["bf16"], dim=0))
        rows[0]["grad_cosine"] = 1.0
    targets = []
    if rows[1]["status"] == "ok":
        targets = [common.target("8-bit: the loss falls over the steps",
                                 rows[1]["loss_last"] / rows[1]["loss_first"], 1.0,
                                 higher_is_better=False),
                   common.target("8-bit: the distiller moves", rows[1]["moved"], 1e-8)]
    common.write(args, "eightbit", rows, COLUMNS, targets)
    return 0


def run(args, llm: str) -> tuple[dict, torch.Tensor | None]:
    """One LLM precision: its row, and the distiller's first gradient (flattened)."""
    from mend.core.config import MendConfig
    from mend.core.distiller import Distiller
    from mend.errors import MendError
    from mend.methods.mend import MendObjective, ObjectiveConfig

    distiller_path, llm_path = common.models(args)
    torch.manual_seed(0)
    try:
        d = Distiller.from_config(MendConfig(
            distiller=distiller_path, llm=llm_path, num_placeholders=args.placeholders,
            max_distiller_length=args.demo_tokens + args.placeholders + 8,
            llm_dtype="bfloat16", llm_8bit=llm == "8bit"), device=args.device)
    except MendError as e:
        return {"llm": llm, "status": f"skipped: {e}"}, None
    objective = MendObjective(d, ObjectiveConfig(distill=1.0))
    batch = make_batch(args, objective, "pretrain")
    params = [p for p in d.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    d.train()
    losses, times, first = [], [], None
    memory = common.PeakMemory(args.device).__enter__()
    for _ in range(args.steps):
        began = time.perf_counter()
        with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16):
            loss = objective.loss(d, batch)["loss"]
        loss.backward()
        if first is None:
            first = torch.cat([p.grad.detach().float().flatten() for p in params]).cpu()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        common.sync(args.device)
        times.append(time.perf_counter() - began)
        losses.append(float(loss.detach()))
    memory.__exit__(None, None, None)
    moved = max(float((p.detach() - s).abs().max()) for p, s in zip(params, start))
    return {"llm": llm, "status": "ok", "loss_first": losses[0], "loss_last": losses[-1],
            "moved": moved, "step_s": statistics.median(times[1:] or times),
            "peak_mb": memory.peak / 2**20}, first


if __name__ == "__main__":
    raise SystemExit(main())
