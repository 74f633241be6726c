"""A distilled context where people already serve models: the keyword arguments of a plain
transformers forward or ``generate`` (:func:`hf_inputs`), and the prompt embeddings serving
engines take (:func:`prompt_embeds`: vLLM's ``prompt_embeds``, SGLang's ``input_embeds``).

    inputs = compressor.hf_inputs(ctx, ["a joyless film", "great fun"])
    with inputs.biased(model):              # a no-op unless the compaction fitted a bias
        out = model.generate(**inputs, max_new_tokens=8)
    new_tokens = out[:, inputs["input_ids"].shape[1]:]

``model`` is the user's own ``AutoModelForCausalLM`` of the frozen LLM's weights. The rows
continue exactly as mend's own :meth:`~mend.core.context.ServesContext.score` and
``generate`` read them: the query ``demo_sep + text`` in the LLM's ids, left-padded for a
batch, after the context. Tested with transformers 5.23, public classes only
(``DynamicCache``).
"""

from __future__ import annotations

import base64
import contextlib
import io
from collections.abc import Sequence
from typing import Protocol

import torch

from mend.core import attention, kv_cache
from mend.core.kv_cache import Prefill
from mend.core.prefix_lm import PrefixLM
from mend.core.text import DemoFormat, encode, pad, positions
from mend.errors import InputError


class Context(Protocol):
    """What these functions read of a :class:`~mend.core.context.DistilledContext` (named
    here, not imported: context.py serves these functions as methods, so it imports this
    module)."""

    vectors: torch.Tensor | None
    prefill: Prefill | None

    def __len__(self) -> int: ...


class HFInputs(dict):
    """Keyword arguments of a transformers forward or ``generate``: ``input_ids`` (the queries
    alone, or their embeddings as ``inputs_embeds``), ``attention_mask`` (the context's
    positions, then the queries'), ``position_ids`` (the queries', continuing after the
    context's), and ``past_key_values`` (a key/value context, a fresh cache each call since
    generate appends to it)."""

    key_bias: list[torch.Tensor] | None = None
    """Attention Matching's fitted bias, per layer ``(B, kv_heads, H)``, where the context
    has one: it is no keyword transformers' ``generate`` takes, so :meth:`biased` adds it."""

    def biased(self, model) -> contextlib.AbstractContextManager:
        """Run ``model``'s passes inside the block with the context's key bias, on mend's
        attention kernel (registered with transformers' ``AttentionInterface`` when mend is
        imported); a no-op for a context without one."""
        if self.key_bias is None:
            return contextlib.nullcontext()
        return attention.biased(model, self.key_bias)


def hf_inputs(llm: PrefixLM, fmt: DemoFormat, ctx: Context,
              queries: Sequence[str]) -> HFInputs:
    """The context and ``queries`` as the keyword arguments of ``model(...)`` or
    ``model.generate(...)`` (:class:`HFInputs`); see the module docs. A one-row context
    serves every query; a context of ``B`` rows pairs row ``i`` with query ``i``."""
    n = len(queries)
    if len(ctx) not in (1, n):
        raise InputError(f"The context has {len(ctx)} rows; it needs 1 or {n} (one per query).")
    ids, mask = pad(encode(llm.tokenizer, [fmt.query(q) for q in queries]),
                    llm.tokenizer.pad_token_id, side="left")
    index = torch.zeros(n, dtype=torch.long) if len(ctx) == 1 else torch.arange(n)
    if ctx.vectors is not None:  # [bos | vectors] embedded before the query's embeddings
        head, head_mask = llm._head(n, ctx.vectors.index_select(
            0, index.to(ctx.vectors.device)), None)
        full = torch.cat([head_mask, mask.to(llm.device)], 1)
        embeds = torch.cat([head, llm.embed(ids)], 1)
        # Left padding first: the padding of the queries goes before bos, as mend reads them.
        order = torch.argsort(full, dim=1, stable=True)
        return HFInputs(inputs_embeds=embeds.gather(1, order[..., None].expand_as(embeds)),
                        attention_mask=full.gather(1, order), position_ids=positions(
                            full.gather(1, order)))
    head = ctx.prefill
    if not head.from_distiller:
        raise InputError("This context holds the LLM's own cache object; pass the context "
                         "compress() returned.")
    out = HFInputs(input_ids=ids.to(llm.device),
                   attention_mask=torch.cat([head.mask.index_select(0, index.to(
                       head.mask.device)).to(llm.device), mask.to(llm.device)], 1),
                   position_ids=(head.positions(index) + positions(mask).to(
                       head.mask.device)).to(llm.device),
                   past_key_values=kv_cache.fresh_cache(head, index, llm.model.config))
    out.key_bias = kv_cache.bias_rows(head, index)
    return out


def prompt_embeds(llm: PrefixLM, fmt: DemoFormat, ctx: Context,
                  queries: Sequence[str]) -> list[torch.Tensor]:
    """One ``(seq_len, hidden_size)`` tensor per query, in the LLM's dtype: ``[bos | the
    context's vectors | the query's token embeddings]``, unpadded, as vLLM's ``prompt_embeds``
    (offline ``LLM(..., enable_prompt_embeds=True)``) and SGLang's ``input_embeds`` take a
    prompt. Only an ``output: embeddings`` context fits: no serving engine takes an external
    key/value prefix."""
    if ctx.vectors is None:
        raise InputError("prompt_embeds needs an `output: embeddings` distiller's context: "
                         "serving engines take prompt embeddings, not a key/value prefix. For "
                         "a key/value context use hf_inputs() with transformers, or train an "
                         "embeddings distiller (docs/serving.md).")
    inputs = hf_inputs(llm, fmt, ctx, queries)
    return [row[m.bool()].detach() for row, m in zip(inputs["inputs_embeds"],
                                                    inputs["attention_mask"])]


def to_base64(embeds: torch.Tensor) -> str:
    """A ``(seq_len, hidden_size)`` tensor as vLLM's OpenAI-compatible server takes it in
    ``extra_body={"prompt_embeds": ...}``: ``torch.save``d, base64-encoded."""
    buffer = io.BytesIO()
    torch.save(embeds.detach().cpu(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("utf-8")
