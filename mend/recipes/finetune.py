"""Stage 2, meta-distillation finetuning on a MetaICL partition: L_pred + lambda * L_distill.

    accelerate launch finetune/run.py --config configs/finetune/class_to_class/gpt2-large.yaml \
        init_from=out/pretrain/gpt2-large
    mend finetune --config configs/finetune/class_to_class/smollm2.yaml

Every ``train.eval_every`` steps the distiller is scored on the dev files of the partition's
meta-test tasks (macro-F1 for classification tasks, accuracy for the others, averaged over
tasks); the best is saved as the output directory's checkpoint, and ``train.patience``
evaluations without improvement stop the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from accelerate.utils import set_seed

from mend.config import checked, replace, to_dict
from mend.core.config import MendConfig
from mend.counters import Counters
from mend.data import batches
from mend.data.metaicl import (
    DEMO_PARTITION,
    ContextBuilder,
    ContextConfig,
    FinetuneData,
    MetaICLConfig,
    Task,
    load_partitions,
)
from mend.errors import ConfigError
from mend.evaluation.diagnostics import ContentConfig, content_monitor
from mend.evaluation.harness import DemoConfig, aggregate, content_gap, evaluate_tasks, mean_score
from mend.methods import get_method
from mend.methods.mend import Mend, MendObjective, ObjectiveConfig
from mend.methods.prompt_tuning import PromptTuning, PromptTuningConfig, PromptTuningObjective
from mend.recipes.run import Recipe, begin_distiller, run, write_config
from mend.training.config import Position, TrainConfig, TrainResult
from mend.training.engine import load_device
from mend.training.loop import train


@dataclass(frozen=True)
@checked
class SelectionConfig:
    split: str = "dev"
    """Which files of the meta-test tasks select the model (their ``dev`` files)."""
    seeds: tuple[int, ...] = (100,)
    """Seeds whose train files give the demonstrations and whose dev files are scored, with
    the run's own ``context`` (its k and truncation)."""
    mode: Literal["fixed", "resample"] = "fixed"
    """``fixed``: the first k rows of the seed's train file; ``resample``: k drawn per query."""
    partition: str | None = None
    """Select on this partition's meta-test tasks instead of those of ``data.partition``
    (a mixture of many partitions would otherwise score every one of them)."""
    swap_control: bool = True
    """Also score every selection with another task's demonstrations and log the content gap
    (own minus swapped), so a distiller that stops reading its demonstrations shows."""
    batch_size: int = 32

    @property
    def demos(self) -> DemoConfig:
        return DemoConfig(mode=self.mode, pool="seed")


