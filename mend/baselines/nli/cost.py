"""Peak memory and time against context size (k demonstrations) for ICL, PBFT and CD.

    mend nli cost --config configs/nli/cost.yaml

For each k:

- **ICL:** the LLM reads the k demonstrations and a query (batch size 1), per query;
- **PBFT:** the k examples become training data: one full fine-tuning step (forward,
  backward, AdamW) on a batch of them, and the epoch time of ceil(k / batch) steps;
- **CD:** the teacher reads the k demonstrations and a training example, once per example
  (cached afterwards); the student's training step never sees the context.

Writes ``cost.json`` (with provenance) and ``cost.md``.
"""

from __future__ import annotations

import gc
import math
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mend.baselines.nli.context_distillation import DistillObjective
from mend.baselines.nli.data import NLIDataConfig, NLIExample, balanced_sample, nli_data
from mend.baselines.nli.model import PatternLM, PatternModelConfig, PatternObjective
from mend.baselines.nli.patterns import Pattern, context_text, get_pattern
from mend.config import checked
from mend.core.backbones import pick_device
from mend.core.config import Dtype, FrozenLLM
from mend.core.prefix_lm import PrefixLM
from mend.evaluation.efficiency import measure
from mend.recipes.run import write_results


@dataclass(frozen=True)
@checked
class NLICostConfig:
    llm: str = "smollm2-135m"
    """The ICL model, the PBFT model and the CD student."""
    teacher: str = "gemma3-270m"
    ks: tuple[int, ...] = (2, 16, 32)
    queries: int = 8
    """Queries (ICL) and training examples (CD teacher) timed per k, after one warm-up."""
    train_steps: int = 3
    """Training steps timed per k (PBFT and the CD student), after one warm-up."""
    batch_size: int = 8
    pattern: str = "gpt-3"
    patterns_file: str | None = None
    pbft_mode: str = "full"
    cd_mode: str = "lora"
    student_dtype: Dtype = "bfloat16"
    """The CD student's dtype (the issue's setting: LoRA or BitFit in bf16)."""
    data: NLIDataConfig = field(default_factory=lambda: NLIDataConfig(hans_per_subset=1))
    output_dir: str = "out/nli/cost"


def main(cfg: NLICostConfig) -> dict[str, Any]:
    """Measure ICL, PBFT and CD memory and time for each context size."""

    device = pick_device()
    pool, sets = nli_data(cfg.data)
    queries = sets["in_domain"][:cfg.queries + 1]
    pattern = get_pattern(cfg.pattern, cfg.patterns_file)
    rows = {k: {"k": k} for k in cfg.ks}
    for key, model_id in (("icl", cfg.llm), ("cd_teacher", cfg.teacher)):
        _inference_costs(cfg, key, model_id, pattern, pool, queries, rows, device)
        gc.collect()  # the model just measured is gone before the next one loads
    for key, mode, dtype in (("pbft", cfg.pbft_mode, "float32"),
                             ("cd_student", cfg.cd_mode, cfg.student_dtype)):
        _training_costs(cfg, key, mode, dtype, pool, rows, device)
        gc.collect()
    result = write_results(cfg, {"device": device, "llm": cfg.llm, "teacher": cfg.teacher,
                                 "rows": [rows[k] for k in cfg.ks]}, "cost.json")
    out = Path(cfg.output_dir)
    (out / "cost.md").write_text(markdown(result))
    print(markdown(result))
    return result


def _timed(fn: Callable[[], Any], repeats: int, device: str) -> tuple[float, int]:
    """Median seconds and peak bytes of ``fn()`` over ``repeats`` calls, after a warm-up."""
    fn()
    runs = [measure(fn, device)[1:] for _ in range(repeats)]
    return statistics.median(s for s, _ in runs), max(p for _, p in runs)


def _inference_costs(cfg: NLICostConfig, key: str, model_id: str, pattern: Pattern,
                     pool: list[NLIExample], queries: list[NLIExample],
                     rows: dict[int, dict[str, Any]], device: str) -> None:
    """An LLM reading k demonstrations and one query (ICL; the CD teacher's cached pass)."""
    llm = PrefixLM.load(FrozenLLM(model_id), device)
    tok = llm.tokenizer
    for k in cfg.ks:
        demos = balanced_sample(pool, k, random.Random(k))
        context = tok(context_text(pattern, demos), add_special_tokens=False)["input_ids"]
        prefix, mask = llm.embed_context([context])
        prompts = iter(tok(["\n\n" + pattern.render(e) for e in queries * 2],
                           add_special_tokens=False)["input_ids"])
        seconds, peak = _timed(lambda p=prompts, x=prefix, m=mask: llm.next_token_logits(
            [next(p)], x, m), cfg.queries, device)
        rows[k][f"{key}_ms"], rows[k][f"{key}_peak_mib"] = seconds * 1e3, peak / 2**20


def _training_costs(cfg: NLICostConfig, key: str, mode: str, dtype: str,
                    pool: list[NLIExample], rows: dict[int, dict[str, Any]], device: str
                    ) -> None:
    """One training step: PBFT on the k examples, or the CD student (context never read)."""
    model = PatternLM.from_config(PatternModelConfig(cfg.llm, mode=mode, dtype=dtype,
                                                     pattern=cfg.pattern,
                                                     patterns_file=cfg.patterns_file),
                                  device=device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    for k in cfg.ks:
        examples = balanced_sample(pool, max(k, 2), random.Random(k))
        if key == "pbft":  # the k demonstrations are the training set
            objective = PatternObjective(model)
            batch = objective.collate(examples[:min(k, cfg.batch_size)])
        else:  # other training examples, whose teacher logits come from the cache
            part = balanced_sample(pool, cfg.batch_size, random.Random(-k))
            objective = DistillObjective(model, {e: torch.zeros(2) for e in part})
            batch = objective.collate(part)

        def step(objective: PatternObjective | DistillObjective = objective,
                 batch: dict[str, Any] = batch) -> None:
            objective.loss(model, batch)["loss"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        seconds, peak = _timed(step, cfg.train_steps, device)
        rows[k][f"{key}_step_ms"], rows[k][f"{key}_peak_mib"] = seconds * 1e3, peak / 2**20
        if key == "pbft":
            rows[k]["pbft_epoch_s"] = seconds * math.ceil(k / cfg.batch_size)


def markdown(result: dict[str, Any]) -> str:
    lines = [f"Peak memory (MiB) and time against context size, on {result['device']}: "
             f"ICL and PBFT with {result['llm']}, CD teacher {result['teacher']}, "
             f"CD student {result['llm']}.", "",
             "| k | ICL MiB | ICL ms/query | PBFT MiB | PBFT s/epoch | CD teacher MiB | "
             "CD teacher ms/example | CD student MiB | CD student ms/step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['k']} | {r['icl_peak_mib']:.0f} | {r['icl_ms']:.0f} | "
                     f"{r['pbft_peak_mib']:.0f} | {r['pbft_epoch_s']:.2f} | "
                     f"{r['cd_teacher_peak_mib']:.0f} | {r['cd_teacher_ms']:.0f} | "
                     f"{r['cd_student_peak_mib']:.0f} | {r['cd_student_step_ms']:.0f} |")
    return "\n".join(lines) + "\n"
