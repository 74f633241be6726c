"""Scoring, next-token logits and generation after a prefix: the read-only uses of
:class:`~mend.core.prefix_lm.PrefixLM`, which inherits them.

A context (``[bos | prefix]``) is run once and every row continues from its KV cache: one
distilled context serves all queries and options, and a context per query serves all that
query's options. Where it reads fewer tokens without more passes, each query's stem (its
prompt, and the separator its options start with) is read once too, and its options continue
from the stem's cache. Every method returns float32 results on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mend.core.kv_cache import Prefill
from mend.core.text import pad, positions
from mend.errors import InputError


class Scoring:
    """Mixed into :class:`~mend.core.prefix_lm.PrefixLM`; uses its layout (``_head``,
    ``_run_head``, ``_continue``) and forward pass (``body``, ``hidden``, ``project``)."""

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
        shared, has_context = self._context_rows(prefix, prefill, len(groups))
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
        stems = _stems(rows) if reuse and not self.sliding else None
        if stems is not None and _stems_pay(rows, stems, batch_size):
            nll = self._score_by_stem(shared_head, prefix, prefix_mask, shared, rows, stems,
                                      batch_size)
            return _per_query(nll, groups)
        nll = torch.empty(len(rows))
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            ids, mask = pad([r[1] for r in chunk], self.tokenizer.pad_token_id)
            index = torch.tensor([0 if shared else r[0] for r in chunk])
            if reuse:
                hidden = self._after_heads(shared_head, prefix, prefix_mask, index, ids, mask)
            else:
                hidden = self.hidden(ids, mask, *_rows(prefix, prefix_mask, index),
                                     with_prefix_last=has_context)
            # Only the target tokens' predictors are projected onto the vocabulary, and the
            # batch's NLLs come back in one transfer.
            row, col = _target_positions([(len(seq), n) for _, seq, n in chunk])
            nll[start:start + len(chunk)] = self._mean_nll(
                hidden[row, col - shift], ids[row, col], [n for _, _, n in chunk])
        return _per_query(nll, groups)

    def _mean_nll(self, states: torch.Tensor, targets: torch.Tensor | Sequence[int],
                  lengths: Sequence[int]) -> torch.Tensor:
        """Each row's mean NLL of its target tokens, on the CPU: ``states`` ``(N, d)`` are the
        predictors of the ``N`` target tokens ``targets``, row after row, ``lengths[r]`` of
        row ``r``. Only these positions are projected onto the vocabulary, and the rows' NLLs
        come back in one transfer."""
        token_nll = F.cross_entropy(self.project(states),
                                    torch.as_tensor(targets, device=states.device),
                                    reduction="none")
        n = torch.tensor(list(lengths), device=token_nll.device)
        row = torch.repeat_interleave(torch.arange(len(n), device=n.device), n)
        per_row = torch.zeros(len(n), device=n.device).index_add_(0, row, token_nll)
        return (per_row / n).cpu()

    def _score_by_stem(self, shared_head: Prefill | None, prefix: torch.Tensor | None,
                       prefix_mask: torch.Tensor | None, shared: bool,
                       rows: Sequence[tuple[int, list[int], int]],
                       stems: Sequence[tuple[int, tuple[int, ...]]], batch_size: int
                       ) -> torch.Tensor:
        """:meth:`score_pairs`'s NLLs, each query's *stem* read once: the tokens its rows share
        (:func:`_stems`: the prompt, and the separator its options start with). The stems are
        read after their heads, ``batch_size`` at a time; a row's target tokens inside its stem
        are scored from that pass, its next one from the stem's last position, and only the
        rest, where there is any, in a second pass continuing from the stem's cache.
        ``rows``: ``(query, prompt + target ids, target length)``; ``stems``: theirs."""
        keys = list(dict.fromkeys(stems))
        nll = torch.empty(len(rows))
        for start in range(0, len(keys), batch_size):
            batch = keys[start:start + batch_size]
            where = {key: j for j, key in enumerate(batch)}
            ids, mask = pad([list(stem) for _, stem in batch], self.tokenizer.pad_token_id)
            index = torch.tensor([0 if shared else q for q, _ in batch])
            head = shared_head
            if head is None:
                needed, index = torch.unique(index, return_inverse=True)
                head = self._run_head(*_rows(prefix, prefix_mask, needed))
            # Index t of a stem's row predicts its token t; the last real one, the next token.
            hidden, read = self._extend(head, index, ids, mask)
            mine = [i for i, key in enumerate(stems) if key in where]
            for part in range(0, len(mine), batch_size):
                chunk = mine[part:part + batch_size]
                local = torch.tensor([where[stems[i]] for i in chunk])
                width = [len(stems[i][1]) for i in chunk]
                rests = [rows[i][1][w:] for i, w in zip(chunk, width)]
                after = None
                if max(map(len, rests)) > 1:  # index t after the stem predicts rest token t
                    inputs = [r[:-1] for r in rests]
                    r_ids, r_mask = pad([x or [self.tokenizer.pad_token_id] for x in inputs],
                                        self.tokenizer.pad_token_id)
                    r_mask[[j for j, x in enumerate(inputs) if not x]] = 0  # reads nothing
                    after = self._continue(read, local, r_ids, r_mask)
                states, targets = [], []
                for j, i in enumerate(chunk):
                    seq, n = rows[i][1], rows[i][2]
                    first = len(seq) - n  # the first target token's index in the row
                    inside = hidden[local[j], first:width[j]]  # target tokens in the stem
                    beyond = (read.last[local[j]][None] if after is None
                              else after[j, :len(rests[j])])
                    states.append(torch.cat([inside, beyond.to(inside.dtype)])[-n:])
                    targets += seq[-n:]
                nll[torch.tensor(chunk)] = self._mean_nll(torch.cat(states), targets,
                                                          [rows[i][2] for i in chunk])
        return nll

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
        if any(len(p) == 0 for p in prompt_ids):
            raise InputError("next_token_logits needs non-empty prompts.")
        shared, has_head = self._context_rows(prefix, prefill, n)
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
                hidden = self._after_heads(shared_head, prefix, prefix_mask, index, ids, mask)
            else:
                ids, mask = ids.to(self.device), mask.to(self.device)
                self._check_length(mask.shape[1], lambda mask=mask: mask.sum(-1).max())
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

    def _context_rows(self, prefix: torch.Tensor | None, prefill: Prefill | None,
                      queries: int) -> tuple[bool, bool]:
        """``(shared, has_context)``: whether one context row serves every query, and whether
        anything (bos, a prefix, a prefill) is read before the inputs at all."""
        _check_prefill(prefill, prefix, queries)
        shared = len(prefill) == 1 if prefill is not None else (
            prefix is None or prefix.shape[0] == 1)
        if not shared and prefill is None and prefix.shape[0] != queries:
            raise InputError(f"The context has {prefix.shape[0]} rows; it needs 1 (shared) or "
                             f"one per query ({queries}).")
        has_context = (bool(self.bos) or (prefix is not None and prefix.shape[1] > 0)
                       or prefill is not None)
        return shared, has_context

    def _after_heads(self, shared_head: Prefill | None, prefix: torch.Tensor | None,
                     prefix_mask: torch.Tensor | None, index: torch.Tensor,
                     ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Hidden states of a batch read after its heads: the shared one, or (a context per
        query) the heads of the rows ``index`` this batch needs, each run once."""
        head = shared_head
        if head is None:
            needed, index = torch.unique(index, return_inverse=True)
            head = self._run_head(*_rows(prefix, prefix_mask, needed))
        return self._continue(head, index, ids, mask)


