"""Zero-shot: the frozen LLM reads the query alone (no demonstrations, no separator)."""

from __future__ import annotations

from collections.abc import Sequence

from mend.methods.base import LLMOnly, Prefix
from mend.methods.registry import register_method


class ZeroShot(LLMOnly):
    name = "zero_shot"
    reads_context = False
    reads_demos = False

    def prefix(self, demo_sets: Sequence[Sequence[tuple[str, str]]],
               contexts: Sequence[Sequence[int]]) -> Prefix:
        return None, None


register_method("zero_shot", load=ZeroShot.load, needs="llm")
