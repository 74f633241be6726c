"""Distilling step-by-step and its baselines, on CommonsenseQA, SVAMP or e-SNLI.

    mend finetune --config configs/step_by_step/cqa-smollm2.yaml              # step-by-step
    mend finetune --config configs/step_by_step/cqa-smollm2-finetune.yaml     # gold labels only
    mend finetune --config configs/step_by_step/cqa-smollm2-distill.yaml      # teacher labels only
    mend eval --config configs/step_by_step/eval.yaml checkpoint=out/sbs/...

``rationale_weight`` (lambda) 0 with ``label_source: gold`` is standard fine-tuning; with
``label_source: teacher`` it is standard distillation. ``data.fraction`` trains on a seeded
fraction of the training set, for data-size sweeps. Rationales come from the data files
(``rationale_source: file``), or from a teacher LLM prompted with a few-shot chain of thought
(``teacher``), parsed as :mod:`mend.baselines.step_by_step.data` documents, with malformed outputs
counted and skipped.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Literal

from mend.config import replace, to_dict
from mend.data import Counters, batches
from mend.errors import ConfigError
from mend.baselines.step_by_step.student import Student, StepByStepObjective, StudentConfig
from mend.baselines.step_by_step.data import PHRASES, RationaleExample, is_correct, load, parse_cot
from mend.recipes import write_config, write_results
from mend.training.loop import TrainConfig, TrainResult, train


@dataclass(frozen=True)
class RationaleDataConfig:
    dataset: Literal["cqa", "svamp", "esnli"] = "cqa"
    root: str = "../shared/data"
    fraction: float = 1.0
    """Train on this fraction of the training set (a seeded subset)."""
    eval_limit: int | None = 500
    """Test examples scored (None: all)."""
    rationale_source: Literal["file", "teacher"] = "file"
    teacher: str | None = None
    """The LLM that writes rationales when ``rationale_source: teacher``."""
    teacher_shots: int = 4
    teacher_max_new_tokens: int = 96
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"data.fraction must be in (0, 1], got {self.fraction}.")
        if self.rationale_source == "teacher" and not self.teacher:
            raise ConfigError("data.rationale_source=teacher needs data.teacher (a model).")


@dataclass(frozen=True)
class StepByStepConfig:
    student: StudentConfig
    method: Literal["step_by_step"] = "step_by_step"
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
    from accelerate import PartialState
    from accelerate.utils import set_seed

    set_seed(cfg.train.seed)
    write_config(cfg, cfg.output_dir)
    counters = Counters()
    examples = load(cfg.data.dataset, "train", cfg.data.root, counters)
    examples = _fraction(examples, cfg.data.fraction, cfg.data.seed)
    test = load(cfg.data.dataset, "test", cfg.data.root)[:cfg.data.eval_limit]
    device = PartialState().device
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
    steps = math.ceil(len(kept) / cfg.train.batch_size)
    train_cfg = replace(cfg.train, max_steps=cfg.epochs * steps, eval_every=steps,
                        save_every=steps, patience=cfg.epochs + 1)

    def epoch_items(epoch: int) -> list[RationaleExample]:
        order = list(kept)
        random.Random(f"{cfg.train.seed}-{epoch}").shuffle(order)
        return order

    def make_batches(start: int, rank: int, world: int):
        return batches(epoch_items, train_cfg.batch_size, objective.collate, start=start,
                       rank=rank, world=world, counters=counters)

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


def teacher_rationales(data: RationaleDataConfig, examples: list[RationaleExample],
                       counters: Counters, device) -> list[RationaleExample]:
    """Rationales and labels written by a teacher LLM from a few-shot chain-of-thought prompt
    (its shots: the first training examples that have file rationales)."""
    from tqdm.auto import tqdm

    from mend.core.backbones import load_model, load_tokenizer
    from mend.core.prefix_lm import PrefixLM

    phrase = PHRASES[data.dataset]
    shots = [e for e in examples if e.rationale and e.teacher_label][:data.teacher_shots]
    prompt = "".join(f"Q: {e.input}\nA: {e.rationale} {phrase} {e.teacher_label}.\n\n"
                     for e in shots)
    teacher = PrefixLM(load_model(data.teacher, device=device), load_tokenizer(data.teacher))
    tok = teacher.tokenizer
    out = []
    for i in tqdm(range(0, len(examples), 8), desc="teacher rationales"):
        part = examples[i:i + 8]
        ids = tok([prompt + f"Q: {e.input}\nA:" for e in part],
                  add_special_tokens=False)["input_ids"]
        texts = tok.batch_decode(teacher.generate(ids, max_new_tokens=data.teacher_max_new_tokens),
                                 skip_special_tokens=True)
        for e, text in zip(part, texts):
            parsed = parse_cot(text, data.dataset)
            if parsed is None:
                counters.add("malformed_teacher_outputs")
            out.append(RationaleExample(e.input, e.label, *(parsed or (None, None))))
    return out


@dataclass(frozen=True)
class StepByStepEvalConfig:
    checkpoint: str
    method: Literal["step_by_step"] = "step_by_step"
    data: RationaleDataConfig = field(default_factory=RationaleDataConfig)
    batch_size: int = 16
    output_dir: str = "out/step_by_step/eval"


def main_eval(cfg: StepByStepEvalConfig) -> dict[str, Any]:
    """Accuracy of a trained step-by-step (or baseline) student on the test split."""
    from accelerate import PartialState

    test = load(cfg.data.dataset, "test", cfg.data.root)[:cfg.data.eval_limit]
    model = Student.from_pretrained(cfg.checkpoint, device=PartialState().device)
    acc = accuracy(model, test, cfg.data.dataset, cfg.batch_size)
    return _write(cfg, {"method": "step_by_step", "checkpoint": cfg.checkpoint,
                        "dataset": cfg.data.dataset, "accuracy": acc,
                        "test_examples": len(test)})


def _write(cfg, result: dict[str, Any]) -> dict[str, Any]:
    write_results(cfg, result)
    print({k: v for k, v in result.items() if k != "provenance"})
    return result
