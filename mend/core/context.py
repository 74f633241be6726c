"""A compressed context and what every compressor serves with it: scoring and generation.

A compressor (the trained :class:`~mend.core.distiller.Distiller`, or the training-free
:class:`~mend.core.kv_compress.KVCompressor`) turns demonstrations into a
:class:`DistilledContext` once; :class:`ServesContext` then reads any number of queries after
it through the frozen LLM. Both need only ``self.llm`` (a :class:`PrefixLM`) and
``self.format`` (the separators).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from mend.core import interop, kv_cache
from mend.core.kv_cache import Prefill
from mend.core.prefix_lm import PrefixLM
from mend.core.text import DemoFormat, encode
from mend.errors import InputError


@dataclass
class DistilledContext:
    """Distilled demonstrations, one row per demonstration set.

    A context of one row serves any number of queries; a context of ``B`` rows pairs row ``i``
    with query ``i``.
    """

    vectors: torch.Tensor | None
    """``(B, l, d_llm)`` input embeddings for the LLM; None with ``output: kv``."""
    prefill: Prefill | None = field(default=None, repr=False, compare=False)
    """The LLM's KV cache of the context. With ``output: kv`` it *is* the context (the
    distiller's keys and values, ``B`` rows); otherwise the first :meth:`Distiller.score` of
    a one-row context makes it, and every later one reuses it."""

    def __len__(self) -> int:
        return len(self.prefill) if self.vectors is None else self.vectors.shape[0]

    @property
    def prefix(self) -> torch.Tensor | Prefill:
        """What the LLM reads the queries after: the vectors, or the key/value prefix."""
        return self.prefill if self.vectors is None else self.vectors

    @classmethod
    def of(cls, prefix: torch.Tensor | Prefill) -> DistilledContext:
        """The context whose :attr:`prefix` is ``prefix``."""
        return cls(None, prefix) if isinstance(prefix, Prefill) else cls(prefix)

    @classmethod
    def cat(cls, contexts: Sequence[DistilledContext]) -> DistilledContext:
        """Contexts of the same kind and width, stacked row-wise."""
        if contexts[0].vectors is None:
            return cls(None, kv_cache.cat_rows([c.prefill for c in contexts]))
        return cls(torch.cat([c.vectors for c in contexts]))

    def __getitem__(self, index: int | slice) -> DistilledContext:
        rows = torch.arange(len(self))[index].reshape(-1)
        if self.vectors is None:
            return DistilledContext(None, kv_cache.select_rows(self.prefill, rows))
        return DistilledContext(self.vectors.index_select(0, rows.to(self.vectors.device)))


class ServesContext:
    """Scoring and generation after a :class:`DistilledContext`, mixed into compressors."""

    llm: PrefixLM
    format: DemoFormat

    @torch.no_grad()
    def score(self, ctx: DistilledContext, queries: Sequence[str],
              options: Sequence[str] | Sequence[Sequence[str]], batch_size: int = 32
              ) -> list[list[float]]:
        """Mean per-token NLL of each option after each query (lower is more likely).

        Args:
            ctx: from :meth:`compress` (one row, shared) or :meth:`compress_batch` (a row per
                query).
            queries: query texts.
            options: one list of option strings shared by every query, or a list per query.
        """
        _check_context(ctx)
        queries = _strings(queries, "queries")
        count(batch_size, "batch_size")
        if isinstance(options, str):
            raise InputError(f"`options` must be a list of option strings, got the string "
                             f"{options!r:.80}: wrap it in a list.")
        if not isinstance(options, (list, tuple)):
            raise InputError(f"`options` must be a list of option strings (or a list of them "
                             f"per query), got {_what(options)}.")
        if len(options) > 0 and all(isinstance(o, str) for o in options):
            options = [options] * len(queries)
        if len(options) != len(queries):
            raise InputError(f"Got {len(queries)} queries but {len(options)} option lists.")
        tok = self.llm.tokenizer
        q_ids = encode(tok, [self.format.query(q) for q in queries])
        o_ids = [encode(tok, [self.format.option(o) for o in _options(opts)]) for opts in options]
        if ctx.vectors is None:  # a key/value prefix: the LLM continues from it directly
            scores = self.llm.score_options(q_ids, o_ids, batch_size=batch_size,
                                            prefill=ctx.prefill)
        elif len(ctx) == 1 and (self.llm.bos or ctx.vectors.shape[1]):
            # Read the vectors once, however many calls score queries after them.
            if ctx.prefill is None:
                ctx.prefill = self.llm.prefill(ctx.vectors)
            scores = self.llm.score_options(q_ids, o_ids, batch_size=batch_size,
                                            prefill=ctx.prefill)
        else:
            scores = self.llm.score_options(q_ids, o_ids, prefix=ctx.vectors,
                                            batch_size=batch_size)
        return [s.tolist() for s in scores]

    def generate(self, ctx: DistilledContext, prompts: Sequence[str], max_new_tokens: int = 32,
                 do_sample: bool = False, **generate_kwargs) -> list[str]:
        """Greedy (default) or sampled text after each prompt, read behind the vectors."""
        _check_context(ctx)
        prompts = _strings(prompts, "prompts")
        count(max_new_tokens, "max_new_tokens")
        _check_generation(ctx.vectors is None, do_sample, generate_kwargs)
        ids = encode(self.llm.tokenizer, [self.format.query(p) for p in prompts])
        out = self.llm.generate(ids, prefix=ctx.prefix, max_new_tokens=max_new_tokens,
                                do_sample=do_sample, **generate_kwargs)
        return self.llm.tokenizer.batch_decode(out, skip_special_tokens=True)


    def hf_inputs(self, ctx: DistilledContext, queries: Sequence[str]) -> interop.HFInputs:
        """The context and ``queries`` as the keyword arguments of a transformers forward or
        ``generate`` on your own model of the frozen LLM's weights (a fresh cache each call);
        see :mod:`mend.core.interop`::

            inputs = distiller.hf_inputs(ctx, ["a joyless film"])
            with inputs.biased(model):  # Attention Matching's key bias, where there is one
                out = model.generate(**inputs, max_new_tokens=8)
        """
        _check_context(ctx)
        return interop.hf_inputs(self.llm, self.format, ctx, _strings(queries, "queries"))

    def prompt_embeds(self, ctx: DistilledContext, queries: Sequence[str]
                      ) -> list[torch.Tensor]:
        """One ``(seq_len, hidden_size)`` tensor per query for a serving engine (vLLM's
        ``prompt_embeds``, SGLang's ``input_embeds``): ``output: embeddings`` only
        (:func:`mend.core.interop.prompt_embeds`; docs/serving.md)."""
        _check_context(ctx)
        return interop.prompt_embeds(self.llm, self.format, ctx, _strings(queries, "queries"))


def count(value: object, name: str, minimum: int = 1) -> int:
    """``value`` when it is a whole number >= ``minimum``; else the :class:`InputError` that
    says so (a batch size of -1 would leave results unfilled)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"`{name}` must be a whole number >= {minimum}, got {value!r:.40}.")
    return value


