"""MEND: a distiller turns demonstrations into vectors for the frozen LLM.

Evaluation uses :class:`Mend`; both training stages use :class:`MendObjective`, whose loss is
a weighted sum of three terms, all computed through the frozen LLM reading the vectors:

- ``distill``: ``L_distill``, KL(LLM | real demonstrations || LLM | vectors) at every input
  position (the teacher reads the demonstrations' LLM tokens, the student the vectors);
- ``pred``: ``L_pred``, cross-entropy of the output tokens given the vectors and the input;
- ``clm``: the CLM objective, cross-entropy of every input token given the vectors
  (HyperTuning-style; the MEND ablations use it);
- ``reconstruct``: autoencoding, cross-entropy of the demonstrations' own LLM tokens read
  right after the vectors (ICAE's pretraining objective): the vectors must carry the text.

Stage 1 (paper): ``distill: 1``. Stage 2: ``pred: 1, distill: lambda``. Ablations set the
weights differently; a zero weight skips its term's computation (a zero ``distill`` skips the
teacher pass).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from mend.config import checked
from mend.core.distiller import Distiller, read_config
from mend.core.losses import auto_chunk, ce_loss, chunked_ce, chunked_kl_distill, kl_distill
from mend.core.text import pad
from mend.counters import Counters
from mend.data import Example
from mend.errors import ConfigError
from mend.methods.base import Prefix
from mend.methods.registry import register_method


@dataclass(frozen=True)
@checked
class ObjectiveConfig:
    distill: float = 1.0
    """Weight of ``L_distill`` (lambda in stage 2, gamma in the CLM + distill ablation)."""
    pred: float = 0.0
    """Weight of ``L_pred`` (cross-entropy on output tokens)."""
    clm: float = 0.0
    """Weight of the CLM objective (cross-entropy on every input token)."""
    reconstruct: float = 0.0
    """Weight of the autoencoding objective: cross-entropy of the demonstrations' LLM tokens
    read after the vectors (a token-level mean, like ``clm``)."""
    temperature: float = 1.0
    """Softmax temperature of ``L_distill`` (see :func:`mend.core.losses.kl_distill`)."""
    distill_on: Literal["input", "answer"] = "input"
    """Where ``L_distill`` counts: every input position (the paper), or only where the answer
    is predicted (the output tokens of a stage-2 example, as ``L_pred``; stage 2 only)."""
    logits_chunk: int | Literal["auto"] | None = "auto"
    """Positions projected onto the vocabulary at a time, recomputed in backward, so no
    ``(B, T, V)`` logits are ever held (:func:`mend.core.losses.chunked_kl_distill`). auto:
    from the device's free memory on CUDA (usually one chunk), 1024 on a CPU
    (:func:`mend.core.losses.auto_chunk`). null: the plain path through full logits (same
    loss, more memory)."""

    def __post_init__(self) -> None:
        weights = (self.distill, self.pred, self.clm, self.reconstruct)
        if min(weights) < 0 or max(weights) == 0:
            raise ConfigError("objective weights must be >= 0 with at least one > 0; got "
                              f"distill={self.distill}, pred={self.pred}, clm={self.clm}, "
                              f"reconstruct={self.reconstruct}.")
        if self.temperature <= 0:
            raise ConfigError(f"objective.temperature must be > 0, got {self.temperature}.")
        if isinstance(self.logits_chunk, int) and self.logits_chunk < 1:
            raise ConfigError(f"objective.logits_chunk must be >= 1, auto or null, got "
                              f"{self.logits_chunk}.")


class Mend:
    """MEND (or HyperTuning, whose distiller was trained with CLM) as an evaluation method."""

    reads_context = True
    reads_demos = True

    def __init__(self, distiller: Distiller, name: str = "mend", refine_steps: int = 0):
        self.name, self.distiller, self.refine_steps = name, distiller, refine_steps
        self.llm, self.format = distiller.llm, distiller.format

    @classmethod
    def load(cls, cfg, device=None, name: str = "mend") -> Mend:
        """The evaluation method a :class:`~mend.methods.MethodConfig` names. Evaluation never
        trains, so LoRA adapters are folded into the weights (the same vectors, fewer
        matmuls)."""
        # A warm-started distiller compacts its own cache, so it takes any budget and any
        # compaction at load time; a distiller of vectors has neither to change.
        budget = {k: v for k, v in (("num_placeholders", cfg.num_placeholders),
                                    ("compaction", cfg.compaction)) if v is not None}
        if budget and read_config(cfg.checkpoint).output != "compacted":
            given = " and ".join(f"{k}={v}" for k, v in budget.items())
            raise ConfigError(f"{given} changes only a warm-started distiller's compaction "
                              f"(output: compacted); {cfg.checkpoint} emits the l vectors it "
                              f"was trained for. Remove {' and '.join(budget)}.")
        distiller = Distiller.from_pretrained(cfg.checkpoint, device=device, **cfg.load_time,
                                              distiller_dtype=cfg.distiller_dtype, **budget)
        return cls(distiller.eval().merge_adapters(), name=name, refine_steps=cfg.refine_steps)

    def prefix(self, demo_sets: Sequence[Sequence[tuple[str, str]]],
               contexts: Sequence[Sequence[int]]) -> Prefix:
        ctx = self.distiller.compress_batch(list(demo_sets), refine_steps=self.refine_steps)
        return ctx.prefill if ctx.vectors is None else (ctx.vectors, None)


class MendObjective:
    """The trainable side of MEND: collation and the weighted loss."""

    def __init__(self, distiller: Distiller, cfg: ObjectiveConfig,
                 counters: Counters | None = None):
        self.module, self.cfg = distiller, cfg
        self.counters = counters if counters is not None else Counters()
        self.chunk = cfg.logits_chunk
        if self.chunk == "auto":  # decided once, before training has taken any memory
            config = distiller.llm.model.config
            vocab = getattr(config.get_text_config(), "vocab_size", None) or config.vocab_size
            self.chunk = auto_chunk(distiller.llm.device, vocab)

    def collate(self, examples: Sequence[Example]) -> dict[str, Any]:
        """Examples -> tensors: distiller ids (left-padded), the teacher's context ids
        (left-padded) and the shared input ids (right-padded), with masks."""
        d = self.module
        pad_id = d.llm.tokenizer.pad_token_id
        demo_ids, demo_mask, demo_width = d.tokenize([e.demos for e in examples], self.counters)
        context_ids, context_mask = pad([e.context for e in examples], pad_id, side="left")
        input_ids, input_mask = pad([e.input for e in examples], pad_id)
        starts = torch.tensor([e.targets_from for e in examples]).unsqueeze(1)
        columns = torch.arange(input_ids.shape[1]).unsqueeze(0)
        target_mask = (columns >= starts) & input_mask.bool()
        device = d.placeholders.device
        batch = {}
        if self.cfg.reconstruct:  # the same context, right-padded, as targets after the vectors
            recon_ids, recon_mask = pad([e.context for e in examples], pad_id)
            batch = {"recon_ids": recon_ids.to(device), "recon_mask": recon_mask.to(device)}
        return {**batch, "demo_ids": demo_ids, "demo_mask": demo_mask, "demo_width": demo_width,
                "context_ids": context_ids.to(device), "context_mask": context_mask.to(device),
                "input_ids": input_ids.to(device), "input_mask": input_mask.to(device),
                "target_mask": target_mask.to(device),
                "tokens": int(context_mask.sum() + input_mask.sum())}

    def loss(self, model, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        llm, cfg = self.module.llm, self.cfg
        ids, mask = batch["input_ids"], batch["input_mask"]
        vectors = model(batch["demo_ids"], batch["demo_mask"], batch.get("demo_width"))
        chunk = self.chunk
        # Index t of the student's outputs predicts input token t (the first from the last
        # vector). The fast path keeps hidden states and projects them chunk by chunk.
        forward = llm.logits if chunk is None else llm.hidden
        student = forward(ids, mask, prefix=vectors, with_prefix_last=True)[:, :-1]
        terms: dict[str, torch.Tensor] = {}
        if cfg.distill:
            # no_grad, not inference_mode: the chunked loss saves these for its backward.
            with torch.no_grad():
                teacher = forward(ids, mask, prefix=llm.embed(batch["context_ids"]),
                                  prefix_mask=batch["context_mask"],
                                  with_prefix_last=True)[:, :-1]
            where = batch["target_mask"] if cfg.distill_on == "answer" else mask
            terms["distill"] = (kl_distill(student, teacher, where, cfg.temperature)
                                if chunk is None else chunked_kl_distill(
                                    llm.project, student, teacher, where, cfg.temperature,
                                    chunk))
        for name, target_mask in (("pred", batch["target_mask"]), ("clm", mask)):
            if getattr(cfg, name):
                terms[name] = (ce_loss(student, ids, target_mask) if chunk is None else
                               chunked_ce(llm.project, student, ids, target_mask, chunk))
        if cfg.reconstruct:
            r_ids, r_mask = batch["recon_ids"], batch["recon_mask"]
            hidden = forward(r_ids, r_mask, prefix=vectors, with_prefix_last=True)[:, :-1]
            terms["reconstruct"] = (ce_loss(hidden, r_ids, r_mask) if chunk is None else
                                    chunked_ce(llm.project, hidden, r_ids, r_mask, chunk))
        loss = sum(getattr(cfg, name) * value for name, value in terms.items())
        return {"loss": loss, **{name: value.detach() for name, value in terms.items()}}

    def save_pretrained(self, path: str | Path,
                        state_dict: dict[str, torch.Tensor] | None = None) -> None:
        self.module.save_pretrained(path, state_dict=state_dict)


register_method("mend", load=Mend.load, needs="checkpoint")
