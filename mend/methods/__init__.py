"""Every method behind one protocol (see :mod:`mend.methods.base`), chosen by config.

    method: mend            # zero_shot | icl | prompt_tuning | hypertuning | mend
      checkpoint: out/finetune/class_to_class/smollm2

Zero-shot and ICL name their ``llm``; the trained methods name a ``checkpoint``, which names
its own models. Load-time settings (dtype, 8-bit, separators) apply to either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mend.config import Dtype
from mend.errors import ConfigError
from mend.methods.base import Method, Prefix, Trainable

__all__ = ["METHODS", "Method", "MethodConfig", "Prefix", "Trainable", "build_method"]

METHODS = ("zero_shot", "icl", "prompt_tuning", "hypertuning", "mend")


@dataclass(frozen=True)
class MethodConfig:
    method: Literal["zero_shot", "icl", "prompt_tuning", "hypertuning", "mend"] = "mend"
    checkpoint: str | None = None
    """A trained method's output directory (mend, hypertuning, prompt_tuning)."""
    llm: str | None = None
    """The frozen LLM of zero_shot and icl."""
    llm_dtype: Dtype = "float32"
    llm_8bit: bool = False
    allow_8bit_fallback: bool = False
    io_sep: str | None = None
    """Between input and output; None: the checkpoint's setting, or " "."""
    demo_sep: str | None = None
    """Between demonstrations and before the query; None: the checkpoint's, or " "."""

    def __post_init__(self) -> None:
        needs_llm = self.method in ("zero_shot", "icl")
        if needs_llm and not self.llm:
            raise ConfigError(f"method={self.method} needs llm (a model id, directory, "
                              f".gguf file or zoo name).")
        if not needs_llm and not self.checkpoint:
            raise ConfigError(f"method={self.method} needs a checkpoint (a trained "
                              f"output directory).")
        if not needs_llm and self.llm:
            raise ConfigError(f"llm is read from the {self.method} checkpoint; remove it.")


def build_method(cfg: MethodConfig, device=None) -> Method:
    """Load the models a method needs and wrap them in its evaluation interface."""
    load_time = {"llm_dtype": cfg.llm_dtype, "llm_8bit": cfg.llm_8bit,
                 "allow_8bit_fallback": cfg.allow_8bit_fallback}
    load_time.update({k: v for k, v in (("io_sep", cfg.io_sep), ("demo_sep", cfg.demo_sep))
                      if v is not None})
    if cfg.method in ("zero_shot", "icl"):
        from mend.core.backbones import load_model, load_tokenizer
        from mend.methods.icl import ICL
        from mend.methods.zero_shot import ZeroShot
        from mend.core.prefix_lm import PrefixLM
        from mend.core.text import DemoFormat

        model = load_model(cfg.llm, dtype=cfg.llm_dtype, device=device,
                           load_in_8bit=cfg.llm_8bit, allow_8bit_fallback=cfg.allow_8bit_fallback)
        llm = PrefixLM(model, load_tokenizer(cfg.llm))
        fmt = DemoFormat(load_time.get("io_sep", " "), load_time.get("demo_sep", " "))
        return (ZeroShot if cfg.method == "zero_shot" else ICL)(llm, fmt)
    if cfg.method == "prompt_tuning":
        from mend.methods.prompt_tuning import PromptTuning
        return PromptTuning.from_pretrained(cfg.checkpoint, device=device, **load_time).eval()
    from mend.core.distiller import Distiller
    from mend.methods.hypertuning import HyperTuning
    from mend.methods.mend import Mend
    # Evaluation never trains, so LoRA adapters are folded into the weights (the same
    # vectors, fewer matmuls).
    distiller = Distiller.from_pretrained(cfg.checkpoint, device=device,
                                          **load_time).eval().merge_adapters()
    return HyperTuning(distiller) if cfg.method == "hypertuning" else Mend(distiller)
