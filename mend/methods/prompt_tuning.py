"""Prompt tuning (Lester et al., 2021): ``l`` soft-prompt vectors for the frozen LLM.

The vectors are trained by gradient descent on the meta-train tasks (``L_pred``: the
cross-entropy of the output tokens given the vectors and the input; no distiller, no
demonstrations), then read in front of every query, whatever its demonstrations.

    mend finetune --config configs/finetune/class_to_class/smollm2-prompt-tuning.yaml
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from mend.config import checked, from_dict, replace, to_dict
from mend.core import checkpoint
from mend.core.backbones import init_vectors
from mend.core.config import SEP, Dtype, FrozenLLM
from mend.core.losses import ce_loss
from mend.core.prefix_lm import PrefixLM
from mend.core.text import DemoFormat, pad
from mend.counters import Counters
from mend.data import Example
from mend.errors import CheckpointError, ConfigError
from mend.methods.base import Prefix
from mend.methods.registry import register_method

LEGACY_KEYS = {"num_vectors": "num_placeholders", "init": "placeholder_init"}


@dataclass(frozen=True)
@checked
class PromptTuningConfig:
    llm: str
    """The frozen LLM: a hub id, a local directory, a ``.gguf`` file or a zoo name."""
    num_placeholders: int = 100
    """The paper's l: learned vectors in front of every query (as MEND's placeholders)."""
    placeholder_init: Literal["vocab", "random"] = "vocab"
    """``vocab``: embeddings of random vocabulary tokens (Lester et al.); ``random``:
    N(0, 0.02)."""
    io_sep: str = SEP
    demo_sep: str = SEP
    llm_dtype: Dtype = "float32"
    llm_8bit: bool = False
    allow_8bit_fallback: bool = False
    attn_implementation: str = "sdpa"

    def __post_init__(self) -> None:
        if self.num_placeholders < 1:
            raise ConfigError(f"num_placeholders must be >= 1, got {self.num_placeholders}.")


class PromptTuning(nn.Module):
    """The soft prompt, ``(l, d_llm)``; the frozen LLM is held beside it, not inside it."""

    name = "prompt_tuning"
    reads_context = True  # the query follows the prompt as it follows demonstrations
    reads_demos = False

    def __init__(self, config: PromptTuningConfig, llm: PrefixLM):
        super().__init__()
        self.config, self.llm = config, llm
        self.format = DemoFormat(config.io_sep, config.demo_sep)
        emb = llm.model.get_input_embeddings()
        self.prompt = nn.Parameter(init_vectors(
            emb, min(len(llm.tokenizer), emb.num_embeddings), config.num_placeholders,
            config.placeholder_init, torch.float32))

    @classmethod
    def from_config(cls, config: PromptTuningConfig, device=None) -> PromptTuning:
        return cls(config, PrefixLM.load(FrozenLLM.of(config), device))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device=None, **overrides) -> PromptTuning:
        saved = checkpoint.read_config(path, "prompt_tuning")
        for old, new in LEGACY_KEYS.items():  # checkpoints written before the names were one
            if old in saved:
                saved[new] = saved.pop(old)
        config = from_dict(PromptTuningConfig, saved)
        if overrides:
            config = replace(config, **overrides)
        model = cls.from_config(config, device=device)
        prompt = checkpoint.load_weights(path, "prompt_tuning")["prompt"]
        if prompt.shape != model.prompt.shape:
            raise CheckpointError(f"The checkpoint's prompt is {tuple(prompt.shape)}, but "
                                  f"{config.llm} needs {tuple(model.prompt.shape)}.")
        with torch.no_grad():
            model.prompt.copy_(prompt)
        return model

    @classmethod
    def load(cls, cfg, device=None) -> PromptTuning:
        """The evaluation method a :class:`~mend.methods.MethodConfig` names."""
        return cls.from_pretrained(cfg.checkpoint, device=device, **cfg.load_time).eval()

    def save_pretrained(self, path: str | os.PathLike,
                        state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """``state_dict``: the prompt as gathered from a sharded run (by default its own)."""
        prompt = self.prompt if state_dict is None else state_dict["prompt"]
        checkpoint.save(path, "prompt_tuning", to_dict(self.config), {"prompt": prompt})

    def gradient_checkpointing_enable(self) -> None:
        self.llm.gradient_checkpointing_enable()

    def forward(self, batch: int) -> torch.Tensor:
        """The prompt for ``batch`` rows: ``(batch, l, d_llm)`` in the LLM's dtype."""
        return self.prompt.to(self.llm.dtype).unsqueeze(0).expand(batch, -1, -1)

    def prefix(self, demo_sets: Sequence[Sequence[tuple[str, str]]],
               contexts: Sequence[Sequence[int]]) -> Prefix:
        return self(len(demo_sets)).detach(), None


class PromptTuningObjective:
    """``L_pred`` of the output tokens, read after the soft prompt and the input."""

    def __init__(self, module: PromptTuning, counters: Counters | None = None):
        self.module = module
        self.counters = counters if counters is not None else Counters()

    def collate(self, examples: Sequence[Example]) -> dict[str, Any]:
        llm = self.module.llm
        ids, mask = pad([e.input for e in examples], llm.tokenizer.pad_token_id)
        starts = torch.tensor([e.targets_from for e in examples]).unsqueeze(1)
        targets = (torch.arange(ids.shape[1]).unsqueeze(0) >= starts) & mask.bool()
        return {"input_ids": ids.to(llm.device), "input_mask": mask.to(llm.device),
                "target_mask": targets.to(llm.device), "tokens": int(mask.sum())}

    def loss(self, model, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        ids, mask = batch["input_ids"], batch["input_mask"]
        logits = self.module.llm.logits(ids, mask, prefix=model(ids.shape[0]),
                                        with_prefix_last=True)[:, :-1]
        pred = ce_loss(logits, ids, batch["target_mask"])
        return {"loss": pred, "pred": pred.detach()}

    def save_pretrained(self, path, state_dict=None) -> None:
        self.module.save_pretrained(path, state_dict=state_dict)


register_method("prompt_tuning", load=PromptTuning.load, needs="checkpoint")
