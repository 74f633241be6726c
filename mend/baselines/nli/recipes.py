"""The pattern-based NLI jobs (Mosbach et al., 2023 setting): ICL, PBFT and context
distillation, on binary MNLI (or RTE) in domain and HANS out of domain.

    mend nli icl --config configs/nli/icl.yaml                   # pattern-based ICL
    mend nli pbft --config configs/nli/pbft-lora.yaml            # pattern-based fine-tuning
    mend nli cd --config configs/nli/cd-lora.yaml                # context distillation
    mend nli eval --config configs/nli/eval.yaml checkpoint=...  # a trained PBFT or CD model
    mend nli cost --config configs/nli/cost.yaml                 # memory and time against k

Training runs are evaluated in domain and out of domain every epoch. The output directory
holds the last model, ``best_in_domain/`` and ``best_ood/`` the selected ones, and
``results.json`` all three selections' scores.
"""

from __future__ import annotations

import gc
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from mend.baselines.nli import cost
from mend.baselines.nli.context_distillation import (
    DEFAULT_INSTRUCTION,
    DistillObjective,
    TeacherCache,
    teacher_logits,
)
from mend.baselines.nli.data import NLIDataConfig, NLIExample, balanced_sample, nli_data
from mend.baselines.nli.evaluation import evaluate_icl, evaluate_model
from mend.baselines.nli.model import PatternLM, PatternModelConfig, PatternObjective
from mend.baselines.nli.patterns import get_pattern
from mend.config import checked, to_dict
from mend.core.backbones import pick_device
from mend.core.config import Dtype, FrozenLLM
from mend.core.prefix_lm import PrefixLM
from mend.errors import ConfigError
from mend.evaluation.efficiency import PeakMemory
from mend.recipes.run import Recipe, run_verb, write_config, write_results
from mend.training.config import TrainConfig, TrainResult, by_epochs
from mend.training.loop import train

# --------------------------------------------------------------------------------------------
# Pattern-based ICL (evaluation only)


@dataclass(frozen=True)
@checked
class PatternICLConfig:
    llm: str
    llm_dtype: Dtype = "float32"
    pattern: str = "gpt-3"
    patterns_file: str | None = None
    ks: tuple[int, ...] = (2, 16, 32)
    seeds: tuple[int, ...] = tuple(range(10))
    """Data seeds: each draws its own balanced demonstrations."""
    sep: str = "\n\n"
    max_length: int = 2048
    data: NLIDataConfig = field(default_factory=NLIDataConfig)
    batch_size: int = 32
    output_dir: str = "out/nli/icl"


def main_icl(cfg: PatternICLConfig) -> dict[str, Any]:
    """Pattern-based ICL over k and data seeds, in domain and on HANS."""
    pool, sets = nli_data(cfg.data)
    llm = PrefixLM.load(FrozenLLM(cfg.llm, cfg.llm_dtype), pick_device())
    pattern = get_pattern(cfg.pattern, cfg.patterns_file)
    runs = {}
    for k, seed in tqdm([(k, s) for k in cfg.ks for s in cfg.seeds], desc="pattern ICL"):
        runs[f"k={k}/seed={seed}"] = evaluate_icl(llm, pattern, pool, sets, k, seed, cfg.sep,
                                                  cfg.max_length, cfg.batch_size)
    table = {f"k={k}": _over_seeds([runs[f"k={k}/seed={s}"] for s in cfg.seeds])
             for k in cfg.ks}
    return _write(cfg, {"method": "pattern_icl", "llm": cfg.llm, "pattern": cfg.pattern,
                        "table": table, "runs": runs})


def _over_seeds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for key in ("in_domain", "ood", "ood_lexical_overlap", "ood_subsequence", "ood_constituent"):
        values = [r[key] for r in runs if key in r]
        if values:
            out[key] = {"mean": float(np.mean(values)), "std": float(np.std(values))}
    out["dropped"] = int(sum(s.get("dropped", 0) for r in runs for s in r["sets"].values()))
    fractions = [r["sets"]["in_domain"]["non_label_fraction"] for r in runs
                 if "non_label_fraction" in r["sets"]["in_domain"]]
    if fractions:  # absent when every query overflowed the context
        out["non_label_fraction"] = float(np.mean(fractions))
    return out


# --------------------------------------------------------------------------------------------
# Pattern-based fine-tuning and context distillation


@dataclass(frozen=True)
@checked
class PBFTConfig:
    model: PatternModelConfig
    n: int = 16
    """Training examples, label-balanced, drawn with ``data_seed``."""
    data_seed: int = 0
    epochs: int = 40
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        lr=1e-5, lr_schedule="constant_with_warmup", warmup_ratio=0.5, batch_size=8,
        log_every=1))
    """``max_steps`` and ``eval_every`` are set from ``epochs`` (one evaluation per epoch)."""
    data: NLIDataConfig = field(default_factory=NLIDataConfig)
    eval_batch_size: int = 32
    output_dir: str = "out/nli/pbft"


@dataclass(frozen=True)
@checked
class CDConfig:
    student: PatternModelConfig
    teacher: str
    teacher_dtype: Dtype = "float32"
    teacher_pattern: str | None = None
    """The teacher's pattern (default: the student's)."""
    instruction: str = DEFAULT_INSTRUCTION
    k: int = 16
    """Demonstrations in the teacher's context, label-balanced."""
    n: int = 64
    """Training examples the student sees without context."""
    alpha: float = 0.5
    temperature: float = 1.0
    cache: str = "out/cache/teacher_logits.sqlite"
    sep: str = "\n\n"
    data_seed: int = 0
    epochs: int = 10
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        lr=1e-4, lr_schedule="constant_with_warmup", warmup_ratio=0.1, batch_size=8,
        mixed_precision="bf16", log_every=1))
    data: NLIDataConfig = field(default_factory=NLIDataConfig)
    eval_batch_size: int = 32
    output_dir: str = "out/nli/cd"

    def __post_init__(self) -> None:
        if self.student.mode == "full":
            raise ConfigError("The context-distillation student trains with LoRA or BitFit; "
                              "set student.mode to lora or bitfit.")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}.")


