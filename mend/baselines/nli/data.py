"""NLI data for the pattern-based methods: binary MNLI and RTE, and HANS out of domain.

- **MNLI** (binary, Mosbach et al. 2023): ``glue-mnli`` from the MetaICL folder, rows
  ``premise: ... [SEP] hypothesis: ...``; ``neutral`` is dropped; ``contradiction`` becomes
  ``non-entailment``. **RTE**: ``glue-rte`` (``sentence 1: ... [SEP] sentence 2: ...``), with
  ``not_entailment`` as ``non-entailment``. The pool is the task's test file plus every seed's
  train and dev files, deduplicated; :func:`split` cuts it into a training pool and a held-out
  in-domain evaluation set.
- **HANS**: ``hans_regenerated.jsonl.gz``, grouped by heuristic (lexical_overlap, subsequence,
  constituent) and gold label (entailment, non-entailment): six subsets.

Labels are the strings ``entailment`` and ``non-entailment`` everywhere.
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mend.config import checked
from mend.data.metaicl import load_task as load_metaicl
from mend.errors import ConfigError

LABELS = ("entailment", "non-entailment")
_LABEL_MAP = {"entailment": "entailment", "contradiction": "non-entailment",
              "not_entailment": "non-entailment", "non-entailment": "non-entailment"}
_FIELDS = {"glue-mnli": ("premise: ", " [SEP] hypothesis: "),
           "glue-rte": ("sentence 1: ", " [SEP] sentence 2: ")}


@dataclass(frozen=True)
class NLIExample:
    premise: str
    hypothesis: str
    label: str
    """``entailment`` or ``non-entailment``."""
    group: str = ""
    """HANS: ``<heuristic>/<label>``; empty elsewhere."""


def load_task(root: str | Path, task: str = "glue-mnli") -> list[NLIExample]:
    """Binary NLI examples of a MetaICL task (``glue-mnli`` or ``glue-rte``), deduplicated."""
    if task not in _FIELDS:
        raise ConfigError(f"NLI task {task!r} is not supported; use one of {', '.join(_FIELDS)}.")
    meta = load_metaicl(root, task)
    if meta is None:
        raise ConfigError(f"Task {task} is not under {root}; point data.root at the MetaICL "
                          f"folder (e.g. ../shared/data/metaicl).")
    head, sep = _FIELDS[task]
    out = []
    for row in meta.pool():
        label = _LABEL_MAP.get(row["output"])
        text = row["input"]
        if label is None or not text.startswith(head) or sep not in text:
            continue  # neutral (dropped in the binary task), or a malformed row
        premise, hypothesis = text[len(head):].split(sep, 1)
        out.append(NLIExample(premise.strip(), hypothesis.strip(), label))
    return out


def load_hans(path: str | Path, per_subset: int | None = None, seed: int = 0
              ) -> dict[str, list[NLIExample]]:
    """HANS by ``<heuristic>/<label>``, ``per_subset`` examples of each (seeded sample)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"HANS file {path} does not exist (expected "
                          f"../shared/data/hans/hans_regenerated.jsonl.gz).")
    groups: dict[str, list[NLIExample]] = {}
    with gzip.open(path, "rt") as f:
        for line in f:
            row = json.loads(line)
            group = f"{row['heuristic']}/{row['gold_label']}"
            groups.setdefault(group, []).append(NLIExample(
                row["sentence1"], row["sentence2"], _LABEL_MAP[row["gold_label"]], group))
    if per_subset is not None:
        rng = random.Random(seed)
        groups = {g: rng.sample(rows, min(per_subset, len(rows)))
                  for g, rows in sorted(groups.items())}
    return dict(sorted(groups.items()))


def split(examples: Sequence[NLIExample], eval_size: int, seed: int = 0
          ) -> tuple[list[NLIExample], list[NLIExample]]:
    """``(training pool, in-domain evaluation set)``: a seeded, disjoint split."""
    order = list(examples)
    random.Random(seed).shuffle(order)
    if eval_size >= len(order):
        raise ConfigError(f"The evaluation set ({eval_size}) must be smaller than the data "
                          f"({len(order)}).")
    return order[eval_size:], order[:eval_size]


def balanced_sample(pool: Sequence[NLIExample], n: int, rng: random.Random
                    ) -> list[NLIExample]:
    """``n`` examples with the labels as equal as ``n`` allows (extras go to labels in
    order), shuffled."""
    by_label = {label: [e for e in pool if e.label == label] for label in LABELS}
    picked = []
    for i, label in enumerate(LABELS):
        want = n // len(LABELS) + (1 if i < n % len(LABELS) else 0)
        if want > len(by_label[label]):
            raise ConfigError(f"Asked for {want} {label} examples but the pool has "
                              f"{len(by_label[label])}.")
        picked += rng.sample(by_label[label], want)
    rng.shuffle(picked)
    return picked


@dataclass(frozen=True)
@checked
class NLIDataConfig:
    root: str = "../shared/data/metaicl"
    task: Literal["glue-mnli", "glue-rte"] = "glue-mnli"
    hans: str = "../shared/data/hans/hans_regenerated.jsonl.gz"
    eval_size: int = 500
    """Held-out in-domain examples (disjoint from every training and demonstration example)."""
    hans_per_subset: int | None = 200
    """Examples of each of HANS's six heuristic x label subsets (None: all 5,000)."""
    split_seed: int = 0


def nli_data(cfg: NLIDataConfig) -> tuple[list[NLIExample], dict[str, list[NLIExample]]]:
    """``(training pool, evaluation sets)``: in-domain and the HANS subsets."""
    pool, in_domain = split(load_task(cfg.root, cfg.task), cfg.eval_size, cfg.split_seed)
    return pool, {"in_domain": in_domain, **load_hans(cfg.hans, cfg.hans_per_subset,
                                                      cfg.split_seed)}
