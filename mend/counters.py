"""Running counts of what a pipeline cut, dropped or skipped: a tally for the logs, kept by the
data streams, the distiller's tokenizer and the harness alike."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass
class Counters:
    """Running counts of what the data pipeline cut, dropped or skipped, for the logs."""

    counts: dict[str, int] = field(default_factory=dict)
    paused: bool = False
    """Set by :func:`batches` while it skips batches that are not this process's to train."""

    def add(self, key: str, n: int = 1) -> None:
        if n and not self.paused:
            self.counts[key] = self.counts.get(key, 0) + n


def sum_counts(counts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """Several counters' counts added key by key (ranks, tasks), sorted by name."""
    total = Counters()
    for part in counts:
        for key, value in part.items():
            total.add(key, value)
    return dict(sorted(total.counts.items()))