def _stems(rows: Sequence[tuple[int, list[int], int]]) -> list[tuple[int, tuple[int, ...]]]:
    """Each row's stem, ``(query, ids)``: the longest start its query's rows share, leaving
    every row at least one token after it (for the stem's last position to predict)."""
    by_query: dict[int, list[list[int]]] = {}
    for q, seq, _ in rows:
        by_query.setdefault(q, []).append(seq)
    stem = {}
    for q, seqs in by_query.items():
        width = min(map(len, seqs)) - 1
        for k in range(width):
            if any(seq[k] != seqs[0][k] for seq in seqs):
                width = k
                break
        stem[q] = (q, tuple(seqs[0][:width]))
    return [stem[q] for q, _, _ in rows]


PASS_TOKENS = 128
"""What a forward pass costs beyond its tokens, in tokens: a pass reads every weight of the
LLM, about as long as computing some 50 tokens on a CPU (bf16 matmul rate over memory
bandwidth) and a few hundred on a GPU; with the pass's fixed overhead, 128."""


def _stems_pay(rows: Sequence[tuple[int, list[int], int]],
               stems: Sequence[tuple[int, tuple[int, ...]]], batch_size: int) -> bool:
    """Whether reading each query's stem once (:meth:`Scoring._score_by_stem`) pays: it reads
    fewer tokens, but rows with two or more tokens after their stem need a second pass, so
    it is taken where its tokens and passes (each :data:`PASS_TOKENS`) cost less than one
    row per pair, and every stem is non-empty. ``stems``: the rows' (:func:`_stems`)."""
    if any(len(ids) == 0 for _, ids in stems):
        return False
    rests = [len(seq) - len(ids) - 1 for (_, seq, _), (_, ids) in zip(rows, stems)]
    longer = sum(r > 0 for r in rests)
    passes = -(-len(set(stems)) // batch_size) + -(-longer // batch_size)
    cost = sum(len(ids) for _, ids in set(stems)) + sum(rests) + passes * PASS_TOKENS
    plain = sum(len(seq) for _, seq, _ in rows) + -(-len(rows) // batch_size) * PASS_TOKENS
    return cost < plain


def _per_query(nll: torch.Tensor, groups: Sequence[Sequence]) -> list[torch.Tensor]:
    """The flat NLLs split back into one tensor per query."""
    out, k = [], 0
    for pairs in groups:
        out.append(nll[k:k + len(pairs)])
        k += len(pairs)
    return out


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
