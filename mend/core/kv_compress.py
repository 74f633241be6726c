"""Training-free compression of ICL's own KV cache: the baseline a distiller must beat at equal
memory.

The frozen LLM reads ``[bos | demonstrations]`` once, as ICL would. Each layer's keys and
values are then cut to ``1 + l`` positions per key/value head, the size of a MEND distiller's
key/value prefix with ``l`` placeholders:

- bos (the attention sink) is always kept;
- the other ``l`` are the positions the demonstrations' own last ``window`` tokens attend to
  most, summed over the query heads that share the key/value head and smoothed over
  neighbouring positions (SnapKV's observation window and pooling; H2O's heavy hitters when
  the window covers the whole context).

The choice depends on the demonstrations only, never on a query: compression happens once
and the result serves every query, like a distilled context. Kept keys keep the rotary
positions they were computed at, and queries continue after the context's last position, so
the LLM sees the distances it saw while reading the demonstrations.

    compressor = KVCompressor(PrefixLM(model, tokenizer), DemoFormat("\\n", "\\n\\n"), 16)
    ctx = compressor.compress([("great movie!", "positive"), ("dull plot", "negative")])
    compressor.score(ctx, ["a joyless film"], options=["positive", "negative"])
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mend.core.context import DistilledContext, ServesContext
from mend.core import kv_cache
from mend.core.kv_cache import Prefill
from mend.core.prefix_lm import PrefixLM
from mend.core.refine import refine_each
from mend.core.text import DemoFormat, Demos, encode, fit, pad, positions
from mend.errors import InputError


class KVCompressor(ServesContext):
    def __init__(self, llm: PrefixLM, fmt: DemoFormat, num_placeholders: int = 16,
                 window: int = 32, pool: int = 5, max_length: int = 1024):
        """
        Args:
            llm: the frozen LLM whose cache is cut.
            fmt: the separators the demonstrations are joined with.
            num_placeholders: ``l``; each layer and key/value head keeps bos and ``l`` more.
            window: the demonstrations' last tokens whose attention scores the positions.
            pool: width of the smoothing over neighbouring positions (odd; 1: none).
            max_length: demonstration tokens read at most (whole demonstrations, as the
                distiller's truncation rule, :func:`~mend.core.text.fit`).
        """
        if num_placeholders < 1 or window < 1 or pool < 1 or pool % 2 == 0:
            raise InputError(f"KVCompressor needs num_placeholders >= 1, window >= 1 and an odd "
                             f"pool >= 1; got {num_placeholders}, {window}, {pool}.")
        self.llm, self.format = llm, fmt
        self.num_placeholders, self.window, self.pool = num_placeholders, window, pool
        self.max_length = max_length

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
        if isinstance(demo_sets, str) or len(demo_sets) == 0:
            raise InputError("compress_batch needs a non-empty list of demonstration sets; use "
                             "compress() for a single set.")
        ctx = DistilledContext(None, self.from_ids(self.tokenize(demo_sets)))
        return refine_each(self.llm, self.format, ctx, demo_sets, refine_steps)

    @torch.no_grad()
    def from_ids(self, contexts: Sequence[Sequence[int]]) -> Prefill:
        """Contexts already in LLM ids (``R`` lists, without bos) -> a ``R``-row prefix whose
        layers hold ``(R, kv_heads, 1 + l, head_dim)`` keys and values."""
        if not any(contexts):
            raise InputError("Nothing to compress: every context is empty.")
        ids, mask = pad(contexts, self.llm.tokenizer.pad_token_id, side="left")
        embeds, mask = self.llm._head(len(contexts), self.llm.embed(ids), mask.to(self.llm.device))
        with _eager_attention(self.llm.model):
            out = self.llm.body(inputs_embeds=embeds, attention_mask=mask,
                                position_ids=positions(mask), use_cache=True,
                                output_attentions=True)
        keep = self.num_placeholders + 1  # as a distiller's prefix: its first position and l
        layers = []
        for attention, layer in zip(out.attentions, out.past_key_values.layers):
            picked = self._pick(attention, mask, keep)  # (R, kv_heads, keep)
            index = picked.unsqueeze(-1).expand(-1, -1, -1, layer.keys.shape[-1])
            layers.append((layer.keys.gather(2, index), layer.values.gather(2, index)))
        # Rows shorter than the budget keep every real position, and left padding puts their
        # padding columns first, so one mask serves every head.
        kept_mask = mask.gather(1, picked[:, 0])
        return Prefill(layers, kept_mask, out.last_hidden_state[:, -1], mask.sum(-1))

    def _pick(self, attention: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
        """The ``keep`` columns each key/value head keeps, in order.

        Args:
            attention: ``(R, heads, S, S)`` one layer's attention weights.
            mask: ``(R, S)``, left-padded, 1 on real positions (bos first).

        Returns:
            ``(R, kv_heads, keep)`` column indices, ascending (padding, if any, first).
        """
        kv_heads = kv_cache.shapes(self.llm.model.config)[1]
        r, heads, s, _ = attention.shape
        received = attention[:, :, -self.window:].float().sum(2)  # (R, heads, S)
        received = received.view(r, kv_heads, heads // kv_heads, s).sum(2)
        if self.pool > 1:
            received = F.avg_pool1d(received.reshape(r * kv_heads, 1, s), self.pool, stride=1,
                                    padding=self.pool // 2, count_include_pad=False
                                    ).view(r, kv_heads, s)
        first = mask.argmax(-1)  # bos, or the first token where the LLM has none
        received = received.masked_fill(~mask.bool()[:, None], float("-inf"))
        received.scatter_(2, first[:, None, None].expand(-1, kv_heads, 1), float("inf"))
        return received.topk(min(keep, s), dim=-1).indices.sort(-1).values


@contextlib.contextmanager
def _eager_attention(model):
    """Attention weights need the eager kernel (SDPA does not return them); the model's own
    kernel is restored after."""
    before = model.config._attn_implementation
    if before != "eager":
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if before != "eager":
            model.set_attn_implementation(before)
