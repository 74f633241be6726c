"""Zero-shot: the frozen LLM reads the query alone (no demonstrations, no separator)."""

from __future__ import annotations

from collections.abc import Sequence

from mend.methods.base import Prefix
from mend.core.prefix_lm import PrefixLM
from mend.core.text import DemoFormat


class ZeroShot:
    name = "zero_shot"
    reads_context = False
    reads_demos = False

    def __init__(self, llm: PrefixLM, fmt: DemoFormat):
        self.llm, self.format = llm, fmt

    def prefix(self, demo_sets: Sequence[Sequence[tuple[str, str]]],
               contexts: Sequence[Sequence[int]]) -> Prefix:
        return None, None