@dataclass(frozen=True)
@checked
class FinetuneConfig:
    model: MendConfig
    method: Literal["mend"] = "mend"
    data: MetaICLConfig = field(default_factory=MetaICLConfig)
    context: ContextConfig = field(default_factory=ContextConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    objective: ObjectiveConfig = field(
        default_factory=lambda: ObjectiveConfig(pred=1.0, distill=1.0))
    """Paper: ``pred: 1, distill: 1`` (lambda = 1). Ablations: ``pred: 0`` or ``distill: 0``."""
    select: SelectionConfig = field(default_factory=SelectionConfig)
    content: ContentConfig = field(default_factory=ContentConfig)
    """Held-out text whose content controls are logged every ``train.eval_every`` steps."""
    output_dir: str = "out/finetune"
    init_from: str | None = None
    """A stage-1 checkpoint to start from; None trains from scratch."""


@dataclass(frozen=True)
@checked
class PromptTuningFinetuneConfig:
    model: PromptTuningConfig
    method: Literal["prompt_tuning"] = "prompt_tuning"
    data: MetaICLConfig = field(default_factory=MetaICLConfig)
    context: ContextConfig = field(default_factory=lambda: ContextConfig(k=1))
    """Prompt tuning reads no demonstrations; k only shapes the examples' unused contexts."""
    train: TrainConfig = field(default_factory=TrainConfig)
    select: SelectionConfig = field(default_factory=SelectionConfig)
    output_dir: str = "out/finetune/prompt_tuning"


def main(cfg: FinetuneConfig) -> TrainResult:
    """Meta-distillation finetuning of a MEND distiller on MetaICL tasks."""
    distiller = begin_distiller(cfg)
    counters = Counters()
    return _finetune(cfg, MendObjective(distiller, cfg.objective, counters), counters,
                     lambda module: Mend(module),
                     content_monitor(cfg.content, distiller, cfg.train.eval_every))


def main_prompt_tuning(cfg: PromptTuningFinetuneConfig) -> TrainResult:
    """Prompt tuning on the meta-train tasks of a MetaICL partition."""
    set_seed(cfg.train.seed)
    write_config(cfg, cfg.output_dir)
    prompt = PromptTuning.from_config(cfg.model, device=load_device(cfg.model.llm_8bit))
    counters = Counters()
    return _finetune(cfg, PromptTuningObjective(prompt, counters), counters, lambda m: m)


def _finetune(cfg, objective, counters: Counters, as_method, monitor=None) -> TrainResult:
    """The part both methods share: MetaICL examples, dev-set selection, the loop."""
    train_tasks, test_tasks = tasks(cfg.data, cfg.select)
    module = objective.module
    data = FinetuneData(cfg.data, train_tasks, ContextBuilder.for_method(module, cfg.context,
                                                                         counters),
                        cfg.train.seed)

    def examples(epoch: int):
        return (e for e in map(data.example, data.keys(epoch)) if e is not None)

    def make_batches(start: Position, rank: int, world: int):
        return batches(examples, cfg.train.batch_size, objective.collate, start=start.batches,
                       rank=rank, world=world, counters=counters)

    builder = ContextBuilder.for_method(module, cfg.context)  # selection's counts kept apart

    def evaluate(unwrapped) -> dict[str, float]:
        method = as_method(unwrapped)
        own = _select_scores(method, test_tasks, cfg.select, cfg.select.demos, builder)
        metrics = {"score": mean_score(own), "tasks": len({r.task for r in own})}
        if cfg.select.swap_control and method.reads_demos and metrics["tasks"] > 1:
            swapped = _select_scores(method, test_tasks, cfg.select,
                                     replace(cfg.select.demos, source="other_task"), builder)
            metrics["swapped_score"] = mean_score(swapped)
            metrics["content_gap"] = content_gap(aggregate(own), aggregate(swapped))["mean"]
        return metrics

    return train(cfg.train, objective, make_batches, cfg.output_dir, counters=counters,
                 evaluate=evaluate if test_tasks else None, monitor=monitor,
                 tracker_config=to_dict(cfg))


def tasks(data: MetaICLConfig, select: SelectionConfig) -> tuple[list[Task], list[Task]]:
    """The meta-train tasks (the union of ``data``'s partitions; ``data.holdout`` is applied
    to their rows later) and the tasks whose dev files select the model: ``select.partition``'s
    meta-test tasks, or those of ``data``'s partitions but the built-in demo's, whose dev
    files are its test rows."""
    train, test = load_partitions(data.root, data.partitions)
    if not train:
        raise ConfigError(f"Partition {data.partition} has no meta-train task under "
                          f"{data.root}.")
    if select.partition:
        return train, load_partitions(data.root, [select.partition])[1]
    if DEMO_PARTITION in data.partitions and len(data.partitions) > 1:
        demo_tests = {t.name for t in load_partitions(data.root, [DEMO_PARTITION])[1]}
        test = [t for t in test if t.name not in demo_tests]
    return train, test


def _select_scores(method, tasks, select: SelectionConfig, demos: DemoConfig, builder):
    return evaluate_tasks(method, tasks, select.seeds, select.split, builder, demos,
                          batch_size=select.batch_size)[0]


RECIPES = {"mend": Recipe(FinetuneConfig, main),
           "prompt_tuning": Recipe(PromptTuningFinetuneConfig, main_prompt_tuning)}
"""The methods ``mend finetune`` trains, by name (hypertuning is mend with its objective)."""


def recipe_for(data: dict) -> Recipe:
    """Stage 2 of MEND and its ablations, or of prompt tuning: the recipe of the config's
    ``method`` (mend by default)."""
    name = str(data.get("method", "mend"))
    get_method(name)  # an unknown name is refused with the registry's list
    if name not in RECIPES:
        raise ConfigError(f"method={name} is not trained by mend finetune; it trains "
                          f"{', '.join(RECIPES)}.")
    return RECIPES[name]


def cli(argv=None) -> int:
    return run(recipe_for, argv, prog="mend finetune")
