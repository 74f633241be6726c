"""Training-free compaction of ICL's own KV cache: the baselines a distiller must beat at
equal memory.

The frozen LLM reads ``[bos | demonstrations]`` once, as ICL would (and, for the compactions
that need it, the demonstrations again after them: :mod:`mend.core.compaction`). Each layer's
keys and values are then cut to ``1 + l`` positions per key/value head, the size of a MEND
distiller's key/value prefix with ``l`` placeholders, by one of the named compactions:

- ``attention_cut`` (the default): the positions the demonstrations' own last tokens attend
  to most (SnapKV);
- ``kvzip``: the positions the LLM attends to most while reading the demonstrations again
  (KVzip);
- ``attention_matching`` and ``kvzip_matching``: those keys, with a fitted bias each and
  least-squares values, so the kept positions carry the attention mass and output of all of
  them (Attention Matching).

bos (the attention sink) is always kept. The choice depends on the demonstrations only, never
on a query: compression happens once and the result serves every query, like a distilled
context. Kept keys keep the rotary positions they were computed at, and queries continue
after the context's last position, so the LLM sees the distances it saw while reading the
demonstrations.

    compressor = KVCompressor(PrefixLM(model, tokenizer), DemoFormat("\\n", "\\n\\n"), 16,
                              compaction="attention_matching")
    ctx = compressor.compress([("great movie!", "positive"), ("dull plot", "negative")])
    compressor.score(ctx, ["a joyless film"], options=["positive", "negative"])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mend.core import compaction as compactions
from mend.core import context
from mend.core.compaction import Compaction
from mend.core.context import DistilledContext, ServesContext
from mend.core.kv_cache import Prefill
from mend.core.prefix_lm import PrefixLM
from mend.core.refine import check_steps, refine_each
from mend.core.text import DemoFormat, Demos, encode, fit
from mend.errors import InputError


class KVCompressor(ServesContext):
    def __init__(self, llm: PrefixLM, fmt: DemoFormat, num_placeholders: int = 16,
                 compaction: str | Compaction = "attention_cut", max_length: int = 1024):
        """
        Args:
            llm: the frozen LLM whose cache is cut.
            fmt: the separators the demonstrations are joined with.
            num_placeholders: ``l``; each layer and key/value head keeps bos and ``l`` more.
            compaction: a name in :data:`mend.core.compaction.COMPACTIONS`, or a
                :class:`~mend.core.compaction.Compaction`.
            max_length: demonstration tokens read at most (whole demonstrations, as the
                distiller's truncation rule, :func:`~mend.core.text.fit`).
        """
        if isinstance(num_placeholders, bool) or not isinstance(num_placeholders, int) \
                or num_placeholders < 1:
            raise InputError(f"KVCompressor needs num_placeholders >= 1, got "
                             f"{num_placeholders!r}.")
        self.llm, self.format = llm, fmt
        self.num_placeholders, self.max_length = num_placeholders, max_length
        self.compaction = (compaction if isinstance(compaction, Compaction)
                           else compactions.get(compaction))
        self._prompt = (compactions.prompt_ids(llm.tokenizer, fmt)
                        if self.compaction.needs_repeat else None)

    def tokenize(self, demo_sets: Sequence[Demos]) -> list[list[int]]:
        """Each set's LLM ids, as ICL reads them (bos is added when they are read)."""
        return [fit(encode(self.llm.tokenizer, self.format.pieces(d)), self.max_length)[0]
                for d in demo_sets]

    @torch.no_grad()
    def compress(self, demos: Demos, refine_steps: int = 0) -> DistilledContext:
        """One demonstration set as a key/value prefix of ``1 + l`` positions; with
        ``refine_steps``, then optimised against ICL as a distiller's can be
        (:func:`mend.core.refine.refine`: Cartridges started from a cut cache)."""
        return self.compress_batch([demos], refine_steps)

    @torch.no_grad()
    def compress_batch(self, demo_sets: Sequence[Demos], refine_steps: int = 0
                       ) -> DistilledContext:
        demo_sets = context.demo_sets(demo_sets)
        check_steps(refine_steps)
        ctx = DistilledContext(None, self.from_ids(self.tokenize(demo_sets)))
        return refine_each(self.llm, self.format, ctx, demo_sets, refine_steps)

    @torch.no_grad()
    def from_ids(self, contexts: Sequence[Sequence[int]]) -> Prefill:
        """Contexts already in LLM ids (``R`` lists, without bos) -> a ``R``-row prefix whose
        layers hold ``(R, kv_heads, 1 + l, head_dim)`` keys and values."""
        if not any(contexts):
            raise InputError("Nothing to compress: every context is empty.")
        bos = self.llm.bos
        ids, mask, width = compactions.layout([bos + list(c) for c in contexts], len(bos),
                                              self._prompt, self.llm.tokenizer.pad_token_id)
        return compactions.compact(self.llm.body, self.llm.embed(ids), mask.to(self.llm.device),
                                   width, self.compaction, self.num_placeholders + 1)
