"""A trainable LM that answers NLI patterns: pattern-based fine-tuning (PBFT) and the student
of context distillation.

    PatternLM(prompt) -> logits of the next token; the label is read at its verbalizer tokens.

Three ways to train it (``mode``):

- ``full``: every weight;
- ``lora``: LoRA adapters from peft (r = 8, alpha = 32, dropout 0.05, on the attention's
  query and value projections by default, as in Mosbach et al., 2023);
- ``bitfit``: only bias terms (Ben Zaken et al., 2022). Architectures without biases in
  their linear layers (Llama, Gemma) get zero-initialised ones there, which then train; the
  model's output is unchanged until they do.

A checkpoint (``pattern_lm_*``) holds only what trained, and the config that rebuilds the rest.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mend.baselines.nli.data import LABELS, NLIExample
from mend.baselines.nli.patterns import get_pattern
from mend.config import checked, from_dict, to_dict
from mend.core import checkpoint
from mend.core.backbones import add_lora, enable_checkpointing, load_model, load_tokenizer
from mend.core.config import Dtype
from mend.core.text import bos_ids, pad, positions
from mend.counters import Counters
from mend.errors import CheckpointError, ConfigError

KIND = "pattern_lm"


@dataclass(frozen=True)
@checked
class PatternModelConfig:
    model: str
    """A hub id, local directory, ``.gguf`` file or zoo name."""
    mode: Literal["full", "lora", "bitfit"] = "lora"
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    """GPT-2's fused projection is ``c_attn``; it is used when these are absent."""
    dtype: Dtype = "float32"
    pattern: str = "gpt-3"
    patterns_file: str | None = None
    max_length: int = 256
    """Prompt tokens; longer prompts keep their end (the question) and are counted."""
    attn_implementation: str = "sdpa"


class PatternLM(nn.Module):
    def __init__(self, config: PatternModelConfig, lm: nn.Module, tokenizer):
        super().__init__()
        self.config, self.tokenizer = config, tokenizer
        self.pattern = get_pattern(config.pattern, config.patterns_file)
        self.label_ids = self.pattern.label_ids(tokenizer)
        self.bos = bos_ids(tokenizer)
        self.counters = Counters()
        if config.mode == "lora":
            names = {n.rsplit(".", 1)[-1] for n, _ in lm.named_modules()}
            targets = [t for t in config.lora_target_modules if t in names] or (
                ["c_attn"] if "c_attn" in names else [])
            if not targets:
                raise ConfigError(f"None of lora_target_modules {config.lora_target_modules} "
                                  f"is a module of {config.model}.")
            lm = add_lora(lm, config.lora_r, config.lora_alpha, config.lora_dropout, targets)
        elif config.mode == "bitfit":
            lm.requires_grad_(False)
            _add_biases(lm)
            for name, p in lm.named_parameters():
                p.requires_grad_(name.endswith(".bias"))
        self.lm = lm

    @classmethod
    def from_config(cls, config: PatternModelConfig, device=None) -> PatternLM:
        lm = load_model(config.model, dtype=config.dtype, device=device,
                        attn_implementation=config.attn_implementation)
        return cls(config, lm, load_tokenizer(config.model))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device=None) -> PatternLM:
        config = from_dict(PatternModelConfig, checkpoint.read_config(path, KIND))
        model = cls.from_config(config, device=device)
        state = checkpoint.load_weights(path, KIND)
        mine = dict(model.trainable_state_dict())
        if state.keys() != mine.keys():
            raise CheckpointError(f"{path} does not fit {config.model} in mode {config.mode}: "
                                  f"{len(state.keys() ^ mine.keys())} weights differ.")
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)
        return model

    def save_pretrained(self, path: str | os.PathLike) -> None:
        checkpoint.save(path, KIND, to_dict(self.config), self.trainable_state_dict())

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what trains: every weight (full), the adapters (LoRA) or the biases (BitFit)."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def gradient_checkpointing_enable(self) -> None:
        enable_checkpointing(self.lm)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode(self, examples: Sequence[NLIExample], context: Sequence[int] = ()
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts as left-padded ``(B, T)`` ids and mask: bos, ``context`` ids, the pattern."""
        texts = [self.pattern.render(e) for e in examples]
        seqs = []
        for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]:
            if len(ids) > self.config.max_length:
                self.counters.add("prompts_cut")
                ids = ids[-self.config.max_length:]
            seqs.append(self.bos + list(context) + ids)
        ids, mask = pad(seqs, self.tokenizer.pad_token_id or 0, side="left")
        return ids.to(self.device), mask.to(self.device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(B, V)`` logits of the token after each (left-padded) prompt."""
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=positions(attention_mask), logits_to_keep=1, use_cache=False)
        return out.logits[:, -1].float()

    @torch.no_grad()
    def next_token_logits(self, examples: Sequence[NLIExample], batch_size: int = 32
                          ) -> torch.Tensor:
        """``(Q, V)`` logits for each example's prompt (evaluation; the mode is restored)."""
        was_training = self.training
        self.eval()
        try:
            rows = [self(*self.encode(examples[i:i + batch_size])).cpu()
                    for i in range(0, len(examples), batch_size)]
        finally:
            self.train(was_training)
        return torch.cat(rows)


def _add_biases(lm: nn.Module) -> None:
    """Give every bias-free linear layer of the transformer blocks a zero bias (BitFit on
    Llama- and Gemma-style models); embeddings and the LM head are left alone."""
    head = lm.get_output_embeddings()
    for module in lm.modules():
        if isinstance(module, nn.Linear) and module is not head and module.bias is None:
            w = module.weight
            module.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))


class PatternObjective:
    """PBFT: cross-entropy of the gold label over the label tokens at the prompt's end."""

    def __init__(self, module: PatternLM):
        self.module = module
        self.counters = module.counters

    def collate(self, examples: Sequence[NLIExample]) -> dict[str, Any]:
        ids, mask = self.module.encode(examples)
        labels = torch.tensor([LABELS.index(e.label) for e in examples], device=ids.device)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels,
                "tokens": int(mask.sum())}

    def loss(self, model, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        logits = model(batch["input_ids"], batch["attention_mask"])[:, self.module.label_ids]
        ce = F.cross_entropy(logits, batch["labels"])
        return {"loss": ce, "ce": ce.detach()}

    def save_pretrained(self, path) -> None:
        self.module.save_pretrained(path)
