"""The training-free equal-memory baselines: ICL's own KV cache of the demonstrations,
compacted to ``1 + l`` positions per layer and head by a named compaction
(:class:`~mend.core.kv_compress.KVCompressor`).

    mend eval --config configs/reproduce/cpu/eval.yaml method=kv_compress num_placeholders=16 \
        compaction=attention_matching

With a distiller's ``l`` it holds exactly as many positions as that distiller's key/value
prefix, so a trained distiller that scores below it has not earned its training.
"""

from __future__ import annotations

from collections.abc import Sequence

from mend.core.context import DistilledContext
from mend.core.kv_compress import KVCompressor
from mend.core.refine import refine_each
from mend.methods.base import LLMOnly, Prefix
from mend.methods.registry import register_method


class KVCompress(LLMOnly):
    name = "kv_compress"
    reads_context = True
    reads_demos = True
    compressor: KVCompressor
    refine_steps: int = 0

    @classmethod
    def load(cls, cfg, device=None, llm=None) -> KVCompress:
        method = super().load(cfg, device, llm)
        method.compressor = KVCompressor(method.llm, method.format, cfg.num_placeholders or 16,
                                         compaction=cfg.compaction or "attention_cut")
        method.refine_steps = cfg.refine_steps
        return method

    def prefix(self, demo_sets: Sequence[Sequence[tuple[str, str]]],
               contexts: Sequence[Sequence[int]]) -> Prefix:
        ctx = DistilledContext(None, self.compressor.from_ids(contexts))
        return refine_each(self.llm, self.format, ctx, demo_sets, self.refine_steps).prefill


register_method("kv_compress", load=KVCompress.load, needs="llm")
