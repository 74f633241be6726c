"""Content controls: do a distiller's vectors carry what it read, or only a constant prompt?

    mend diagnose out/pretrain/smollm2-wikitext     # any MEND checkpoint

On held-out text windows, each split at ``beta`` as in stage 1, the frozen LLM reading the
window's real first part is the teacher, and stage 1's objective, KL(teacher || student) on
the rest, is measured for three students:

- ``own``: the vectors the distiller makes of the window's own first part;
- ``swap``: the vectors of *another* window (window ``i`` gets window ``i - 1``'s), the
  control: vectors that
  carry nothing of this window's text do exactly as well here as the window's own;
- ``none``: no prefix at all (bos only), or one zero vector where the LLM has no bos.

``content_gain = KL_swap - KL_own``; ``content_share = content_gain / KL_swap``. A distiller
that ignores its input has a gain of 0; only vectors that depend on the text can make it
positive. ``KL_none - KL_swap`` is what a constant prefix buys.

The held-out windows are the first window of each of the first ``windows`` documents (one per
WikiText article), so that a swapped window comes from another article.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Any

import torch

from mend.config import checked
from mend.core import kv_cache
from mend.core.losses import chunked_kl_distill
from mend.core.text import pad
from mend.counters import Counters
from mend.data import Example
from mend.data.pretrain import PretrainData, TextDataConfig
from mend.errors import ConfigError

HELD_OUT = TextDataConfig(path="../shared/data/text/wikitext-2/wiki.test.tokens.gz",
                          documents="wikitext", max_length=128, windows_per_document=1)
"""WikiText-2's test split, which the shipped stage-1 configs never read (they train on
``wiki.valid.tokens.gz``)."""


@dataclass(frozen=True)
@checked
class ContentConfig:
    """Held-out text for the content controls (logged every ``train.eval_every`` steps)."""

    data: TextDataConfig | None = None
    """Where the held-out windows come from, a source training never reads (null: no
    content controls; the shipped configs name one). ``windows_per_document`` is forced to 1,
    so that every window is from another document."""
    windows: int = 32
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.windows < 2 or self.batch_size < 1:
            raise ConfigError(f"content.windows must be >= 2 (a swap needs another window) and "
                              f"content.batch_size >= 1; got {self.windows}, {self.batch_size}.")


def held_out_examples(cfg: ContentConfig, llm_tokenizer, bos: list[int]) -> list[Example]:
    """The first window of each of the first ``cfg.windows`` documents, split at beta."""
    if cfg.data is None:
        raise ConfigError("content.data is null: there is no held-out text to score.")
    data = PretrainData(replace(cfg.data, windows_per_document=1, shuffle_buffer=1),
                        llm_tokenizer, bos, seed=0, counters=Counters())
    windows = list(itertools.islice(data.in_order(), cfg.windows))
    if len(windows) < 2:
        raise ConfigError(f"content.data ({cfg.data.path}) gave {len(windows)} window(s) of at "
                          f"least {cfg.data.min_length} tokens; the swap control needs two.")
    return [data.split(w) for w in windows]


def content_monitor(cfg: ContentConfig, distiller, eval_every: int):
    """The training loop's ``monitor``: :func:`content_gain` on the held-out windows, or None
    when there are none or nothing is evaluated (``eval_every`` 0)."""
    if cfg.data is None or not eval_every:
        return None
    examples = held_out_examples(cfg, distiller.llm.tokenizer, distiller.llm.bos)
    return lambda module: content_gain(module, examples, cfg.batch_size)


@torch.no_grad()
def content_gain(distiller, examples: list[Example], batch_size: int = 8) -> dict[str, Any]:
    """KL on held-out windows with own, swapped and no vectors (see the module docstring).

    Returns ``kl_own``, ``kl_swap``, ``kl_none`` (token-level means over every window's input
    positions), ``content_gain``, ``content_share``, ``own_beats_swap`` (the share of windows
    whose own vectors give a lower KL than the swapped ones) and ``windows``.
    """
    if len(examples) < 2:
        raise ConfigError("The swap control needs at least two windows.")
    was_training = distiller.training
    distiller.eval()
    try:
        parts = [distiller(*distiller.tokenize([e.demos for e in examples[i:i + batch_size]],
                                               Counters()))
                 for i in range(0, len(examples), batch_size)]
        vectors = (kv_cache.cat_rows(parts) if isinstance(parts[0], kv_cache.Prefill)
                   else torch.cat(parts))
        n = len(examples)
        students = {"own": vectors, "swap": _rows(vectors, torch.arange(-1, n - 1) % n),
                    "none": None}
        sums = {name: torch.zeros(n, dtype=torch.float64) for name in students}
        counts = torch.zeros(n, dtype=torch.float64)
        for i in range(0, n, batch_size):
            part = examples[i:i + batch_size]
            index = torch.arange(i, i + len(part))
            for name, kl in _window_kls(distiller, part, {
                    k: None if v is None else _rows(v, index) for k, v in students.items()}
                    ).items():
                sums[name][i:i + len(part)] = kl[0]
                counts[i:i + len(part)] = kl[1]
    finally:
        distiller.train(was_training)
    kl = {name: float(s.sum() / counts.sum()) for name, s in sums.items()}
    gain = kl["swap"] - kl["own"]
    return {"kl_own": kl["own"], "kl_swap": kl["swap"], "kl_none": kl["none"],
            "content_gain": gain, "content_share": gain / kl["swap"] if kl["swap"] else 0.0,
            "own_beats_swap": float((sums["own"] < sums["swap"]).double().mean()),
            "windows": len(examples)}


def _rows(vectors, index: torch.Tensor):
    """Rows ``index`` of ``(B, l, d)`` vectors or of a key/value prefix."""
    if isinstance(vectors, kv_cache.Prefill):
        return kv_cache.select_rows(vectors, index)
    return vectors.index_select(0, index.to(vectors.device))


def _window_kls(distiller, part: list[Example], students: dict[str, torch.Tensor | None]
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per window: the KL summed over its input positions, and how many positions count."""
    llm = distiller.llm
    pad_id = llm.tokenizer.pad_token_id
    ids, mask = (t.to(llm.device) for t in pad([e.input for e in part], pad_id))
    ctx, ctx_mask = (t.to(llm.device) for t in pad([e.context for e in part], pad_id,
                                                   side="left"))
    teacher = llm.hidden(ids, mask, prefix=llm.embed(ctx), prefix_mask=ctx_mask,
                         with_prefix_last=True)[:, :-1]
    out = {}
    for name, vectors in students.items():
        if vectors is None and not llm.bos:  # nothing to predict the first token from
            vectors = torch.zeros(len(part), 1, llm.hidden_size, dtype=llm.dtype,
                                  device=llm.device)
        student = llm.hidden(ids, mask, prefix=vectors, with_prefix_last=True)[:, :-1]
        rows = [chunked_kl_distill(llm.project, student[r:r + 1], teacher[r:r + 1],
                                   mask[r:r + 1]) * mask[r].sum() for r in range(len(part))]
        out[name] = (torch.stack(rows).double().cpu(), mask.sum(-1).double().cpu())
    return out
