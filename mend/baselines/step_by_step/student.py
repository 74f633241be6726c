"""Distilling step-by-step (Hsieh et al., 2023): a small student learns labels and rationales.

Each training example becomes two tasks for the same student, told apart by a prefix:

    "[label] <input>"      -> "<label>"          (``predict: `` with prefixes: words)
    "[rationale] <input>"  -> "<rationale>"      (``explain: ``)

The loss is ``L_label + lambda * L_rationale``: each term the mean token cross-entropy of its
targets. At inference the student is asked for the label only. ``lambda = 0`` is standard
fine-tuning (gold labels) or standard distillation (teacher labels).

Causal students (decoder-only, the zoo models) read ``prompt + "\\n" + target + eos`` with
the loss masked to the target and eos; seq2seq students (T5-style) encode the prompt and
decode the target. A checkpoint is a transformers directory (model and tokenizer, loadable
with ``from_pretrained``) plus ``step_by_step_config.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSeq2SeqLM

from mend.baselines.step_by_step.data import RationaleExample
from mend.config import checked, from_dict, to_dict
from mend.core.backbones import DTYPES, enable_checkpointing, load_model, load_tokenizer, resolve
from mend.core.config import Dtype
from mend.core.text import bos_ids, pad
from mend.counters import Counters
from mend.errors import CheckpointError

PREFIXES = {"brackets": ("[label] ", "[rationale] "), "words": ("predict: ", "explain: ")}
CONFIG_FILE = "step_by_step_config.json"
IGNORE = -100


@dataclass(frozen=True)
@checked
class StudentConfig:
    model: str
    """A causal LM or a seq2seq model (T5-style): hub id, directory or zoo name."""
    dtype: Dtype = "float32"
    prefixes: Literal["brackets", "words"] = "brackets"
    max_input_tokens: int = 256
    max_target_tokens: int = 128


class Student(nn.Module):
    def __init__(self, config: StudentConfig, model: nn.Module, tokenizer):
        super().__init__()
        self.config, self.model, self.tokenizer = config, model, tokenizer
        self.seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
        self.label_prefix, self.rationale_prefix = PREFIXES[config.prefixes]
        self.bos = [] if self.seq2seq else bos_ids(tokenizer)
        self.counters = Counters()

    @classmethod
    def from_config(cls, config: StudentConfig, device=None, path: str | None = None
                    ) -> Student:
        """Load the student named in ``config`` (or the one saved at ``path``)."""
        source = path or config.model
        directory, gguf = resolve(source)
        if gguf is None and AutoConfig.from_pretrained(directory).is_encoder_decoder:
            model = AutoModelForSeq2SeqLM.from_pretrained(directory, dtype=DTYPES[config.dtype])
            model.to(device or "cpu")
        else:  # causal LMs (and every .gguf file) through the usual loader
            model = load_model(source, dtype=config.dtype, device=device)
        return cls(config, model, load_tokenizer(source))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device=None) -> Student:
        path = Path(path)
        if not (path / CONFIG_FILE).is_file():
            raise CheckpointError(f"{path} is not a step-by-step checkpoint: it needs "
                                  f"{CONFIG_FILE} (written by save_pretrained).")
        config = from_dict(StudentConfig, json.loads((path / CONFIG_FILE).read_text()))
        return cls.from_config(config, device=device, path=str(path))

    def save_pretrained(self, path: str | os.PathLike) -> None:
        path = Path(path)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        tmp = path / (CONFIG_FILE + ".tmp")
        tmp.write_text(json.dumps(to_dict(self.config), indent=2))
        os.replace(tmp, path / CONFIG_FILE)

    def gradient_checkpointing_enable(self) -> None:
        enable_checkpointing(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def prompt(self, example: RationaleExample, task: str) -> str:
        prefix = self.label_prefix if task == "label" else self.rationale_prefix
        return prefix + example.input

    def batch(self, prompts: Sequence[str], targets: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenized ``(prompt, target)`` pairs with labels masked to the targets (-100 on
        prompt and padding positions)."""
        tok, cfg = self.tokenizer, self.config
        p_ids = [ids[:cfg.max_input_tokens] for ids in tok(
            list(prompts), add_special_tokens=False)["input_ids"]]
        t_ids = [ids[:cfg.max_target_tokens] + [tok.eos_token_id] for ids in tok(
            [("" if self.seq2seq else "\n") + t for t in targets],
            add_special_tokens=False)["input_ids"]]
        if self.seq2seq:
            ids, mask = pad([p + [tok.eos_token_id] for p in p_ids], tok.pad_token_id)
            labels, _ = pad(t_ids, IGNORE)
        else:
            seqs = [self.bos + p + t for p, t in zip(p_ids, t_ids)]
            ids, mask = pad(seqs, tok.pad_token_id)
            labels, _ = pad([[IGNORE] * (len(self.bos) + len(p)) + t
                             for p, t in zip(p_ids, t_ids)], IGNORE)
        device = self.device
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
                "labels": labels.to(device)}

    def forward(self, input_ids, attention_mask, labels) -> torch.Tensor:
        """Mean cross-entropy of the unmasked label tokens."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          labels=labels).loss

    @torch.no_grad()
    def predict(self, examples: Sequence[RationaleExample], max_new_tokens: int = 32,
                batch_size: int = 16) -> list[str]:
        """Greedy labels (the ``[label]`` task only)."""
        was_training = self.training
        self.eval()
        tok, out = self.tokenizer, []
        try:
            for i in range(0, len(examples), batch_size):
                prompts = [self.prompt(e, "label") for e in examples[i:i + batch_size]]
                ids = [p[:self.config.max_input_tokens] for p in tok(
                    prompts, add_special_tokens=False)["input_ids"]]
                if self.seq2seq:
                    x, m = pad([p + [tok.eos_token_id] for p in ids], tok.pad_token_id)
                else:
                    x, m = pad([self.bos + p + tok("\n", add_special_tokens=False)["input_ids"]
                                for p in ids], tok.pad_token_id, side="left")
                gen = self.model.generate(input_ids=x.to(self.device),
                                          attention_mask=m.to(self.device),
                                          max_new_tokens=max_new_tokens, do_sample=False,
                                          pad_token_id=tok.pad_token_id,
                                          eos_token_id=tok.eos_token_id)
                new = gen if self.seq2seq else gen[:, x.shape[1]:]
                out += [t.split("\n")[0].strip()
                        for t in tok.batch_decode(new, skip_special_tokens=True)]
        finally:
            self.train(was_training)
        return out


class StepByStepObjective:
    """``L_label + lambda * L_rationale`` over the examples of a batch."""

    def __init__(self, student: Student, rationale_weight: float = 1.0,
                 label_source: str = "gold"):
        self.module, self.weight, self.label_source = student, rationale_weight, label_source
        self.counters = student.counters

    def label_of(self, example: RationaleExample) -> str:
        return example.label if self.label_source == "gold" else example.teacher_label

    def collate(self, examples: Sequence[RationaleExample]) -> dict[str, Any]:
        s = self.module
        batch = {"label": s.batch([s.prompt(e, "label") for e in examples],
                                  [self.label_of(e) for e in examples])}
        if self.weight:
            batch["rationale"] = s.batch([s.prompt(e, "rationale") for e in examples],
                                         [e.rationale for e in examples])
        batch["tokens"] = sum(int(b["attention_mask"].sum()) for b in batch.values()
                              if isinstance(b, dict))
        return batch

    def loss(self, model, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        label = model(**batch["label"])
        out = {"label": label.detach()}
        loss = label
        if self.weight:
            rationale = model(**batch["rationale"])
            loss = label + self.weight * rationale
            out["rationale"] = rationale.detach()
        return {"loss": loss, **out}

    def save_pretrained(self, path) -> None:
        self.module.save_pretrained(path)
