"""HyperTuning (Phang et al., 2023): a distiller (hypermodel) trained with the CLM objective.

At evaluation it is used exactly like MEND: the distiller's vectors replace the
demonstrations. What differs is training, which is configuration only: stage 1 with
``objective: {distill: 0, clm: 1}`` and stage 2 (``method: mend``) with
``objective: {pred: 1, distill: 0}`` (see ``configs/pretrain/*-hypertuning.yaml`` and
``configs/finetune/*/*-hypertuning.yaml``).
"""

from __future__ import annotations

from mend.methods.mend import Mend
from mend.methods.registry import register_method


def load(cfg, device=None) -> Mend:
    """A HyperTuning checkpoint as MEND's evaluation method, named ``hypertuning``."""
    return Mend.load(cfg, device, name="hypertuning")


register_method("hypertuning", load=load, needs="checkpoint")
