"""MetaICL tasks and partitions, k-shot sampling, and the context truncation rules.

Layout (as in ``../shared/data/metaicl``)::

    <root>/config/<partition>.json       {"train": [task, ...], "test": [task, ...]}
    <root>/config/tasks/<task>.json      {"task_type": ..., "options": [...] or null}
    <root>/<task>/<task>_16_<seed>_{train,dev}.jsonl
    <root>/<task>/<task>_test.jsonl[.gz]

Each line: ``{"task", "input", "output", "options"}``. A task named in a partition but absent
from ``root`` is skipped with one warning naming it.

**Truncation rules** (both counted by the caller's :class:`~mend.counters.Counters`):

1. *Per input:* each demonstration input, and each query input, keeps its first
   ``max_input_tokens`` LLM tokens (it is cut from the end). Outputs are never cut.
2. *Context budget:* demonstrations are kept whole, in order, while the context fits in
   ``max_context_tokens`` (lowered, where needed, so that bos + context + query + output fits
   the LLM's positions); the first one that does not fit and all later ones are dropped.
"""

from __future__ import annotations

import gzip
import json
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mend.config import checked
from mend.core.text import Demo, DemoFormat, encode, fit
from mend.core.zoo import cache_root
from mend.counters import Counters
from mend.data import Example
from mend.data.demo import materialize
from mend.errors import ConfigError, InputError

SEEDS = (100, 13, 21, 42, 87)
DEMO_PARTITION = "demo"
"""The built-in demo tasks' partition (:mod:`mend.data.demo`), usable in any partition list."""


@dataclass(frozen=True)
@checked
class ContextConfig:
    """How many demonstrations a context holds and how much of them is read: one section,
    ``context:``, of every config that builds contexts (stage 2 and its model selection,
    evaluation, efficiency, the demo)."""

    k: int = 16
    """Demonstrations per context (a training example's are drawn from its own task)."""
    max_input_tokens: int = 256
    """Rule 1: each demonstration input and each query keeps its first this many tokens."""
    max_context_tokens: int = 900
    """Rule 2: whole demonstrations are dropped beyond this many tokens."""

    k_min: int | None = None
    """Training only: each example draws its number of demonstrations uniformly from
    ``k_min..k`` (None: always ``k``), so that a fixed K at test time is in distribution."""

    def __post_init__(self) -> None:
        if self.k < 0 or self.max_input_tokens < 1 or self.max_context_tokens < 1:
            raise ConfigError(f"context.k must be >= 0 and context.max_input_tokens and "
                              f"context.max_context_tokens positive, got {self}.")
        if self.k_min is not None and not 1 <= self.k_min <= self.k:
            raise ConfigError(f"context.k_min must be between 1 and context.k ({self.k}), got "
                              f"{self.k_min}.")


@dataclass(frozen=True)
@checked
class MetaICLConfig:
    root: str = "../shared/data/metaicl"
    partition: str | tuple[str, ...] = "class_to_class"
    """A partition, or several: training then reads the union of their meta-train tasks, and
    selection their meta-test tasks. ``demo`` names mend's built-in demo tasks."""
    holdout: tuple[str, ...] = ()
    """Partitions whose meta-test tasks are never trained on: those tasks are left out of the
    union, and so is every training row whose input is one of theirs (any split or seed).
    List every partition you evaluate (``demo`` included) to keep all of them unseen."""
    max_examples_per_task: int | None = None
    """Cap on each meta-train task's pool (None: all of it)."""

    @property
    def partitions(self) -> tuple[str, ...]:
        return (self.partition,) if isinstance(self.partition, str) else tuple(self.partition)


