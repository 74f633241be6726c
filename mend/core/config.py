"""The model config: :class:`MendConfig`, everything that defines a distiller and the frozen
LLM it feeds, and :class:`FrozenLLM`, how every method loads its frozen LLM. Loaded as every
config is (:func:`mend.config.load_config`); a checkpoint stores :class:`MendConfig` as JSON.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from mend.config import checked
from mend.errors import ConfigError

Dtype = Literal["float32", "bfloat16", "float16"]

CompactionName = Literal["attention_cut", "kvzip", "attention_matching", "kvzip_matching"]
"""The named compactions of :data:`mend.core.compaction.COMPACTIONS` (a test keeps the two
lists one)."""

SEP = " "
"""The default separator, between a demonstration's input and output and between
demonstrations (MetaICL's); the shipped configs for SmolLM2 use newlines instead."""



@dataclasses.dataclass(frozen=True)
@checked
class FrozenLLM:
    """How to load a frozen LLM: the one spec from which the distiller, prompt tuning, zero-shot
    and ICL, and both baselines load their LLM or teacher
    (:meth:`mend.core.prefix_lm.PrefixLM.load`). Their configs keep the flat YAML keys
    (``llm``, ``llm_dtype``, ``llm_8bit``, ``allow_8bit_fallback``, ``attn_implementation``)
    and build this from them (:meth:`of`)."""

    name: str
    """A hub id, a local directory, a ``.gguf`` file or a zoo name."""
    dtype: Dtype = "float32"
    load_in_8bit: bool = False
    """bitsandbytes' LLM.int8(), on any device where bitsandbytes runs it (CUDA; the CPU with
    bitsandbytes 0.50)."""
    allow_8bit_fallback: bool = False
    """Where 8-bit cannot load (bitsandbytes cannot run it here), load in ``dtype`` with a
    warning instead of failing."""
    attn_implementation: str | None = "sdpa"

    @classmethod
    def of(cls, cfg: Any) -> FrozenLLM:
        """The spec that a config's flat keys name (``llm``, ``llm_dtype``, ``llm_8bit``,
        ``allow_8bit_fallback``, ``attn_implementation``)."""
        return cls(cfg.llm, cfg.llm_dtype, cfg.llm_8bit, cfg.allow_8bit_fallback,
                   cfg.attn_implementation)


@dataclasses.dataclass(frozen=True)
@checked
class MendConfig:
    """Everything that defines a MEND distiller and the frozen LLM it feeds.

    A checkpoint stores this config as JSON, so :meth:`Distiller.from_pretrained` rebuilds the
    same model from it.
    """

    distiller: str
    """The distiller LM: a hub id, a local directory, a ``.gguf`` file or a zoo name."""
    llm: str
    """The frozen LLM that reads the distilled vectors; same forms as ``distiller``."""
    num_placeholders: int = 100
    """``l``: how many vectors the distiller emits (0 turns MEND into zero-shot)."""
    placeholder_init: Literal["random", "vocab"] = "random"
    """``random``: N(0, 0.02); ``vocab``: copies of the distiller's embeddings of random tokens."""
    projection: Literal["auto", "always", "none"] = "auto"
    """Linear+Tanh from distiller to LLM hidden size: ``auto`` adds it only when the sizes
    differ, ``always`` adds it anyway, ``none`` forbids it (sizes must then match)."""
    output: Literal["embeddings", "kv", "compacted"] = "embeddings"
    """What the LLM receives. ``embeddings`` (the paper): the ``l`` vectors are input
    embeddings the LLM reads in front of the query. ``kv`` (opt-in, Gisting-style prefix):
    the distiller's own keys and values at bos and at the placeholders, layer by layer, are
    the LLM's KV cache, so the LLM never reads the prefix at all. ``compacted`` (the warm
    start, KV-Distill-style): the distiller reads the demonstrations alone, and its own cache
    of them is compacted to bos and ``l`` positions per layer and key/value head by
    ``compaction``; with the LLM as the distiller and LoRA at zero it *is* the training-free
    :class:`~mend.core.kv_compress.KVCompressor`, and training learns the correction. Both
    cache outputs need a distiller of the LLM's architecture (same layers, key/value heads
    and head size, e.g. the LLM itself with LoRA) and ``projection: auto`` with
    ``vector_norm: none``."""
    compaction: CompactionName = "attention_matching"
    """With ``output: compacted``, how the distiller's cache is cut and fitted
    (:mod:`mend.core.compaction`)."""
    learned_scorer: bool = False
    """With ``output: compacted``, also train a small scorer per layer that corrects the
    compaction's choice of positions and raises the kept keys' logits
    (:mod:`mend.core.compaction.learned`; KV-Distill's learned selection). It starts at no
    correction, so step 0 is still the compaction."""
    seeded_placeholders: int = 0
    """With ``output: kv``, how many of the ``l`` placeholders are copies of the
    demonstrations' own best tokens (KVzip's choice), at their positions and seeing
    what those tokens saw, so that with the LoRA at zero they *are* the LLM's cache of those
    tokens; a gate per layer and head, zero at the start, lets them read the rest once trained
    (:mod:`mend.core.seeding`). ``l`` seeds every placeholder; fewer mixes ``m`` seeded with
    ``l - m`` learned ones; 0: the learned placeholders alone."""
    vector_norm: Literal["none", "match"] = "none"
    """``match`` ends the distiller's output in an RMSNorm whose gains start at the RMS of the
    LLM's token embeddings, so the vectors begin at the scale of the inputs the LLM was
    trained on (a distiller's last hidden states are several times larger). ``none``: the
    paper's vectors, unnormalised."""
    train_mode: Literal["full", "lora"] = "full"
    """Train every distiller weight, or only LoRA adapters on it (a checkpoint of a few MB)."""
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: str | tuple[str, ...] = "all-linear"
    """Passed to ``peft.LoraConfig(target_modules=...)``."""
    io_sep: str = SEP
    """Between a demonstration's input and output (and between a query and its option)."""
    demo_sep: str = SEP
    """Between demonstrations, and before a query that follows a context. The paper uses
    whitespace; set ``io_sep: "\\n"`` and ``demo_sep: "\\n\\n"`` for newlines."""
    max_distiller_length: int = 1024
    """Distiller positions for demonstrations plus placeholders; see ``Distiller.tokenize``
    for the truncation rule."""
    distiller_dtype: Dtype = "float32"
    llm_dtype: Dtype = "float32"
    llm_8bit: bool = False
    """Load the frozen LLM in 8-bit through bitsandbytes' LLM.int8() (on CUDA, or on the CPU
    with bitsandbytes 0.50); its other weights in ``llm_dtype``."""
    allow_8bit_fallback: bool = False
    """Where 8-bit cannot run, load the LLM in ``llm_dtype`` with a warning instead of failing."""
    attn_implementation: str = "sdpa"

    def __post_init__(self) -> None:
        if not self.distiller or not self.llm:
            raise ConfigError("MendConfig needs both `distiller` and `llm`: a hub id, a local "
                              "directory, a .gguf file or a zoo name (see `mend zoo list`).")
        if self.num_placeholders < 0:
            raise ConfigError(f"num_placeholders must be >= 0, got {self.num_placeholders}.")
        if self.max_distiller_length <= self.num_placeholders:
            raise ConfigError(
                f"max_distiller_length ({self.max_distiller_length}) must exceed num_placeholders "
                f"({self.num_placeholders}) to leave room for the demonstrations.")
        if self.output != "embeddings" and (self.projection == "always"
                                            or self.vector_norm != "none"
                                            or self.num_placeholders == 0):
            raise ConfigError(f"output: {self.output} hands the distiller's keys and values to "
                              f"the LLM unchanged, at one or more positions: set projection: "
                              f"auto, vector_norm: none and num_placeholders >= 1.")
        if self.learned_scorer and self.output != "compacted":
            raise ConfigError(f"learned_scorer corrects a compaction's choice of positions, so "
                              f"it needs output: compacted (not {self.output}).")
        if self.seeded_placeholders and not (
                self.output == "kv" and 0 < self.seeded_placeholders <= self.num_placeholders):
            raise ConfigError(f"seeded_placeholders copies demonstration tokens into the "
                              f"placeholders whose keys and values the LLM reads, so it needs "
                              f"output: kv (not {self.output}) and 0 <= seeded_placeholders <= "
                              f"num_placeholders ({self.num_placeholders}); got "
                              f"{self.seeded_placeholders}.")
        if self.lora_r <= 0 or not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError("lora_r must be > 0 and lora_dropout in [0, 1).")
