"""Training data: examples, and deterministic, resumable streams of batches.

Both training stages produce :class:`Example` objects; a method's collator turns a list of
them into tensors. :func:`batches` makes the stream resumable: the order of examples is a pure
function of the seed and the epoch, so the position in the data is one number, the count of
global batches consumed, and a restarted run replays exactly the batches it would have seen.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from mend.core.text import Demos
from mend.counters import Counters
from mend.errors import ConfigError

T = TypeVar("T")


@dataclass
class Example:
    """One training example, in the LLM's tokens except for the demonstrations' text.

    - ``demos``: what the distiller reads, as text (it tokenizes it itself).
    - ``context``: the same demonstrations in LLM token ids, as the teacher reads them.
    - ``input``: the LLM ids that both teacher and student read after their context.
    - ``targets_from``: input tokens from this index on are outputs (counted by ``L_pred``).
    """

    demos: Demos
    context: list[int]
    input: list[int]
    targets_from: int


def batches(epoch_items: Callable[[int], Iterable[T]], batch_size: int,
            build: Callable[[list[T]], Any], *, start: int = 0, rank: int = 0,
            world: int = 1, counters: Counters | None = None) -> Iterator[Any]:
    """This rank's batches, epoch after epoch, forever.

    Args:
        epoch_items: ``epoch -> items`` in that epoch's order; must be deterministic.
        batch_size: items per batch (per rank).
        build: turns a list of items into a batch; only called for batches this rank yields,
            so skipping ahead costs no model-side work.
        start: global batches to skip (the position saved in a checkpoint).
        rank, world: global batch ``g`` goes to rank ``g % world``.
        counters: paused while items of skipped or other ranks' batches are drawn, so each
            item is counted once, by the process that trains on it.
    """
    g = 0
    for epoch in itertools.count():
        empty = True
        items = iter(epoch_items(epoch))
        while True:
            mine = g >= start and g % world == rank
            if counters is not None:
                counters.paused = not mine
            chunk = list(itertools.islice(items, batch_size))
            if not chunk:
                break
            empty = False
            if mine:
                if counters is not None:
                    counters.paused = False
                yield build(chunk)
            g += 1
        if empty:
            raise ConfigError(
                "The training data is empty: no example came out of an epoch. Check the data "
                "path and its filters (stage 1: documents shorter than data.min_length give no "
                "window; with data.split_by_node each process reads only its share, so there "
                "must be at least as many documents as processes).")


def shuffled(items: Iterable[T], seed: int | str, buffer: int) -> Iterator[T]:
    """Shuffle a stream through a seeded buffer (a full shuffle when it fits the buffer)."""
    rng, pool = random.Random(seed), []
    for item in items:
        if len(pool) < buffer:
            pool.append(item)
            continue
        i = rng.randrange(buffer)
        yield pool[i]
        pool[i] = item
    rng.shuffle(pool)
    yield from pool
