"""Distilling step-by-step and its baselines, on CommonsenseQA, SVAMP or e-SNLI.

    mend sbs train --config configs/step_by_step/cqa-smollm2.yaml            # step-by-step
    mend sbs train --config configs/step_by_step/cqa-smollm2-finetune.yaml   # gold labels only
    mend sbs train --config configs/step_by_step/cqa-smollm2-distill.yaml    # teacher labels only
    mend sbs eval --config configs/step_by_step/eval.yaml checkpoint=out/step_by_step/...

``rationale_weight`` (lambda) 0 with ``label_source: gold`` is standard fine-tuning; with
``label_source: teacher`` it is standard distillation. ``data.fraction`` trains on a seeded
fraction of the training set, for data-size sweeps. Rationales come from the data files
(``rationale_source: file``), or from a teacher LLM prompted with a few-shot chain of thought
(``teacher``), parsed as :mod:`mend.baselines.step_by_step.data` documents, with malformed outputs
counted and skipped.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Literal

from accelerate.utils import set_seed

from mend.baselines.step_by_step.data import (
    RationaleDataConfig,
    RationaleExample,
    is_correct,
    load,
    teacher_rationales,
)
from mend.baselines.step_by_step.student import StepByStepObjective, Student, StudentConfig
from mend.config import checked, to_dict
from mend.core.backbones import pick_device
from mend.counters import Counters
from mend.errors import ConfigError
from mend.recipes.run import Recipe, run_verb, write_config, write_results
from mend.training.config import TrainConfig, TrainResult, by_epochs
from mend.training.loop import train


@dataclass(frozen=True)
@checked
class StepByStepConfig:
    student: StudentConfig
    data: RationaleDataConfig = field(default_factory=RationaleDataConfig)
    label_source: Literal["gold", "teacher"] = "gold"
    rationale_weight: float = 1.0
    """lambda: 0 gives the standard fine-tuning or distillation baseline."""
    epochs: int = 3
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        lr=5e-5, batch_size=8, log_every=10, lr_schedule="linear", warmup_ratio=0.05))
    """``max_steps`` and ``eval_every`` (once per epoch) are set from ``epochs``."""
    eval_batch_size: int = 16
    output_dir: str = "out/step_by_step"


def main(cfg: StepByStepConfig) -> TrainResult:
    """Train a student on labels (and rationales); keep the best by test accuracy."""
    set_seed(cfg.train.seed)
    write_config(cfg, cfg.output_dir)
    counters = Counters()
    examples = load(cfg.data.dataset, "train", cfg.data.root, counters)
    examples = _fraction(examples, cfg.data.fraction, cfg.data.seed)
    test = load(cfg.data.dataset, "test", cfg.data.root)[:cfg.data.eval_limit]
    device = pick_device()
    if cfg.data.rationale_source == "teacher" and (cfg.rationale_weight or
                                                   cfg.label_source == "teacher"):
        examples = teacher_rationales(cfg.data, examples, counters, device)
    kept = [e for e in examples if (not cfg.rationale_weight or e.rationale)
            and (cfg.label_source == "gold" or e.teacher_label)]
    counters.add("examples_skipped_without_rationale_or_label", len(examples) - len(kept))
    if not kept:
        raise ConfigError("No training example has the rationale or label this run needs.")
    student = Student.from_config(cfg.student, device=device)
    student.counters = counters
    objective = StepByStepObjective(student, cfg.rationale_weight, cfg.label_source)
    train_cfg, make_batches = by_epochs(cfg.train, kept, cfg.epochs, objective.collate,
                                        counters)

    def evaluate(model) -> dict[str, float]:
        return {"score": accuracy(model, test, cfg.data.dataset, cfg.eval_batch_size)}

    result = train(train_cfg, objective, make_batches, cfg.output_dir, counters=counters,
                   evaluate=evaluate, tracker_config=to_dict(cfg))
    _write(cfg, {"method": "step_by_step", "dataset": cfg.data.dataset,
                 "label_source": cfg.label_source, "rationale_weight": cfg.rationale_weight,
                 "train_examples": len(kept), "fraction": cfg.data.fraction,
                 "test_examples": len(test), "best_accuracy": result.best_score,
                 "best_step": result.best_step, "steps": result.step,
                 "counts": dict(counters.counts)})
    return result


def accuracy(model: Student, test: list[RationaleExample], dataset: str, batch_size: int
             ) -> float:
    predictions = model.predict(test, batch_size=batch_size)
    return sum(is_correct(p, e.label, dataset) for p, e in zip(predictions, test)) / len(test)


def _fraction(examples: list, fraction: float, seed: int) -> list:
    if fraction >= 1.0:
        return examples
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in sorted(order[:max(1, round(fraction * len(examples)))])]


@dataclass(frozen=True)
@checked
class StepByStepEvalConfig:
    checkpoint: str
    data: RationaleDataConfig = field(default_factory=RationaleDataConfig)
    batch_size: int = 16
    output_dir: str = "out/step_by_step/eval"


def main_eval(cfg: StepByStepEvalConfig) -> dict[str, Any]:
    """Accuracy of a trained step-by-step (or baseline) student on the test split."""

    test = load(cfg.data.dataset, "test", cfg.data.root)[:cfg.data.eval_limit]
    model = Student.from_pretrained(cfg.checkpoint, device=pick_device())
    acc = accuracy(model, test, cfg.data.dataset, cfg.batch_size)
    return _write(cfg, {"method": "step_by_step", "checkpoint": cfg.checkpoint,
                        "dataset": cfg.data.dataset, "accuracy": acc,
                        "test_examples": len(test)})


def _write(cfg, result: dict[str, Any]) -> dict[str, Any]:
    return write_results(cfg, result, echo=[k for k in result if k != "counts"])


VERBS = {"train": Recipe(StepByStepConfig, main), "eval": Recipe(StepByStepEvalConfig, main_eval)}


def cli(argv=None) -> int:
    """``mend sbs {train,eval} --config FILE [key=value ...]``."""
    return run_verb(VERBS, argv, "mend sbs")
