"""Demonstrations as text, and text as token ids: one format shared by every method.

A context is built MetaICL-style, piece by piece, and every piece is tokenized on its own:

    demo_1 | demo_sep + demo_2 | ... | demo_sep + query | io_sep + option

where a demonstration is ``input + io_sep + output`` (or a plain string). Tokenizing pieces
separately keeps a query's ids identical whether it follows real demonstrations (ICL, the
teacher) or distilled vectors (MEND, the student), so their logits line up position by
position. A query that follows no context at all (zero-shot) carries no ``demo_sep``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import torch

from mend.core.config import SEP
from mend.errors import InputError

Demo = Union[tuple[str, str], str]
"""One demonstration: an ``(input, output)`` pair or a plain string."""
Demos = Union[Sequence[Demo], str]
"""A demonstration set: a sequence of demonstrations, or one string holding them all."""


@dataclass(frozen=True)
class DemoFormat:
    io_sep: str = SEP
    demo_sep: str = SEP

    def demo_texts(self, demos: Demos) -> list[str]:
        """Render a demonstration set as one string per demonstration; reject bad input."""
        if isinstance(demos, str):
            if not demos.strip():
                raise InputError("The demonstrations are an empty string. Pass (input, output) "
                                 "pairs, strings, or one non-empty string.")
            return unicode_text([demos], "demonstration")
        if isinstance(demos, tuple) and len(demos) == 2 and all(isinstance(x, str) for x in demos):
            raise InputError("Got a single (input, output) pair as the demonstrations: wrap it "
                             "in a list, [(input, output)], to make a set of one.")
        if not isinstance(demos, (list, tuple)):
            raise InputError(f"The demonstrations must be a list of (input, output) pairs or "
                             f"strings, or one string; got a {type(demos).__name__}. Pass "
                             f"list(...) of them.")
        if len(demos) == 0:
            raise InputError("No demonstrations were given: compress needs a non-empty list of "
                             "(input, output) pairs or strings, or one non-empty string.")
        texts = []
        for i, demo in enumerate(demos):
            if isinstance(demo, str):
                text = demo
            elif (isinstance(demo, (tuple, list)) and len(demo) == 2
                  and all(isinstance(x, str) for x in demo)):
                text = demo[0] + self.io_sep + demo[1]
            else:
                raise InputError(f"Demonstration {i} is {type(demo).__name__} {demo!r}; each "
                                 f"must be an (input, output) pair of strings or a string.")
            if not text.strip():
                raise InputError(f"Demonstration {i} is empty.")
            texts.append(text)
        return unicode_text(texts, "demonstration")

    def pieces(self, demos: Demos) -> list[str]:
        """The text pieces of a context, each tokenized on its own (see the module docs)."""
        texts = self.demo_texts(demos)
        return texts[:1] + [self.demo_sep + t for t in texts[1:]]

    def query(self, text: str, after_context: bool = True) -> str:
        return self.demo_sep + text if after_context else text

    def option(self, text: str) -> str:
        return self.io_sep + text


def bos_ids(tokenizer) -> list[int]:
    """The tokens the tokenizer puts before a text by default (Llama/Gemma: BOS; GPT-2: none)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def unicode_text(texts: Sequence[str], what: str = "text") -> list[str]:
    """``texts``, refused with an :class:`InputError` where one is not valid Unicode (a lone
    surrogate, as a bad decode leaves, which a tokenizer rejects with a raw TypeError)."""
    for i, text in enumerate(texts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InputError(
                f"{what.capitalize()} {i} holds {text[e.start]!r} at character {e.start}, which is "
                f"not valid Unicode (a lone surrogate). Decode the source with errors='replace', "
                f"or drop that character.") from None
    return list(texts)


def encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens."""
    if not texts:
        return []
    return tokenizer(unicode_text(texts), add_special_tokens=False)["input_ids"]


def fit(pieces: Sequence[Sequence[int]], budget: int, head: Sequence[int] = ()
        ) -> tuple[list[int], int, int]:
    """Join ``head`` and whole ``pieces`` in order while they fit in ``budget`` tokens.

    The first piece that does not fit is dropped with every piece after it. The one exception
    is a first piece too long on its own: it is cut to the budget, keeping its first tokens.

    Returns:
        ``(ids, pieces dropped, tokens dropped)``.
    """
    seq = list(head)
    for k, piece in enumerate(pieces):
        room = budget - len(seq)
        if len(piece) <= room:
            seq += piece
            continue
        cut = 0
        if k == 0:
            seq += piece[:max(room, 0)]
            cut, k = len(piece) - max(room, 0), 1
        rest = pieces[k:]
        return seq, len(rest), cut + sum(len(p) for p in rest)
    return seq, 0, 0


def pad(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right",
        length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad id lists into ``(ids, mask)``, both ``(B, length)`` int64; mask is 1 on real tokens."""
    width = max((len(s) for s in seqs), default=0) if length is None else length
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not s:
            continue
        row = torch.as_tensor(list(s), dtype=torch.long)
        if side == "left":
            ids[i, width - len(s):], mask[i, width - len(s):] = row, 1
        else:
            ids[i, :len(s)], mask[i, :len(s)] = row, 1
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only real tokens, so padding never shifts them. ``(B, T)``."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)
