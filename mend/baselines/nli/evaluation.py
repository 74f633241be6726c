"""Scoring NLI by next-token labels: pattern-based ICL with a frozen LLM, or a trained
PatternLM (PBFT, or a context-distilled student).

Each evaluation set (``in_domain``, and the six HANS subsets ``<heuristic>/<label>``) reports:

- ``accuracy``: the argmax over the label tokens only;
- ``full_vocab_accuracy``: the argmax over the whole vocabulary;
- ``non_label_fraction``: the share of queries whose whole-vocabulary argmax is no label token.

:func:`summarize` adds ``ood``: the mean accuracy over the HANS subsets, and per heuristic.

**ICL overflow:** a query whose prompt (bos, the k demonstrations, the query) exceeds
``max_length`` tokens is dropped from its set and counted in ``dropped``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mend.baselines.nli.data import LABELS, NLIExample, balanced_sample
from mend.baselines.nli.patterns import Pattern, context_text
from mend.core.prefix_lm import PrefixLM
from mend.evaluation.metrics import label_scores


def score(logits: torch.Tensor, label_ids: Sequence[int], examples: Sequence[NLIExample]
          ) -> dict[str, float]:
    metrics = label_scores(logits, label_ids, [LABELS.index(e.label) for e in examples])
    metrics.pop("predictions")
    return {**metrics, "n": len(examples)}


def evaluate_model(model, sets: dict[str, Sequence[NLIExample]], batch_size: int = 32
                   ) -> dict[str, Any]:
    """A trained PatternLM on every set (no demonstrations)."""
    report = {name: score(model.next_token_logits(examples, batch_size), model.label_ids,
                          examples) for name, examples in sets.items()}
    return summarize(report)


@torch.no_grad()
def evaluate_icl(llm: PrefixLM, pattern: Pattern, pool: Sequence[NLIExample],
                 sets: dict[str, Sequence[NLIExample]], k: int, seed: int, sep: str = "\n\n",
                 max_length: int = 2048, batch_size: int = 32) -> dict[str, Any]:
    """Pattern-based ICL: ``k`` balanced demonstrations from ``pool`` (seeded), then each
    query, scored at the label tokens. ``k = 0`` is the zero-shot pattern."""
    tok = llm.tokenizer
    demos = balanced_sample(pool, k, random.Random(seed)) if k else []
    context = tok(context_text(pattern, demos, sep), add_special_tokens=False)["input_ids"] \
        if demos else []
    prefix, prefix_mask = llm.embed_context([context]) if context else (None, None)
    label_ids = pattern.label_ids(tok)
    limit = min(max_length, llm.max_length or max_length)
    report = {}
    for name, examples in sets.items():
        texts = [(sep if context else "") + pattern.render(e) for e in examples]
        prompts = tok(texts, add_special_tokens=False)["input_ids"]
        fits = [i for i, p in enumerate(prompts) if len(llm.bos) + len(context) + len(p)
                <= limit]
        kept = [examples[i] for i in fits]
        entry: dict[str, Any] = {"dropped": len(examples) - len(fits)}
        if kept:
            logits = llm.next_token_logits([prompts[i] for i in fits], prefix, prefix_mask,
                                           batch_size)
            entry.update(score(logits, label_ids, kept))
        report[name] = entry
    return summarize(report)


def summarize(report: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Add ``ood`` (mean HANS accuracy) and ``ood_<heuristic>`` to a per-set report."""
    hans = {n: r["accuracy"] for n, r in report.items() if "/" in n and "accuracy" in r}
    summary: dict[str, Any] = {"sets": report}
    if "in_domain" in report and "accuracy" in report["in_domain"]:
        summary["in_domain"] = report["in_domain"]["accuracy"]
    if hans:
        summary["ood"] = float(np.mean(list(hans.values())))
        for heuristic in sorted({n.split("/")[0] for n in hans}):
            summary[f"ood_{heuristic}"] = float(np.mean(
                [v for n, v in hans.items() if n.startswith(heuristic + "/")]))
    return summary
