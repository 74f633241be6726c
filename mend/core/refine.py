"""Refinement at compress time: a few gradient steps on one compressed context, against ICL.

A distiller amortises: one forward pass turns any demonstrations into a prefix. A prefix can
also be optimised for one demonstration set (as Cartridges optimises a cache per corpus);
this module does both, starting from the distiller's prefix and taking ``steps`` Adam steps
on the prefix alone (the distiller and the LLM stay frozen).

The target is the ICL teacher on the demonstrations themselves, leave-one-out: for each
demonstration ``j``, the teacher is the frozen LLM reading the *other* demonstrations and
then ``j``; the student reads the prefix and then ``j``. The loss is the teacher-to-student
KL at every token of ``j`` (:func:`~mend.core.losses.chunked_kl_distill`), averaged over the
demonstrations. Leaving ``j`` out of the teacher's context means the prefix is pushed towards
what the demonstrations teach about a new input, not towards reciting ``j``.

It costs ``steps`` forward and backward passes of the LLM over the demonstrations, once per
context; the context then serves every query at the prefix's usual cost.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from mend.core.context import DistilledContext
from mend.core.kv_cache import Prefill, select_rows
from mend.core.losses import chunked_kl_distill
from mend.core.prefix_lm import PrefixLM
from mend.core.text import DemoFormat, Demos, encode, pad
from mend.errors import InputError

REFINE_LR = 1e-2
"""Adam's step size on the prefix (the distiller's keys and values or vectors)."""

MAX_STEPS = 10_000
"""The most refinement steps a context takes: far past where refinement stops helping
(docs/results.md: 20 steps recover most of it), and hours per context on a CPU."""


def check_steps(steps: object) -> int:
    """``steps`` when it is a whole number in ``0..MAX_STEPS``, checked before any work."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= MAX_STEPS:
        raise InputError(f"refine_steps must be a whole number from 0 to {MAX_STEPS}, got "
                         f"{steps!r:.40}.")
    return steps


def refine(llm: PrefixLM, fmt: DemoFormat, prefix: torch.Tensor | Prefill, demos: Demos,
           steps: int, lr: float = REFINE_LR, rows_per_step: int = 16
           ) -> torch.Tensor | Prefill:
    """One context (a one-row prefix) refined on its own demonstrations.

    Args:
        llm: the frozen LLM the prefix is for.
        fmt: the separators the demonstrations are read with.
        prefix: ``(1, l, d)`` vectors, or a one-row key/value :class:`Prefill`.
        demos: the demonstrations it was compressed from (two or more).
        steps: Adam steps; 0 returns the prefix unchanged.
        rows_per_step: demonstrations per step; more are taken in turn.

    Returns:
        The refined prefix, of the same kind and shape, detached.
    """
    if steps == 0:
        return prefix
    texts = fmt.demo_texts(demos)
    if len(texts) < 2:
        raise InputError("Refinement holds each demonstration out of the teacher's context in "
                         "turn, so it needs two or more demonstrations; use refine_steps=0.")
    tok = llm.tokenizer
    inputs = encode(tok, [fmt.query(t) for t in texts])
    contexts = [sum(encode(tok, fmt.pieces(texts[:j] + texts[j + 1:])), []) for j in
                range(len(texts))]
    params, student_prefix = _leaves(prefix)
    optimizer = torch.optim.Adam(params, lr=lr)
    # The teacher does not depend on the prefix: one pass over every demonstration, kept.
    batches = [list(range(i, min(i + rows_per_step, len(texts))))
               for i in range(0, len(texts), rows_per_step)]
    targets = []
    with torch.no_grad():
        for rows in batches:
            ids, mask = pad([inputs[j] for j in rows], tok.pad_token_id)
            ctx, ctx_mask = llm.embed_context([contexts[j] for j in rows])
            targets.append((ids, mask, llm.hidden(ids, mask, prefix=ctx, prefix_mask=ctx_mask,
                                                  with_prefix_last=True)[:, :-1]))
    with torch.enable_grad():
        for step in tqdm(range(steps), desc="refine", leave=False, dynamic_ncols=True,
                         disable=steps < 50):
            ids, mask, teacher = targets[step % len(targets)]
            student = llm.hidden(ids, mask, prefix=student_prefix(len(ids)),
                                 with_prefix_last=True)[:, :-1]
            loss = chunked_kl_distill(llm.project, student, teacher, mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return student_prefix(None)


def refine_each(llm: PrefixLM, fmt: DemoFormat, ctx: DistilledContext,
                demo_sets: Sequence[Demos], steps: int) -> DistilledContext:
    """Each row of a compressed context refined on its own demonstration set (:func:`refine`);
    ``ctx`` unchanged when ``steps`` is 0."""
    if not check_steps(steps):
        return ctx
    return DistilledContext.cat([DistilledContext.of(refine(llm, fmt, ctx[i].prefix, demos,
                                                            steps))
                                 for i, demos in enumerate(demo_sets)])


def _leaves(prefix: torch.Tensor | Prefill):
    """The prefix's tensors as leaves to optimise, and ``rows -> prefix`` (``rows`` copies of
    the one row, still differentiable; None: the one row, detached)."""
    if isinstance(prefix, Prefill):
        if len(prefix) != 1 or not prefix.from_distiller:
            raise InputError("Refinement takes one context at a time, as a key/value prefix "
                             "of one row.")
        layers = [(_leaf(k), _leaf(v)) for k, v in prefix.cache]
        # Attention Matching's fitted key biases are part of the prefix: refined with it.
        bias = None if prefix.bias is None else [_leaf(b) for b in prefix.bias]

        def as_prefix(rows: int | None) -> Prefill:
            if rows is None:
                return Prefill([(k.detach(), v.detach()) for k, v in layers], prefix.mask,
                               prefix.last, prefix.offset,
                               None if bias is None else [b.detach() for b in bias])
            whole = Prefill(layers, prefix.mask, prefix.last, prefix.offset, bias)
            return select_rows(whole, torch.zeros(rows, dtype=torch.long))

        return [t for pair in layers for t in pair] + (bias or []), as_prefix
    if prefix.dim() != 3 or prefix.shape[0] != 1:
        raise InputError(f"Refinement takes one context at a time, (1, l, d); got "
                         f"{tuple(prefix.shape)}.")
    vectors = _leaf(prefix)

    def as_vectors(rows: int | None) -> torch.Tensor:
        return vectors.detach() if rows is None else vectors.expand(rows, -1, -1)

    return [vectors], as_vectors


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()
