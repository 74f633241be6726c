"""``mend diagnose CHECKPOINT``: do a distiller's vectors carry its input? (the content controls)

    mend diagnose out/pretrain/smollm2-wikitext
    mend diagnose mend/assets/demo-distiller content.windows=64 output=diagnose.json

Scores the checkpoint on held-out text windows with its own vectors, another window's vectors
and no vectors (:mod:`mend.evaluation.diagnostics`), prints the table, and with ``output`` writes it
as JSON with its provenance.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mend.config import checked, to_dict
from mend.core.backbones import pick_device
from mend.core.distiller import Distiller
from mend.evaluation.diagnostics import HELD_OUT, ContentConfig, content_gain, held_out_examples
from mend.provenance import provenance, write_json
from mend.recipes.run import Recipe, run


@dataclass(frozen=True)
@checked
class DiagnoseConfig:
    checkpoint: str
    """A MEND (or HyperTuning) checkpoint directory."""
    content: ContentConfig = field(default_factory=lambda: ContentConfig(data=HELD_OUT))
    """The held-out windows: by default the first window of each of 32 WikiText-2 test
    articles, 128 LLM tokens split at beta = 0.8, as the CPU stage 1 reads them."""
    device: str | None = None
    """None: CUDA when available, else the CPU."""
    output: str | None = None
    """A JSON file to write the result to (None: print only)."""


def main(cfg: DiagnoseConfig) -> dict[str, Any]:
    """Content controls of a MEND checkpoint on held-out text."""

    device = pick_device(cfg.device)
    distiller = Distiller.from_pretrained(cfg.checkpoint, device=device).eval()
    examples = held_out_examples(cfg.content, distiller.llm.tokenizer, distiller.llm.bos)
    result = content_gain(distiller, examples, cfg.content.batch_size)
    print(table(cfg.checkpoint, result))
    if cfg.output:
        write_json(Path(cfg.output), {"checkpoint": cfg.checkpoint, **result,
                                      "provenance": provenance(to_dict(cfg))})
    return result


def table(name: str, r: dict[str, Any]) -> str:
    """The controls as a markdown table."""
    return (f"content controls of {name} on {r['windows']} held-out windows "
            f"(KL(LLM | text || LLM | vectors), lower is better):\n\n"
            "| vectors | KL |\n|---|---|\n"
            f"| own | {r['kl_own']:.4f} |\n| swapped (another window's) | {r['kl_swap']:.4f} |\n"
            f"| none | {r['kl_none']:.4f} |\n\n"
            f"content gain (KL_swap - KL_own): {r['content_gain']:.4f} "
            f"({100 * r['content_share']:.1f}% of KL_swap); own beats swapped on "
            f"{100 * r['own_beats_swap']:.0f}% of windows\n")


def cli(argv=None) -> int:
    """``mend diagnose CHECKPOINT [key=value ...]`` (or ``checkpoint=...``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and "=" not in args[0] and not args[0].startswith("-"):
        args[0] = f"checkpoint={args[0]}"
    return run(Recipe(DiagnoseConfig, main), args, prog="mend diagnose")