def main_pbft(cfg: PBFTConfig) -> TrainResult:
    """Pattern-based fine-tuning (full, LoRA or BitFit) on n balanced examples."""
    set_seed(cfg.train.seed)
    write_config(cfg, cfg.output_dir)
    pool, sets = nli_data(cfg.data)
    examples = balanced_sample(pool, cfg.n, random.Random(cfg.data_seed))
    model = PatternLM.from_config(cfg.model, device=pick_device())
    return _fit(cfg, "pbft", PatternObjective(model), examples, sets, {})


def main_cd(cfg: CDConfig) -> TrainResult:
    """Context distillation: a teacher with k demonstrations, a student without them."""
    set_seed(cfg.train.seed)
    write_config(cfg, cfg.output_dir)
    pool, sets = nli_data(cfg.data)
    rng = random.Random(cfg.data_seed)
    demos = balanced_sample(pool, cfg.k, rng)
    examples = balanced_sample([e for e in pool if e not in set(demos)], cfg.n, rng)
    device = pick_device()
    teacher = PrefixLM.load(FrozenLLM(cfg.teacher, cfg.teacher_dtype), device)
    pattern = get_pattern(cfg.teacher_pattern or cfg.student.pattern,
                          cfg.student.patterns_file)
    cache = TeacherCache(cfg.cache)
    began = time.perf_counter()
    with PeakMemory(device) as memory:
        logits = teacher_logits(teacher, cfg.teacher, pattern, cfg.instruction, demos,
                                examples, cache, cfg.sep, cfg.eval_batch_size)
    teacher_info = {"seconds": time.perf_counter() - began, "peak_bytes": memory.peak,
                    "cache_hits": cache.hits, "cache_misses": cache.misses, "k": len(demos)}
    cache.close()
    del teacher
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    student = PatternLM.from_config(cfg.student, device=device)
    objective = DistillObjective(student, dict(zip(examples, logits)), cfg.alpha,
                                 cfg.temperature)
    return _fit(cfg, "context_distillation", objective, examples, sets, {"teacher": teacher_info})


def _fit(cfg, method: str, objective, examples: list[NLIExample], sets, extra: dict
         ) -> TrainResult:
    train_cfg, make_batches = by_epochs(cfg.train, examples, cfg.epochs, objective.collate,
                                        objective.counters)

    def evaluate(model) -> dict[str, Any]:
        report = evaluate_model(model, sets, cfg.eval_batch_size)
        return {"score": report["in_domain"], **report}

    result = train(train_cfg, objective, make_batches, cfg.output_dir, evaluate=evaluate,
                   keep_best={"best_in_domain": "in_domain", "best_ood": "ood"},
                   counters=objective.counters, tracker_config=to_dict(cfg))
    _write(cfg, {"method": method, "selections": _selections(cfg.output_dir),
                 "train_examples": len(examples), "steps": result.step, **extra})
    return result


def _selections(output_dir: str) -> dict[str, Any]:
    """In-domain and OOD scores of the last, best-in-domain and best-OOD models, read from
    the per-epoch evaluations in metrics.jsonl."""
    rows = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text()
            .splitlines() if '"eval_score"' in line]
    if not rows:
        return {}
    pick = {"last": rows[-1], "best_in_domain": max(rows, key=lambda r: r["eval_in_domain"]),
            "best_ood": max(rows, key=lambda r: r["eval_ood"])}
    return {name: {"step": r["step"], "in_domain": r["eval_in_domain"], "ood": r["eval_ood"],
                   **{k[5:]: v for k, v in r.items() if k.startswith("eval_ood_")}}
            for name, r in pick.items()}


# --------------------------------------------------------------------------------------------
# Evaluating a trained PBFT or CD model


@dataclass(frozen=True)
@checked
class PatternEvalConfig:
    checkpoint: str
    data: NLIDataConfig = field(default_factory=NLIDataConfig)
    batch_size: int = 32
    output_dir: str = "out/nli/eval"


def main_pattern_eval(cfg: PatternEvalConfig) -> dict[str, Any]:
    """A trained pattern model (PBFT or CD) in domain and on HANS."""
    _, sets = nli_data(cfg.data)
    model = PatternLM.from_pretrained(cfg.checkpoint, device=pick_device())
    return _write(cfg, {"method": "pattern_lm", "checkpoint": cfg.checkpoint,
                        **evaluate_model(model, sets, cfg.batch_size)})


def _write(cfg, result: dict[str, Any]) -> dict[str, Any]:
    return write_results(cfg, result, echo=("table", "selections", "in_domain", "ood",
                                            "teacher"))


VERBS = {"icl": Recipe(PatternICLConfig, main_icl), "pbft": Recipe(PBFTConfig, main_pbft),
         "cd": Recipe(CDConfig, main_cd), "eval": Recipe(PatternEvalConfig, main_pattern_eval),
         "cost": Recipe(cost.NLICostConfig, cost.main)}


def cli(argv=None) -> int:
    """``mend nli {icl,pbft,cd,eval,cost} --config FILE [key=value ...]``."""
    return run_verb(VERBS, argv, "mend nli")
