"""Run a frozen causal LM with a prefix of vectors in front of its input.

Every row the LLM reads is laid out as::

    [ pad.. bos | prefix ]  [ input | pad.. ]
      the head, left-padded    right-padded, width T

- ``bos`` is what the LLM's tokenizer puts before any text (Llama, Gemma), or nothing (GPT-2).
- The prefix is either distilled vectors (MEND, prompt tuning) or the embeddings of real
  context tokens (ICL, the distillation teacher). Both use this one code path.
- Position ids count real tokens only, and real tokens are contiguous, so padding never
  changes a position or a distance (sliding-window attention included).

Because the input always fills the last ``T`` columns, the logits of a row's input tokens sit
at the same indices whatever its prefix. That lets the teacher (real demonstrations) and the
student (vectors) be compared position by position, and lets ``logits_to_keep`` skip the
head's logits entirely.

This module holds that layout, the forward passes and the KV head (:meth:`PrefixLM.prefill`
and the continuation after it). Scoring options, next-token logits and generation, which read
queries after a head, are in :mod:`mend.core.scoring`, mixed into the same class.

:class:`PrefixLM` is deliberately not an ``nn.Module``: modules that hold it (the Distiller)
then expose only their own trainable weights to optimizers, DDP and ``state_dict``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Sequence

import torch

from mend.core import attention
from mend.core.backbones import (
    enable_checkpointing,
    freeze,
    hidden_size,
    load_model,
    load_tokenizer,
    max_positions,
)
from mend.core.config import FrozenLLM
from mend.core.kv_cache import Prefill, bias_rows, fresh_cache
from mend.core.scoring import Scoring
from mend.core.text import bos_ids, pad, positions
from mend.errors import InputError


class PrefixLM(Scoring):
    @classmethod
    def load(cls, spec: FrozenLLM, device: str | torch.device | None = None) -> PrefixLM:
        """The frozen LLM that ``spec`` names, with its tokenizer: the one loader of every
        frozen LLM and teacher in mend."""
        model = load_model(spec.name, dtype=spec.dtype, device=device,
                           load_in_8bit=spec.load_in_8bit,
                           allow_8bit_fallback=spec.allow_8bit_fallback,
                           attn_implementation=spec.attn_implementation)
        return cls(model, load_tokenizer(spec.name))

    def __init__(self, model, tokenizer):
        self.model = freeze(model)
        self.tokenizer = tokenizer
        self.bos = bos_ids(tokenizer)
        self.max_length = max_positions(model)
        self._checkpointed: list[torch.nn.Module] = []
        # The transformer body without its LM head: scoring and the chunked losses run it and
        # project only the positions they need onto the vocabulary (see :meth:`project`).
        self.body = model.base_model
        if self.body is model or model.get_output_embeddings() is None:
            raise InputError(f"{type(model).__name__} has no separate body and LM head; mend "
                             f"needs a causal LM (AutoModelForCausalLM).")

    def gradient_checkpointing_enable(self) -> None:
        """Recompute the LLM's layer activations during backward instead of storing them.

        transformers checkpoints a layer only while that layer is in training mode, which for
        a frozen LLM must not turn on dropout or drop KV caches. So only the decoder layers
        themselves (not their submodules) are flagged as training, and only inside passes
        that record gradients (see :meth:`_checkpointing`).
        """
        enable_checkpointing(self.model)
        self.model.eval()
        self._checkpointed = [m for m in self.model.modules()
                              if getattr(m, "gradient_checkpointing", False)]

    @contextlib.contextmanager
    def _checkpointing(self):
        on = torch.is_grad_enabled() and bool(self._checkpointed)
        for m in self._checkpointed:
            m.training = on
        try:
            yield
        finally:
            for m in self._checkpointed:
                m.training = False

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def hidden_size(self) -> int:
        return hidden_size(self.model)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of token ids: ``(B, T)`` -> ``(B, T, d)``."""
        return self.model.get_input_embeddings()(ids.to(self.device))

    def embed_context(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Real context tokens as a prefix: ``(B, P, d)`` embeddings and their ``(B, P)`` mask."""
        ids, mask = pad(seqs, self.tokenizer.pad_token_id, side="left")
        return self.embed(ids), mask.to(self.device)

    # ----------------------------------------------------------------------------------------

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               prefix: torch.Tensor | None = None, prefix_mask: torch.Tensor | None = None,
               with_prefix_last: bool = False) -> torch.Tensor:
        """Logits at the input positions, float32, in one differentiable pass.

        Args:
            input_ids: ``(B, T)``, right-padded.
            attention_mask: ``(B, T)``; 1 on real tokens. Defaults to all ones.
            prefix: ``(B, P, d)`` vectors read before the input, or None.
            prefix_mask: ``(B, P)``, left-padded; defaults to all ones.
            with_prefix_last: also return the logits of the position just before the input
                (the last prefix or bos position), so that index ``t`` predicts input token
                ``t``. Otherwise index ``t`` predicts input token ``t + 1`` (the HF convention).

        Returns:
            ``(B, T, V)``, or ``(B, T + 1, V)`` with ``with_prefix_last``.
        """
        if isinstance(prefix, Prefill):
            return self.project(self.hidden(input_ids, attention_mask, prefix,
                                            with_prefix_last=with_prefix_last))
        embeds, mask, keep = self._inputs(input_ids, attention_mask, prefix, prefix_mask,
                                          with_prefix_last)
        with self._checkpointing():
            out = self.model(inputs_embeds=embeds, attention_mask=mask,
                             position_ids=positions(mask), logits_to_keep=keep, use_cache=False)
        return out.logits.float()

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               prefix: torch.Tensor | None = None, prefix_mask: torch.Tensor | None = None,
               with_prefix_last: bool = False) -> torch.Tensor:
        """The final hidden states that :meth:`logits` would project: ``(B, T[+1], d)``.

        ``project(hidden(...))`` equals ``logits(...)``; the split lets a loss or a scorer
        project only the positions it uses, a chunk at a time, instead of forming ``(B, T, V)``
        float32 logits (Gemma's V is 262k).

        ``prefix`` may also be a :class:`Prefill` of ``B`` rows (a distiller's key/value
        prefix): the input is then read after it, differentiably.
        """
        if isinstance(prefix, Prefill):
            if len(prefix) != input_ids.shape[0]:
                raise InputError(f"The key/value prefix has {len(prefix)} rows for "
                                 f"{input_ids.shape[0]} inputs.")
            ids, mask = self._check_input(input_ids, attention_mask)
            # Not checkpointed: transformers drops a layer's cache under checkpointing, and
            # here the cache is the prefix (the pass reads only the input, so it is small).
            out = self._read_after(prefix, torch.arange(len(prefix)), ids, mask)
            return out if with_prefix_last else out[:, 1:]
        embeds, mask, keep = self._inputs(input_ids, attention_mask, prefix, prefix_mask,
                                          with_prefix_last)
        with self._checkpointing():
            out = self.body(inputs_embeds=embeds, attention_mask=mask,
                            position_ids=positions(mask), use_cache=False)
        return out.last_hidden_state[:, -keep:]

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states ``(..., d)`` to float32 logits ``(..., V)``, as the model's own head
        does it, final-logit soft-capping (Gemma 2/3) and logit scales (Cohere, Granite)
        included."""
        logits = self.model.get_output_embeddings()(hidden)
        config = self.model.config
        if getattr(config, "final_logit_softcapping", None):
            cap = config.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        if getattr(config, "logit_scale", None):
            logits = logits * config.logit_scale
        if getattr(config, "logits_scaling", None):
            logits = logits / config.logits_scaling
        return logits.float()

    def _inputs(self, input_ids, attention_mask, prefix, prefix_mask, with_prefix_last
                ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(B, H + T, d)`` embeddings, their mask, and how many trailing positions to keep."""
        input_ids, attention_mask = self._check_input(input_ids, attention_mask)
        head, head_mask = self._head(input_ids.shape[0], prefix, prefix_mask)
        if with_prefix_last and head.shape[1] == 0:
            raise InputError("with_prefix_last needs a prefix or a bos token before the input.")
        mask = torch.cat([head_mask, attention_mask], dim=1)
        self._check_length(mask.shape[1], lambda: mask.sum(-1).max())
        embeds = torch.cat([head, self.embed(input_ids)], dim=1)
        return embeds, mask, input_ids.shape[1] + int(with_prefix_last)

    def _head(self, batch: int, prefix: torch.Tensor | None, prefix_mask: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[bos | prefix]`` as one left-padded block: ``(B, H, d)`` embeds, ``(B, H)`` mask."""
        parts, masks = [], []
        if self.bos:
            bos = torch.tensor([self.bos], device=self.device).expand(batch, -1)
            parts.append(self.embed(bos))
            masks.append(torch.ones_like(bos))
        if prefix is not None and prefix.shape[1] > 0:  # zero placeholders: no prefix at all
            if (prefix.dim() != 3 or prefix.shape[0] != batch
                    or prefix.shape[-1] != self.hidden_size):
                raise InputError(f"The prefix must be (batch={batch}, P, hidden="
                                 f"{self.hidden_size}); got {tuple(prefix.shape)}.")
            parts.append(prefix.to(device=self.device, dtype=self.dtype))
            masks.append(torch.ones(prefix.shape[:2], dtype=torch.long, device=self.device)
                         if prefix_mask is None else prefix_mask.to(self.device).long())
        elif prefix is not None and (prefix.dim() != 3 or prefix.shape[0] != batch):
            raise InputError(f"The prefix must be (batch={batch}, P, hidden={self.hidden_size}); "
                             f"got {tuple(prefix.shape)}.")
        if not parts:
            return (torch.zeros(batch, 0, self.hidden_size, dtype=self.dtype, device=self.device),
                    torch.zeros(batch, 0, dtype=torch.long, device=self.device))
        embeds, mask = torch.cat(parts, dim=1), torch.cat(masks, dim=1)
        if prefix_mask is not None:
            # Move the prefix's padding in front of bos, so real tokens stay contiguous and
            # sliding-window attention (Gemma) sees the distances of an unpadded row.
            order = torch.argsort(mask, dim=1, stable=True)
            embeds = embeds.gather(1, order.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
            mask = mask.gather(1, order)
        return embeds, mask

    def prefill(self, prefix: torch.Tensor | None, prefix_mask: torch.Tensor | None = None
                ) -> Prefill:
        """Read ``[bos | prefix]`` once (``(R, P, d)``, mask ``(R, P)``) and keep its KV cache.

        Pass the result as ``prefill=`` to score or read queries after it as often as needed:
        a distilled context, or a demonstration prefix, then costs one pass in total.
        """
        if not self.bos and (prefix is None or prefix.shape[1] == 0):
            raise InputError("Nothing to prefill: this LLM has no bos token and the prefix is "
                             "empty.")
        return self._run_head(prefix, prefix_mask)

    @torch.no_grad()
    def _run_head(self, prefix: torch.Tensor | None, prefix_mask: torch.Tensor | None) -> Prefill:
        embeds, mask = self._head(1 if prefix is None else prefix.shape[0], prefix, prefix_mask)
        out = self.body(inputs_embeds=embeds, attention_mask=mask, position_ids=positions(mask),
                        use_cache=True)
        return Prefill(out.past_key_values, mask, out.last_hidden_state[:, -1])

    @torch.no_grad()
    def _continue(self, head: Prefill, index: torch.Tensor, input_ids: torch.Tensor,
                  input_mask: torch.Tensor) -> torch.Tensor:
        """:meth:`_read_after` for scoring (no gradients)."""
        return self._read_after(head, index, input_ids, input_mask)

    @torch.no_grad()
    def _extend(self, head: Prefill, index: torch.Tensor, input_ids: torch.Tensor,
                input_mask: torch.Tensor) -> tuple[torch.Tensor, Prefill]:
        """:meth:`_read_after`, and the heads extended by the inputs: a :class:`Prefill` of
        ``n`` rows, ``[head | input]``, whose ``last`` is each row's last real input position.
        A right-padded input leaves its padding inside the new head, masked, so only on a
        model without sliding-window layers are the distances after it those of an unpadded
        row (:attr:`sliding`)."""
        return self._read_after(head, index, input_ids, input_mask, extend=True)

    @property
    def sliding(self) -> bool:
        """Whether some attention layer of the LLM sees only a window of recent positions."""
        config = self.model.config.get_text_config()
        kinds = getattr(config, "layer_types", None) or []
        return any("sliding" in str(k) for k in kinds) or (
            getattr(config, "sliding_window", None) is not None
            and getattr(config, "use_sliding_window", True) is not False)

    def _read_after(self, head: Prefill, index: torch.Tensor, input_ids: torch.Tensor,
                    input_mask: torch.Tensor, extend: bool = False):
        """Final hidden states of the inputs read after cached heads, row ``i`` after head
        ``index[i]``: ``(n, T + 1, d)``, where index ``t`` predicts input token ``t`` (index 0
        is the head's last position). ``extend``: also the extended heads (:meth:`_extend`)."""
        index = index.to(self.device)
        if head.from_distiller:  # tensors that may carry gradients: a fresh cache of them
            cache = fresh_cache(head, index, self.model.config)
        else:
            cache = copy.deepcopy(head.cache)  # the forward pass appends to it
            cache.batch_select_indices(index)
        head_mask = head.mask.index_select(0, index.to(head.mask.device)).to(self.device)
        input_ids, input_mask = input_ids.to(self.device), input_mask.to(self.device)
        mask = torch.cat([head_mask, input_mask], dim=1)
        pos = head.positions(index).to(self.device) + positions(input_mask)
        self._check_length(head_mask.shape[1] + input_mask.shape[1], lambda: pos.max() + 1)
        bias = bias_rows(head, index)
        with attention.kernel(self.model) if bias is not None else contextlib.nullcontext():
            out = self.body(input_ids=input_ids, attention_mask=mask, position_ids=pos,
                            past_key_values=cache, use_cache=True,
                            **({} if bias is None else {"key_bias": bias}))
        hidden = torch.cat([head.last.index_select(0, index.to(head.last.device)).unsqueeze(1)
                            .to(out.last_hidden_state.device, out.last_hidden_state.dtype),
                            out.last_hidden_state], 1)
        if not extend:
            return hidden
        lengths = input_mask.sum(-1)
        return hidden, Prefill(cache, mask, hidden[torch.arange(len(lengths)), lengths],
                               pos[:, 0] + lengths, bias)

    def _check_input(self, input_ids, attention_mask):
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise InputError(f"input_ids must be (batch, length>0); got {tuple(input_ids.shape)}.")
        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            return input_ids, torch.ones_like(input_ids)
        return input_ids, attention_mask.to(self.device).long()

    def _check_length(self, width: int, longest: Callable[[], torch.Tensor] | None = None
                      ) -> None:
        """Refuse a row longer than the LLM's positions. ``width`` bounds every row's length
        from the shapes alone; only past the limit is ``longest()`` read from the device,
        a host sync that every forward pass would otherwise pay."""
        if self.max_length is None or width <= self.max_length:
            return
        length = width if longest is None else int(longest())
        if length > self.max_length:
            raise InputError(
                f"A row needs {length} positions but the LLM takes at most {self.max_length} "
                f"(max_position_embeddings). Shorten the queries or context, or use fewer "
                f"placeholders.")
