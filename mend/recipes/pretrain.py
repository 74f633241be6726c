"""Stage 1, meta-distillation pretraining: L_distill on windows of plain text.

    accelerate launch pretrain/run.py --config configs/pretrain/gpt2-large.yaml train.lr=5e-5
    mend pretrain --config configs/pretrain/smollm2-wikitext.yaml

The output directory becomes a checkpoint (``Distiller.from_pretrained(output_dir)``), with
``config.yaml``, ``metrics.jsonl``, ``loss.png`` and resumable ``checkpoints/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mend.config import checked, to_dict
from mend.core.config import MendConfig
from mend.counters import Counters
from mend.data import batches
from mend.data.pretrain import PretrainData, TextDataConfig
from mend.errors import ConfigError
from mend.evaluation.diagnostics import ContentConfig, content_monitor
from mend.methods.mend import MendObjective, ObjectiveConfig
from mend.recipes.run import Recipe, begin_distiller, run
from mend.training.config import Position, TrainConfig, TrainResult
from mend.training.loop import train


@dataclass(frozen=True)
@checked
class PretrainConfig:
    model: MendConfig
    data: TextDataConfig = field(default_factory=TextDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """Paper: L_distill only. Ablations: ``{distill: 0, clm: 1}``, ``{clm: 1, distill: gamma}``."""
    content: ContentConfig = field(default_factory=ContentConfig)
    """Held-out text whose content controls are logged every ``train.eval_every`` steps."""
    output_dir: str = "out/pretrain"
    init_from: str | None = None
    """A mend checkpoint to start from (its trainable weights), instead of fresh ones."""

    def __post_init__(self) -> None:
        if self.objective.distill_on != "input":
            raise ConfigError("objective.distill_on: answer needs examples with answers (stage "
                              "2); stage 1's text windows have none. Remove it here.")


def main(cfg: PretrainConfig) -> TrainResult:
    """Meta-distillation pretraining of a MEND distiller."""
    distiller = begin_distiller(cfg)
    counters = Counters()
    objective = MendObjective(distiller, cfg.objective, counters)

    def make_batches(start: Position, rank: int, world: int):
        split = cfg.data.split_by_node and max(world, start.world) > 1
        if split and start.world != world:
            raise ConfigError(
                f"This run's checkpoint was written by {start.world} process(es), each reading "
                f"its own share of the text (data.split_by_node), so its place in the data "
                f"exists only on {start.world}. Resume it with {start.world} processes "
                f"(accelerate launch --num_processes {start.world} ...). A run started with "
                f"data.split_by_node=false reads round-robin and can change its number of "
                f"processes when it resumes.")
        data = PretrainData(cfg.data, distiller.llm.tokenizer, distiller.llm.bos,
                            cfg.train.seed, counters, *((rank, world) if split else ()))
        examples = lambda epoch: map(data.split, data.windows(epoch))  # noqa: E731
        if split:  # this rank's own stream: its batches so far are one in every `world`
            return batches(examples, cfg.train.batch_size, objective.collate,
                           start=start.batches // world, counters=counters)
        return batches(examples, cfg.train.batch_size, objective.collate, start=start.batches,
                       rank=rank, world=world, counters=counters)

    return train(cfg.train, objective, make_batches, cfg.output_dir, counters=counters,
                 monitor=content_monitor(cfg.content, distiller, cfg.train.eval_every),
                 tracker_config=to_dict(cfg))


def cli(argv=None) -> int:
    return run(Recipe(PretrainConfig, main), argv, prog="mend pretrain")
