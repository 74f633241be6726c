"""HyperTuning (Phang et al., 2023): a distiller (hypermodel) trained with the CLM objective.

At evaluation it is used exactly like MEND: the distiller's vectors replace the
demonstrations. What differs is training, which is configuration only: stage 1 with
``objective: {distill: 0, clm: 1}`` and stage 2 with ``objective: {pred: 1, distill: 0}``
(see ``configs/pretrain/*-hypertuning.yaml`` and ``configs/finetune/*/*-hypertuning.yaml``).
"""

from __future__ import annotations

from mend.core.distiller import Distiller
from mend.methods.mend import Mend


def HyperTuning(distiller: Distiller) -> Mend:  # noqa: N802  (reads as the method's name)
    return Mend(distiller, name="hypertuning")
