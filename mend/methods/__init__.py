"""Every method behind one protocol (see :mod:`mend.methods.base`), chosen by config.

    method: mend            # any registered method: zero_shot | icl | prompt_tuning | ...
      checkpoint: out/finetune/class_to_class/smollm2

Zero-shot and ICL name their ``llm``; the trained methods name a ``checkpoint``, which names
its own models. Load-time settings (dtype, 8-bit, separators) apply to either. Each method's
module registers it (:mod:`mend.methods.registry`); importing this package registers them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mend.config import checked
from mend.core.config import CompactionName, Dtype
from mend.errors import ConfigError
from mend.methods.base import Method, Prefix, Trainable
from mend.methods.registry import get_method, method_names, register_method

__all__ = ["Method", "MethodConfig", "Prefix", "Trainable", "build_method", "get_method",
           "method_names", "register_method"]


@dataclass(frozen=True)
@checked
class MethodConfig:
    method: str = "mend"
    """A registered method (:func:`~mend.methods.registry.method_names`)."""
    checkpoint: str | None = None
    """A trained method's output directory (mend, hypertuning, prompt_tuning)."""
    llm: str | None = None
    """The frozen LLM of zero_shot and icl."""
    llm_dtype: Dtype = "float32"
    distiller_dtype: Dtype = "float32"
    """mend, hypertuning: the distiller's weights at evaluation (its checkpoint may say the
    bf16 it trained in; it loads in this dtype whatever it says)."""
    llm_8bit: bool = False
    allow_8bit_fallback: bool = False
    attn_implementation: str | None = "sdpa"
    """The LLM's attention kernel (transformers' name); None: its default."""
    io_sep: str | None = None
    """Between input and output; None: the checkpoint's setting, or " "."""
    demo_sep: str | None = None
    """Between demonstrations and before the query; None: the checkpoint's, or " "."""
    num_placeholders: int | None = None
    """The positions kept beside bos in each layer and head: kv_compress's (None: 16, a
    shipped distiller's l, for a comparison at equal memory), and a warm-started distiller's
    (``output: compacted``; None: its checkpoint's), which compacts to any budget."""
    compaction: CompactionName | None = None
    """How a cache is cut (:data:`mend.core.compaction.COMPACTIONS`): attention_cut, kvzip,
    attention_matching or kvzip_matching. kv_compress: ICL's cache (None: attention_cut); a
    warm-started distiller (``output: compacted``): its own cache (None: its checkpoint's),
    so one trained with one compaction is scored with another (kvzip's selection trained,
    Attention Matching's fit on top: kvzip_matching)."""
    refine_steps: int = 0
    """mend and kv_compress: gradient steps on each compressed prefix against the ICL
    teacher on its own demonstrations, leave-one-out (:mod:`mend.core.refine`); 0: the
    prefix as compressed."""

    def __post_init__(self) -> None:
        needs_llm = get_method(self.method).needs == "llm"
        if needs_llm and not self.llm:
            raise ConfigError(f"method={self.method} needs llm (a model id, directory, "
                              f".gguf file or zoo name).")
        if not needs_llm and not self.checkpoint:
            raise ConfigError(f"method={self.method} needs a checkpoint (a trained "
                              f"output directory).")
        if (self.num_placeholders is not None and self.num_placeholders < 1) \
                or self.refine_steps < 0:
            raise ConfigError(f"num_placeholders must be >= 1 and refine_steps >= 0; got "
                              f"{self.num_placeholders} and {self.refine_steps}.")
        if not needs_llm and self.llm:
            raise ConfigError(f"llm is read from the {self.method} checkpoint; remove it.")

    @property
    def load_time(self) -> dict[str, Any]:
        """The settings a checkpoint is loaded with (None separators keep the saved ones)."""
        out: dict[str, Any] = {"llm_dtype": self.llm_dtype, "llm_8bit": self.llm_8bit,
                               "allow_8bit_fallback": self.allow_8bit_fallback}
        out.update({k: v for k, v in (("io_sep", self.io_sep), ("demo_sep", self.demo_sep))
                    if v is not None})
        return out


def build_method(cfg: MethodConfig, device=None, llm=None) -> Method:
    """Load the models a method needs and wrap them in its evaluation interface. ``llm``: the
    frozen LLM ``cfg`` names, already loaded (:class:`~mend.core.prefix_lm.PrefixLM`), which
    the methods that need only it (zero-shot, ICL, kv_compress) then share."""
    spec = get_method(cfg.method)
    if llm is not None and spec.needs == "llm":
        return spec.load(cfg, device, llm=llm)
    return spec.load(cfg, device)


# Each module registers its method when imported; the order is the order `method_names` lists.
from mend.methods import zero_shot, icl, kv_compress, prompt_tuning, hypertuning, mend  # noqa: E402, F401, I001
