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

Scoring runs the head once and continues from its KV cache: one distilled context serves all
queries and options, and a context per query serves all that query's options.

:class:`PrefixLM` is deliberately not an ``nn.Module``: modules that hold it (the Distiller)
then expose only their own trainable weights to optimizers, DDP and ``state_dict``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mend.core.backbones import enable_checkpointing, freeze, hidden_size, max_positions
from mend.errors import InputError
from mend.core.kv_cache import Prefill, fresh_cache
from mend.core.text import bos_ids, pad, positions


class PrefixLM:
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
        self._check_length(int(mask.sum(-1).max()))
        embeds = torch.cat([head, self.embed(input_ids)], dim=1)
        return embeds, mask, input_ids.shape[1] + int(with_prefix_last)

    def score_options(self, query_ids: Sequence[Sequence[int]],
                      option_ids: Sequence[Sequence[Sequence[int]]],
                      prefix: torch.Tensor | None = None, prefix_mask: torch.Tensor | None = None,
                      batch_size: int = 32, reuse_head: bool = True,
                      prefill: Prefill | None = None) -> list[torch.Tensor]:
        """Mean per-token NLL of each option after its query (MetaICL "direct" scoring).

        Args:
            query_ids: ``Q`` id lists.
            option_ids: for each query, its options' id lists.
            prefix, prefix_mask, batch_size, reuse_head, prefill: as in :meth:`score_pairs`.

        Returns:
            ``Q`` float32 tensors on the CPU, one NLL per option; lower is more likely.
        """
        if len(option_ids) != len(query_ids):
            raise InputError(f"Got {len(query_ids)} queries but {len(option_ids)} option lists.")
        return self.score_pairs([[(q, o) for o in opts] for q, opts in zip(query_ids,
                                                                           option_ids)],
                                prefix, prefix_mask, batch_size, reuse_head, prefill)

    def score_pairs(self, groups: Sequence[Sequence[tuple[Sequence[int], Sequence[int]]]],
                    prefix: torch.Tensor | None = None, prefix_mask: torch.Tensor | None = None,
                    batch_size: int = 32, reuse_head: bool = True,
                    prefill: Prefill | None = None) -> list[torch.Tensor]:
        """Mean per-token NLL of each ``target`` read after its ``prompt``, after the prefix.

        Direct scoring pairs (query, option); channel scoring pairs (option, query).

        Args:
            groups: per query ``q``, its ``(prompt ids, target ids)`` pairs.
            prefix: ``(1, P, d)`` shared by all queries, or ``(Q, P, d)``, one per query.
            prefix_mask: ``(1 or Q, P)``, left-padded; None when every position is real.
            batch_size: (prompt, target) rows per forward pass.
            reuse_head: run ``[bos | prefix]`` once and continue every row from its KV cache
                (the default); False recomputes it per row, the plain path.
            prefill: a context already read, used instead of ``prefix`` (which must then be
                None): one row (:meth:`prefill`) shared by every query, or one per query (a
                distiller's key/value prefixes).

        Returns:
            ``Q`` float32 tensors on the CPU, one NLL per pair.
        """
        _check_prefill(prefill, prefix, len(groups))
        shared = len(prefill) == 1 if prefill is not None else (
            prefix is None or prefix.shape[0] == 1)
        if not shared and prefill is None and prefix.shape[0] != len(groups):
            raise InputError(f"The context has {prefix.shape[0]} rows; it needs 1 (shared) or "
                             f"one per query ({len(groups)}).")
        has_context = (bool(self.bos) or (prefix is not None and prefix.shape[1] > 0)
                       or prefill is not None)
        shift = 0 if has_context else 1  # logits index of the predictor of input token t
        rows = []  # (query index, prompt + target ids, number of target tokens)
        for q, pairs in enumerate(groups):
            if len(pairs) == 0:
                raise InputError(f"Query {q} has no options to score.")
            for o, (prompt, target) in enumerate(pairs):
                if len(target) == 0:
                    raise InputError(f"Option {o} of query {q} is empty after tokenization.")
                if len(prompt) - shift < 0:
                    raise InputError(f"Query {q}'s options have nothing before them to predict "
                                     f"them from: give a non-empty query or a context.")
                rows.append((q, list(prompt) + list(target), len(target)))
        reuse = reuse_head and has_context or prefill is not None
        shared_head = prefill if prefill is not None else (
            self._run_head(prefix, prefix_mask) if reuse and shared else None)
        nll = torch.empty(len(rows))
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            ids, mask = pad([r[1] for r in chunk], self.tokenizer.pad_token_id)
            index = torch.tensor([0 if shared else r[0] for r in chunk])
            if reuse:
                head = shared_head
                if head is None:  # a context per query: run the ones this chunk needs
                    needed, index = torch.unique(index, return_inverse=True)
                    head = self._run_head(*_rows(prefix, prefix_mask, needed))
                hidden = self._continue(head, index, ids, mask)
            else:
                hidden = self.hidden(ids, mask, *_rows(prefix, prefix_mask, index),
                                     with_prefix_last=has_context)
            # Only the target tokens' predictors are projected onto the vocabulary, and the
            # batch's NLLs come back in one transfer.
            row, col = _target_positions([(len(seq), n) for _, seq, n in chunk])
            target = ids[row, col].to(hidden.device)
            token_nll = F.cross_entropy(self.project(hidden[row, col - shift]), target,
                                        reduction="none")
            lengths = torch.tensor([n for _, _, n in chunk], device=token_nll.device)
            per_row = torch.zeros(len(chunk), device=token_nll.device).index_add_(
                0, row.to(token_nll.device), token_nll)
            nll[start:start + len(chunk)] = (per_row / lengths).cpu()
        out, k = [], 0
        for pairs in groups:
            out.append(nll[k:k + len(pairs)])
            k += len(pairs)
        return out

    @torch.no_grad()
    def next_token_logits(self, prompt_ids: Sequence[Sequence[int]],
                          prefix: torch.Tensor | None = None,
                          prefix_mask: torch.Tensor | None = None, batch_size: int = 32,
                          prefill: Prefill | None = None) -> torch.Tensor:
        """Float32 logits of the token after each prompt, ``(Q, V)`` on the CPU.

        The prefix is shared (``(1, P, d)``) or one per prompt (``(Q, P, d)``); a shared one is
        run once and continued from its KV cache. Prompts are batched by length, and only the
        positions a batch needs are turned into logits. ``prefill`` is a shared prefix already
        read (:meth:`prefill`), used instead of ``prefix``.
        """
        n = len(prompt_ids)
        _check_prefill(prefill, prefix, n)
        if any(len(p) == 0 for p in prompt_ids):
            raise InputError("next_token_logits needs non-empty prompts.")
        shared = len(prefill) == 1 if prefill is not None else (
            prefix is None or prefix.shape[0] == 1)
        if not shared and prefill is None and prefix.shape[0] != n:
            raise InputError(f"The context has {prefix.shape[0]} rows; it needs 1 or {n}.")
        has_head = (bool(self.bos) or (prefix is not None and prefix.shape[1] > 0)
                    or prefill is not None)
        shared_head = prefill if prefill is not None else (
            self._run_head(prefix, prefix_mask) if has_head and shared else None)
        out = None
        order = sorted(range(n), key=lambda i: len(prompt_ids[i]))
        for start in range(0, n, batch_size):
            rows = order[start:start + batch_size]
            ids, mask = pad([prompt_ids[i] for i in rows], self.tokenizer.pad_token_id)
            last = mask.sum(-1)  # index of each row's last prompt position, after the head's
            index = torch.tensor([0 if shared else i for i in rows])
            if has_head:
                head = shared_head
                if head is None:
                    needed, index = torch.unique(index, return_inverse=True)
                    head = self._run_head(*_rows(prefix, prefix_mask, needed))
                hidden = self._continue(head, index, ids, mask)
            else:
                ids, mask = ids.to(self.device), mask.to(self.device)
                self._check_length(int(mask.sum(-1).max()))
                hidden = self.body(input_ids=ids, attention_mask=mask,
                                   position_ids=positions(mask)).last_hidden_state
                last = last - 1
            picked = self.project(hidden[torch.arange(len(rows)), last.to(hidden.device)]).cpu()
            if out is None:
                out = torch.empty(n, picked.shape[-1])
            out[torch.tensor(rows)] = picked
        return out

    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[Sequence[int]], prefix: torch.Tensor | None = None,
                 prefix_mask: torch.Tensor | None = None, max_new_tokens: int = 32,
                 do_sample: bool = False, **generate_kwargs) -> list[list[int]]:
        """Greedy or sampled continuation of each prompt after the prefix.

        Rows are left-padded as a whole for generation, so every row ends at the last column.
        ``prefix`` is ``(1, P, d)`` shared, or ``(B, P, d)`` one per prompt. Returns the new
        token ids of each row, cut before the first EOS. After a distiller's key/value prefix
        (a :class:`Prefill`) decoding is greedy, reading each row again per new token.
        """
        n = len(prompt_ids)
        if isinstance(prefix, Prefill):
            if do_sample:
                raise InputError("Sampling after a key/value prefix is not supported; use "
                                 "do_sample=False (greedy).")
            return self._greedy_after(prefix, prompt_ids, max_new_tokens)
        if prefix is not None and prefix.shape[0] not in (1, n):
            raise InputError(f"The context has {prefix.shape[0]} rows; it needs 1 or {n}.")
        rows = []  # each row's real embeddings, bos + prefix + prompt, before padding
        for i, ids in enumerate(prompt_ids):
            r = 0 if prefix is None or prefix.shape[0] == 1 else i
            head, head_mask = self._head(1, *_rows(prefix, prefix_mask, torch.tensor([r])))
            body = self.embed(torch.tensor([list(ids)], dtype=torch.long))[0]
            rows.append(torch.cat([head[0][head_mask[0].bool()], body]))
        width = max(r.shape[0] for r in rows)
        self._check_length(width + max_new_tokens)
        embeds = rows[0].new_zeros(n, width, rows[0].shape[-1])
        mask = torch.zeros(n, width, dtype=torch.long, device=self.device)
        for i, r in enumerate(rows):
            embeds[i, width - r.shape[0]:] = r
            mask[i, width - r.shape[0]:] = 1
        eos = self.tokenizer.eos_token_id
        out = self.model.generate(inputs_embeds=embeds, attention_mask=mask,
                                  max_new_tokens=max_new_tokens, do_sample=do_sample,
                                  pad_token_id=self.tokenizer.pad_token_id, eos_token_id=eos,
                                  **generate_kwargs)
        return [seq[:seq.index(eos)] if eos in seq else seq for seq in out.tolist()]

    def _greedy_after(self, head: Prefill, prompt_ids: Sequence[Sequence[int]],
                      max_new_tokens: int) -> list[list[int]]:
        if len(head) not in (1, len(prompt_ids)):
            raise InputError(f"The context has {len(head)} rows; it needs 1 or "
                             f"{len(prompt_ids)}.")
        eos, out = self.tokenizer.eos_token_id, []
        for i, prompt in enumerate(prompt_ids):
            seq, new = list(prompt), []
            index = torch.tensor([0 if len(head) == 1 else i])
            for _ in range(max_new_tokens):
                if seq:
                    ids = torch.tensor([seq])
                    last = self._continue(head, index, ids, torch.ones_like(ids))[0, -1]
                else:  # nothing read yet: the head's last position predicts the first token
                    last = head.last[index.to(head.last.device)][0]
                token = int(self.project(last).argmax())
                if token == eos:
                    break
                seq.append(token)
                new.append(token)
            out.append(new)
        return out

    # ----------------------------------------------------------------------------------------

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

    def _read_after(self, head: Prefill, index: torch.Tensor, input_ids: torch.Tensor,
                    input_mask: torch.Tensor) -> torch.Tensor:
        """Final hidden states of the inputs read after cached heads, row ``i`` after head
        ``index[i]``: ``(n, T + 1, d)``, where index ``t`` predicts input token ``t`` (index 0
        is the head's last position)."""
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
        self._check_length(int(pos.max()) + 1)
        out = self.body(input_ids=input_ids, attention_mask=mask, position_ids=pos,
                        past_key_values=cache, use_cache=True)
        return torch.cat([head.last.index_select(0, index.to(head.last.device)).unsqueeze(1)
                          .to(out.last_hidden_state.device, out.last_hidden_state.dtype),
                          out.last_hidden_state], 1)

    def _check_input(self, input_ids, attention_mask):
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise InputError(f"input_ids must be (batch, length>0); got {tuple(input_ids.shape)}.")
        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            return input_ids, torch.ones_like(input_ids)
        return input_ids, attention_mask.to(self.device).long()

    def _check_length(self, length: int) -> None:
        if self.max_length is not None and length > self.max_length:
            raise InputError(
                f"A row needs {length} positions but the LLM takes at most {self.max_length} "
                f"(max_position_embeddings). Shorten the queries or context, or use fewer "
                f"placeholders.")


def _rows(prefix: torch.Tensor | None, prefix_mask: torch.Tensor | None, index: torch.Tensor
          ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The prefix rows ``index`` (row 0 again and again for a shared prefix)."""
    if prefix is None:
        return None, None
    index = index if prefix.shape[0] > 1 else torch.zeros_like(index)
    return (prefix.index_select(0, index.to(prefix.device)),
            None if prefix_mask is None else prefix_mask.index_select(0, index.to(
                prefix_mask.device)))


def _check_prefill(prefill: Prefill | None, prefix: torch.Tensor | None, queries: int) -> None:
    if prefill is None:
        return
    if prefix is not None:
        raise InputError("Give a prefix or a prefill, not both: the prefill already holds its "
                         "prefix.")
    if len(prefill) != 1 and len(prefill) != queries:
        raise InputError(f"A prefill serves every query when it has one row, or one query "
                         f"per row; this one has {len(prefill)} rows for {queries} queries.")


def _target_positions(rows: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows ``(length, n targets)``, the (row, column) of every target token, flattened:
    the last ``n`` real tokens of each row."""
    row = torch.cat([torch.full((n,), j) for j, (_, n) in enumerate(rows)])
    col = torch.cat([torch.arange(length - n, length) for length, n in rows])
    return row, col
