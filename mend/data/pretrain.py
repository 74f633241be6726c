"""Stage-1 data: plain text -> documents -> windows -> (demonstrations, input) examples.

- **Source.** Text comes through ``datasets``: by default the hub's C4 (``allenai/c4``, ``en``,
  validation, streamed). A local text, JSON-lines or parquet file, glob or directory is read
  through the same ``load_dataset`` path (``json``/``text``/``parquet`` builders, streamed).
- **Documents.** Each row is a document, or, with ``documents: wikitext``, the paragraphs of
  one WikiText article (from one `` = Title = `` line to the next) are joined into one.
- **Windows.** Each document is tokenized with the LLM's tokenizer and cut into consecutive
  windows of at most ``max_length`` tokens (``windows_per_document`` caps how many; 1 keeps
  only the first). Windows shorter than ``min_length`` are skipped and counted. Windows are
  shuffled per epoch through a seeded buffer of ``shuffle_buffer`` windows.
- **Split.** A window's first ``floor(beta * n)`` tokens are the demonstrations and the rest
  the input. The split is made on the LLM's tokens; the distiller gets the demonstrations as
  decoded text, so distiller and LLM may tokenize differently.
- **By node.** With ``split_by_node`` and several processes, each reads and tokenizes only its
  own share of the documents: whole files of the stream where their number divides among the
  processes, else every ``world``-th row (``datasets.distributed.split_dataset_by_node``);
  WikiText articles, which span many rows, are dealt out whole, article ``i`` to rank
  ``i % world``. Each document is then read once, by one process, instead of by all.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mend.config import checked
from mend.counters import Counters
from mend.data import Example, shuffled
from mend.errors import ConfigError

LOCAL_FORMATS = {".txt": "text", ".tokens": "text", ".raw": "text", ".json": "json",
                 ".jsonl": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
@checked
class TextDataConfig:
    path: str = "allenai/c4"
    """A hub dataset id, or a local file, glob or directory of text/JSON-lines/parquet files."""
    name: str | None = "en"
    """The hub dataset's configuration name (ignored for local files)."""
    split: str = "validation"
    format: Literal["auto", "hub", "text", "json", "parquet"] = "auto"
    """``auto``: a path that exists locally is read by its file extension, otherwise the hub."""
    text_field: str = "text"
    documents: Literal["rows", "wikitext"] = "rows"
    max_length: int = 1024
    beta: float = 0.8
    min_length: int = 64
    windows_per_document: int | None = None
    shuffle_buffer: int = 1000
    """Windows held in the seeded shuffle buffer (a full shuffle when the data fits)."""
    split_by_node: bool = True
    """Each process reads and tokenizes only its share of the documents (see the module doc),
    and trains on the windows it read. false: every process reads the whole stream and keeps
    every ``world``-th batch (round-robin), which costs ``world`` times the reading, but can
    resume on a different number of processes."""

    def __post_init__(self) -> None:
        if not 0.0 < self.beta < 1.0:
            raise ConfigError(f"data.beta must be in (0, 1), got {self.beta}.")
        if not 2 <= self.min_length <= self.max_length:
            raise ConfigError(f"Need 2 <= data.min_length ({self.min_length}) <= "
                              f"data.max_length ({self.max_length}).")


def load_rows(cfg: TextDataConfig) -> Iterable[dict]:
    """The raw rows, streamed, through ``datasets.load_dataset``."""
    from datasets import load_dataset  # lazy: slow to import, and only stage 1 reads text
    fmt, files = _local_files(cfg)
    if fmt == "hub":
        return load_dataset(cfg.path, cfg.name, split=cfg.split, streaming=True)
    return load_dataset(fmt, data_files=files, split="train", streaming=True)