@dataclass
class Task:
    name: str
    type: str
    """``classification``, ``multi-choice`` or ``free-form``."""
    directory: Path

    @property
    def is_classification(self) -> bool:
        return self.type == "classification"

    def rows(self, split: str, seed: int | None = None) -> list[dict]:
        """``train``/``dev`` rows of a seed (16 each), or the ``test`` rows."""
        if split == "test":
            candidates = [self.directory / f"{self.name}_test.jsonl.gz",
                          self.directory / f"{self.name}_test.jsonl"]
        else:
            candidates = [self.directory / f"{self.name}_16_{seed}_{split}.jsonl"]
        for path in candidates:
            if path.is_file():
                return read_rows(path)
        raise InputError(f"Task {self.name} has no {split} file (looked for "
                         f"{', '.join(str(c) for c in candidates)}).")

    def pool(self, limit: int | None = None) -> list[dict]:
        """The meta-training pool: test rows, then every seed's train and dev rows, deduped."""
        seen, out = set(), []
        sources = [("test", None)] + [(s, seed) for seed in SEEDS for s in ("train", "dev")]
        for split, seed in sources:
            try:
                rows = self.rows(split, seed)
            except InputError:
                continue
            for row in rows:
                key = (row["input"], row["output"])
                if key not in seen:
                    seen.add(key)
                    out.append(row)
        return out[:limit] if limit is not None else out


def read_rows(path: Path) -> list[dict]:
    """A task file's rows (JSON lines, gzipped or not), each checked: a damaged file is a
    :class:`ConfigError` naming the file and the line, never a raw error or a skipped task."""
    opener = gzip.open if path.suffix == ".gz" else open
    rows, number = [], 0
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path}, line {number}: not JSON ({e.msg}).") from None
                if not isinstance(row, dict) or not {"input", "output"} <= row.keys():
                    raise ConfigError(f"{path}, line {number}: a row is an object with "
                                      f"`input`, `output` and `options`; this one is "
                                      f"{json.dumps(row)[:80]}.")
                rows.append(row)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}, line {number + 1}: not UTF-8 text. Save the file as "
                          f"UTF-8.") from None
    except (OSError, EOFError) as e:
        raise ConfigError(f"{path} cannot be read ({e}).") from None
    return rows


def read_json(path: Path, what: str) -> Any:
    """A config file of the data folder (a partition, a task), refused with its name and the
    reason where it is not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} ({what}) is not valid JSON: {e}.") from None


def load_task(root: str | Path, name: str) -> Task | None:
    """The task ``name`` under ``root``, or None when its folder is missing."""
    root = Path(root)
    if not (root / name).is_dir():
        return None
    meta = root / "config" / "tasks" / f"{name}.json"
    spec = read_json(meta, f"task {name}'s config") if meta.is_file() else {}
    kind = spec.get("task_type") if isinstance(spec, dict) else None
    if kind is None:  # no task config: infer from the rows' options
        first = Task(name, "free-form", root / name).rows("train", SEEDS[0])[0]
        kind = "classification" if first.get("options") else "free-form"
    return Task(name, kind, root / name)


def load_partition(root: str | Path, partition: str) -> tuple[list[Task], list[Task]]:
    """The present train and test tasks of a partition; one warning per missing task."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"MetaICL data root {root} does not exist. Point data.root at a "
                          f"folder in MetaICL layout, e.g. ../shared/data/metaicl.")
    path = root / "config" / f"{partition}.json"
    if not path.is_file():
        known = sorted(p.stem for p in (root / "config").glob("*.json"))
        raise ConfigError(f"Partition `{partition}` has no config at {path}. Known partitions: "
                          f"{', '.join(known)}.")
    spec = read_json(path, f"partition {partition}")
    missing = [side for side in ("train", "test") if not isinstance(
        spec.get(side) if isinstance(spec, dict) else None, list)]
    if missing:
        raise ConfigError(f"{path} (partition {partition}) needs a list of task names under "
                          f"`train` and `test`; it has none under `{missing[0]}`.")
    out = []
    for side in ("train", "test"):
        tasks = []
        for name in dict.fromkeys(spec[side]):  # a task listed twice still counts once
            task = load_task(root, name)
            if task is None:
                warnings.warn(f"MetaICL task `{name}` ({partition} {side}) is not under {root}; "
                              f"skipping it.", stacklevel=2)
            else:
                tasks.append(task)
        out.append(tasks)
    return out[0], out[1]


