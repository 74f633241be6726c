"""Context distillation, teacher to student (Snell et al., 2022; Mosbach et al., 2023 setting).

The **teacher** is a (larger) frozen LM prompted with the context C: an instruction and k
demonstrations in a pattern, then the query. The **student** is a smaller LM that sees the
query alone, trained with LoRA or BitFit on

    alpha * KL(p_teacher || p_student) + (1 - alpha) * CE(y, p_student)

over the label tokens (:func:`mend.core.losses.label_distill_loss`). Each model reads the
verbalizer through its own tokenizer, so teacher and student may tokenize differently.

The teacher's label-token logits are computed once and kept on disk (:class:`TeacherCache`).
Student training then never holds the context, so its memory does not grow with k. The cache
key covers the teacher (its name and a fingerprint of its weights), the pattern, the
instruction, the demonstrations and the example: a change to any of them misses the cache.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mend.baselines.nli.data import LABELS, NLIExample
from mend.baselines.nli.model import PatternLM
from mend.baselines.nli.patterns import Pattern, context_text
from mend.core.losses import label_distill_loss
from mend.core.prefix_lm import PrefixLM

DEFAULT_INSTRUCTION = ("Based on the premise and the label of the hypothesis, please deduce "
                       "whether the hypothesis is right or wrong.")


def teacher_fingerprint(name: str, llm: PrefixLM) -> str:
    """The teacher's name, dtype and a hash of the first rows of its embeddings: enough to tell
    apart two models given the same name."""
    rows = llm.model.get_input_embeddings().weight[:64].detach().float().cpu().numpy()
    return f"{name}|{llm.dtype}|{hashlib.sha256(rows.tobytes()).hexdigest()[:16]}"


def cache_key(teacher: str, pattern: Pattern, instruction: str | None, context: str,
              example: NLIExample) -> str:
    payload = {"teacher": teacher, "pattern": [pattern.name, pattern.template,
                                               sorted(pattern.verbalizer.items())],
               "instruction": instruction, "context": context,
               "example": [example.premise, example.hypothesis]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class TeacherCache:
    """Label-token logits by key, in an SQLite file (safe against a crash mid-write)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path)
        self._db.execute("CREATE TABLE IF NOT EXISTS logits (key TEXT PRIMARY KEY, value BLOB)")
        self.hits = self.misses = 0

    def get(self, key: str) -> np.ndarray | None:
        row = self._db.execute("SELECT value FROM logits WHERE key = ?", (key,)).fetchone()
        return None if row is None else np.frombuffer(row[0], dtype=np.float32)

    def put_many(self, items: dict[str, np.ndarray]) -> None:
        with self._db:  # one transaction
            self._db.executemany("INSERT OR REPLACE INTO logits VALUES (?, ?)",
                                 [(k, v.astype(np.float32).tobytes()) for k, v in items.items()])

    def close(self) -> None:
        self._db.close()


@torch.no_grad()
def teacher_logits(teacher: PrefixLM, name: str, pattern: Pattern, instruction: str | None,
                   demos: Sequence[NLIExample], examples: Sequence[NLIExample],
                   cache: TeacherCache, sep: str = "\n\n", batch_size: int = 32) -> torch.Tensor:
    """``(N, L)`` teacher logits at its label tokens; computed only for cache misses."""
    context = context_text(pattern, demos, sep, instruction)
    fingerprint = teacher_fingerprint(name, teacher)
    keys = [cache_key(fingerprint, pattern, instruction, context, e) for e in examples]
    found = {k: cache.get(k) for k in dict.fromkeys(keys)}
    missing = [i for i, k in enumerate(keys) if found[k] is None]
    cache.hits += len(keys) - len(missing)
    cache.misses += len(missing)
    if missing:
        tok = teacher.tokenizer
        prefix, prefix_mask = teacher.embed_context([tok(context, add_special_tokens=False)
                                                     ["input_ids"]])
        prompts = tok([sep + pattern.render(examples[i]) for i in missing],
                      add_special_tokens=False)["input_ids"]
        logits = teacher.next_token_logits(prompts, prefix, prefix_mask, batch_size)
        labels = logits[:, pattern.label_ids(tok)].numpy()
        new = {keys[i]: labels[j] for j, i in enumerate(missing)}
        cache.put_many(new)
        found.update(new)
    return torch.tensor(np.stack([found[k] for k in keys]))


class DistillObjective:
    """The student's loss; ``teacher`` maps each training example to its cached logits."""

    def __init__(self, student: PatternLM, teacher: dict[NLIExample, torch.Tensor],
                 alpha: float = 0.5, temperature: float = 1.0):
        self.module, self.teacher = student, teacher
        self.alpha, self.temperature = alpha, temperature
        self.counters = student.counters

    def collate(self, examples: Sequence[NLIExample]) -> dict[str, Any]:
        ids, mask = self.module.encode(examples)
        return {"input_ids": ids, "attention_mask": mask,
                "labels": torch.tensor([LABELS.index(e.label) for e in examples],
                                       device=ids.device),
                "teacher": torch.stack([self.teacher[e] for e in examples]).to(ids.device),
                "tokens": int(mask.sum())}

    def loss(self, model, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        student = model(batch["input_ids"], batch["attention_mask"])[:, self.module.label_ids]
        loss, kl, ce = label_distill_loss(student, batch["teacher"], batch["labels"],
                                          self.alpha, self.temperature)
        return {"loss": loss, "kl": kl.detach(), "ce": ce.detach()}

    def save_pretrained(self, path) -> None:
        self.module.save_pretrained(path)