def _local_files(cfg: TextDataConfig) -> tuple[str, list[str] | None]:
    path = Path(cfg.path).expanduser()
    if cfg.format == "hub" or (cfg.format == "auto" and not path.exists()
                               and not any(c in cfg.path for c in "*?")):
        if cfg.path.startswith((".", "/", "~")):
            raise ConfigError(f"data.path {cfg.path} does not exist.")
        return "hub", None
    if path.is_dir():
        files = sorted(str(p) for p in path.iterdir() if _format_of(p) is not None)
    else:
        files = sorted(str(p) for p in path.parent.glob(path.name))
    if not files:
        raise ConfigError(f"data.path {cfg.path} holds no text, JSON-lines or parquet files "
                          f"(extensions {', '.join(LOCAL_FORMATS)}, optionally .gz).")
    formats = {cfg.format} if cfg.format != "auto" else {_format_of(Path(f)) for f in files}
    if len(formats) != 1 or None in formats:
        raise ConfigError(f"data.path {cfg.path} mixes file formats {formats}; set data.format.")
    return formats.pop(), files


def _format_of(path: Path) -> str | None:
    suffixes = [s for s in path.suffixes if s not in (".gz", ".bz2", ".xz", ".zst")]
    return LOCAL_FORMATS.get(suffixes[-1]) if suffixes else None


_TITLE = re.compile(r"^ = [^=].* = $")
_UNESCAPE = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."))


def wikitext_articles(lines: Iterable[str]) -> Iterator[str]:
    """Join WikiText paragraphs into one document per article (titles start articles)."""
    article: list[str] = []
    for line in lines:
        if _TITLE.match(line.rstrip("\n")) and article:
            yield _join(article)
            article = []
        if line.strip():
            article.append(line.strip())
    if article:
        yield _join(article)


def _join(paragraphs: list[str]) -> str:
    text = "\n".join(paragraphs)
    for marker, char in _UNESCAPE:  # WikiText's escaped in-word hyphens and number separators
        text = text.replace(marker, char)
    return text


def documents(cfg: TextDataConfig, rank: int = 0, world: int = 1) -> Iterator[str]:
    """The documents of one pass over the source, in source order; with ``world > 1``, only
    rank ``rank``'s share of them (see the module doc)."""
    rows = load_rows(cfg)
    if world > 1 and cfg.documents == "rows":
        from datasets.distributed import split_dataset_by_node  # lazy, as above
        rows = split_dataset_by_node(rows, rank=rank, world_size=world)

    def texts() -> Iterator[str]:
        for row in rows:
            if cfg.text_field not in row:
                raise ConfigError(f"The data rows have no field `{cfg.text_field}` (fields: "
                                  f"{', '.join(row)}); set data.text_field.")
            yield row[cfg.text_field]
    if cfg.documents == "wikitext":
        yield from itertools.islice(wikitext_articles(texts()), rank, None, world)
    else:
        yield from texts()


class PretrainData:
    """Stage-1 examples for each epoch, deterministic given the seed."""

    def __init__(self, cfg: TextDataConfig, llm_tokenizer, bos: list[int], seed: int,
                 counters: Counters | None = None, rank: int = 0, world: int = 1):
        self.cfg, self.tokenizer, self.bos, self.seed = cfg, llm_tokenizer, bos, seed
        self.counters = counters if counters is not None else Counters()
        self.rank, self.world = rank, world
        """This process's share of the documents: all of them with ``world`` 1."""

    def windows(self, epoch: int) -> Iterator[list[int]]:
        """This epoch's LLM-token windows, shuffled through a seeded buffer of windows (so a
        batch mixes documents even when one document yields many windows)."""
        return shuffled(self.in_order(), f"{self.seed}-{epoch}", self.cfg.shuffle_buffer)

    def in_order(self) -> Iterator[list[int]]:
        cfg = self.cfg
        n = cfg.max_length - len(self.bos)  # bos is read in front of every window
        for doc in documents(cfg, self.rank, self.world):
            ids = self.tokenizer(doc, add_special_tokens=False)["input_ids"]
            self.counters.add("documents")
            cuts = range(0, len(ids), n)
            if cfg.windows_per_document is not None:
                cuts = cuts[:cfg.windows_per_document]
            for start in cuts:
                window = ids[start:start + n]
                if len(window) < cfg.min_length:
                    self.counters.add("windows_skipped_short")
                    continue
                yield window

    def split(self, window: list[int]) -> Example:
        """The beta split: demonstrations as text for the distiller, ids for the teacher."""
        cut = int(self.cfg.beta * len(window))
        context = window[:cut]
        return Example(demos=self.tokenizer.decode(context), context=context,
                       input=window[cut:], targets_from=len(window) - cut)