def load_partitions(root: str | Path, names: Sequence[str]) -> tuple[list[Task], list[Task]]:
    """The union of several partitions' meta-train and meta-test tasks, each task once;
    ``demo`` is mend's built-in demo partition (written to mend's cache on first use)."""
    train: dict[str, Task] = {}
    test: dict[str, Task] = {}
    for name in names:
        part_root = root
        if name == DEMO_PARTITION:
            part_root = materialize(cache_root() / "demo-tasks")
        tr, te = load_partition(part_root, name)
        train.update((t.name, t) for t in tr)
        test.update((t.name, t) for t in te)
    return list(train.values()), list(test.values())


def held_out(root: str | Path, holdout: Sequence[str]) -> tuple[set[str], set[str]]:
    """The meta-test tasks of the ``holdout`` partitions, and the inputs of all their rows
    (every split and seed present): what training must never read."""
    tasks = load_partitions(root, holdout)[1] if holdout else []
    # Task.pool reads exactly those files: the test rows and every seed's train and dev rows.
    return {t.name for t in tasks}, {r["input"] for t in tasks for r in t.pool()}


def sample_demos(pool_size: int, k: int, exclude: int, rng: random.Random) -> list[int]:
    """``k`` distinct indices of the pool, never ``exclude`` (fewer if the pool is small)."""
    candidates = [i for i in range(pool_size) if i != exclude] if pool_size <= 4 * k else None
    if candidates is not None:
        return rng.sample(candidates, min(k, len(candidates)))
    picked: list[int] = []
    while len(picked) < k:  # rejection sampling: cheap for pools much larger than k
        i = rng.randrange(pool_size)
        if i != exclude and i not in picked:
            picked.append(i)
    return picked


class ContextBuilder:
    """Applies the truncation rules and builds LLM-token contexts and inputs."""

    def __init__(self, llm_tokenizer, fmt: DemoFormat, bos: Sequence[int],
                 context: ContextConfig, max_positions: int | None,
                 counters: Counters | None = None):
        self.tok, self.fmt, self.bos = llm_tokenizer, fmt, list(bos)
        self.config = context
        self.max_input, self.max_context = context.max_input_tokens, context.max_context_tokens
        self.max_positions = max_positions
        self.counters = counters if counters is not None else Counters()

    @classmethod
    def for_method(cls, method, context: ContextConfig,
                   counters: Counters | None = None) -> ContextBuilder:
        """The builder for a method (or trainable module) that holds ``llm`` and ``format``."""
        llm = method.llm
        return cls(llm.tokenizer, method.format, llm.bos, context, llm.max_length, counters)

    def cut_input(self, text: str, what: str) -> str:
        """Rule 1: keep the first ``max_input_tokens`` LLM tokens of an input."""
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= self.max_input:
            return text
        self.counters.add(f"{what}_inputs_cut")
        self.counters.add(f"{what}_tokens_cut", len(ids) - self.max_input)
        return self.tok.decode(ids[:self.max_input])

    def query(self, text: str, after_context: bool = True) -> list[int]:
        return encode(self.tok, [self.fmt.query(self.cut_input(text, "query"), after_context)])[0]

    def option(self, text: str) -> list[int]:
        return encode(self.tok, [self.fmt.option(text)])[0]

    def context(self, demos: Sequence[Demo], reserve: int) -> tuple[list[Demo], list[int]]:
        """Rule 2, after rule 1: the kept demonstrations (text) and their LLM ids.

        ``reserve`` is the number of input tokens that follow the context. A demonstration
        given as a plain string (a perturbed one) is cut like an input. A first demonstration
        longer than the whole budget is cut to it, keeping its first tokens (the distiller's
        rule, :func:`~mend.core.text.fit`), and is then kept as the text of those tokens: a
        budget of MEND's prefix length is ICL at equal memory even for long demonstrations.
        Counted: ``context_tokens_given`` (every demonstration, after rule 1) and
        ``context_tokens_kept``.
        """
        demos = [self.cut_input(d, "demo") if isinstance(d, str)
                 else (self.cut_input(d[0], "demo"), d[1]) for d in demos]
        budget = self.max_context
        if self.max_positions is not None:
            budget = min(budget, self.max_positions - len(self.bos) - reserve)
        pieces = encode(self.tok, self.fmt.pieces(demos)) if demos else []
        self.counters.add("context_tokens_given", sum(map(len, pieces)))
        if budget <= 0 or not pieces:
            self.counters.add("demos_dropped", len(pieces))
            return [], []
        ids, dropped, _ = fit(pieces, budget)
        kept = len(pieces) - dropped
        self.counters.add("demos_dropped", dropped)
        self.counters.add("context_tokens_kept", len(ids))
        if kept and len(ids) < len(pieces[0]):  # the first demonstration, cut to the budget
            self.counters.add("first_demo_tokens_cut", len(pieces[0]) - len(ids))
            return [self.tok.decode(ids)], ids
        return list(demos[:kept]), ids

    def example(self, demos: Sequence[tuple[str, str]], x: str, y: str) -> Example | None:
        """A finetuning example, or None (counted) when no demonstration fits."""
        query, output = self.query(x), self.option(y)
        kept, context = self.context(demos, reserve=len(query) + len(output))
        if not kept:
            self.counters.add("examples_skipped_no_context")
            return None
        return Example(demos=kept, context=context, input=query + output,
                       targets_from=len(query))