def demo_sets(sets: object) -> list:
    """A list of demonstration sets, refused with the type it was where it is not one."""
    if isinstance(sets, str) or not isinstance(sets, (list, tuple)) or len(sets) == 0:
        raise InputError(f"compress_batch needs a non-empty list of demonstration sets, got "
                         f"{_what(sets)}; use compress() for a single set.")
    return list(sets)


def _check_generation(key_value: bool, do_sample: bool, kwargs: dict) -> None:
    """Refuse what generation cannot honour, before it starts: a keyword transformers'
    ``generate`` does not know (a typo would be ignored), several sequences per prompt (one
    text comes back per prompt), a temperature or top_p out of range, and sampling after a
    key/value prefix (decoded greedily by mend)."""
    from transformers import GenerationConfig

    known = set(GenerationConfig().to_dict())
    unknown = sorted(set(kwargs) - known)
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        raise InputError(f"generate() got an unknown keyword `{unknown[0]}`"
                         + (f"; did you mean `{close[0]}`?" if close else ".")
                         + " It takes transformers' generation arguments (GenerationConfig).")
    if kwargs.get("num_return_sequences", 1) != 1 or kwargs.get("num_beams", 1) != 1:
        raise InputError("generate() returns one text per prompt: num_return_sequences and "
                         "num_beams must be 1 (repeat a prompt to sample it several times).")
    temperature, top_p = kwargs.get("temperature"), kwargs.get("top_p")
    if temperature is not None and not (isinstance(temperature, (int, float))
                                        and temperature > 0):
        raise InputError(f"temperature must be > 0, got {temperature!r}; for greedy decoding "
                         f"use do_sample=False.")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise InputError(f"top_p must be in (0, 1], got {top_p!r}.")
    if key_value and (do_sample or kwargs):
        raise InputError("After a key/value prefix generation is greedy: use do_sample=False "
                         "and no sampling arguments, or hf_inputs() with your own model's "
                         "generate (docs/serving.md).")


def _what(value: object) -> str:
    """A value as an error names it: its type, and its text where short."""
    if isinstance(value, (list, tuple, str)):
        return f"{type(value).__name__} {value!r:.60}"
    return f"a {type(value).__name__}"


def _check_context(ctx: object) -> None:
    if not isinstance(ctx, DistilledContext):
        raise InputError(f"`ctx` must be the DistilledContext that compress() returns, got "
                         f"{type(ctx).__name__}: call ctx = distiller.compress(demos) first.")


def _options(options: Sequence[str]) -> list[str]:
    options = _strings(options, "options")
    empty = [i for i, o in enumerate(options) if not o.strip()]
    if empty:
        raise InputError(f"Option {empty[0]} is empty: a score is a mean over the option's "
                         f"tokens, and it has none. Give every option some text.")
    return options


def _strings(items: Sequence[str], name: str) -> list[str]:
    if (isinstance(items, str) or not isinstance(items, (list, tuple)) or len(items) == 0
            or not all(isinstance(x, str) for x in items)):
        raise InputError(f"`{name}` must be a non-empty list of strings, got {_what(items)}.")
    return list(items)
