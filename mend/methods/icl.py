"""Vanilla in-context learning: the demonstrations' LLM tokens, then the query.

The context's tokens become the prefix; scoring runs them once and reuses their KV cache for
every query and option that shares them.
"""

from __future__ import annotations

from collections.abc import Sequence

from mend.methods.base import LLMOnly, Prefix
from mend.methods.registry import register_method


class ICL(LLMOnly):
    name = "icl"
    reads_context = True
    reads_demos = True

    def prefix(self, demo_sets: Sequence[Sequence[tuple[str, str]]],
               contexts: Sequence[Sequence[int]]) -> Prefix:
        return self.llm.embed_context(contexts)


register_method("icl", load=ICL.load, needs="llm")