class FinetuneData:
    """Stage-2 examples: every pool row of every meta-train task, shuffled per epoch, each
    with ``k`` demonstrations drawn from its own task (never itself)."""

    def __init__(self, cfg: MetaICLConfig, tasks: Sequence[Task], builder: ContextBuilder,
                 seed: int):
        self.cfg, self.builder, self.seed = cfg, builder, seed
        self.k, self.k_min = builder.config.k, builder.config.k_min or builder.config.k
        if self.k < 1:
            raise ConfigError("context.k must be >= 1 to train: every example reads its "
                              "demonstrations.")
        banned_tasks, banned_inputs = held_out(cfg.root, cfg.holdout)
        tasks = [t for t in tasks if t.name not in banned_tasks]
        self.pools = {t.name: [r for r in t.pool(cfg.max_examples_per_task)
                               if r["input"] not in banned_inputs] for t in tasks}
        self.pools = {name: rows for name, rows in self.pools.items() if len(rows) > 1}
        if not self.pools:
            raise ConfigError("No meta-train task has more than one example: nothing to train "
                              "on. Check data.root and data.partition.")

    @property
    def counters(self) -> Counters:
        return self.builder.counters

    def keys(self, epoch: int) -> list[tuple[str, int, int]]:
        """This epoch's order of ``(task, row, epoch)`` keys."""
        keys = [(task, i, epoch) for task, rows in self.pools.items() for i in range(len(rows))]
        random.Random(f"{self.seed}-{epoch}").shuffle(keys)
        return keys

    def example(self, key: tuple[str, int, int]) -> Example | None:
        task, i, epoch = key
        rows = self.pools[task]
        rng = random.Random(f"{self.seed}-{epoch}-{task}-{i}")  # independent of batch order
        k = self.k if self.k_min == self.k else rng.randint(self.k_min, self.k)
        picked = sample_demos(len(rows), k, exclude=i, rng=rng)
        return self.builder.example([(rows[j]["input"], rows[j]["output"]) for j in picked],
                                    rows[i]["input"], rows[i]["output"])
