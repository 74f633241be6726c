"""What of a distiller trains, as one flat state dict, and loading it back.

A checkpoint (:mod:`mend.core.checkpoint`) holds only these tensors:

    placeholders          (l, d_distiller)
    projection.*          the Linear(+Tanh)(+RMSNorm) to the LLM's hidden size, or nothing
    scorer.*              the learned scorer's per-layer networks (``learned_scorer: true``)
    gates.*               the seeded placeholders' gates (``seeded_placeholders``)
    encoder.*             the distiller LM's weights, or only its LoRA adapters

Loading checks every part's names and shapes against the distiller it goes into before it
copies anything, so a checkpoint trained for another setting is a :class:`CheckpointError`
that names the setting, never half a model.
"""

from __future__ import annotations

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from mend.errors import CheckpointError

State = dict[str, torch.Tensor]
# The distiller is passed in as a module (its placeholders, projection, scorer, encoder,
# config and merged flag are read), so this module needs nothing of mend.core.distiller.


def state_of(distiller: nn.Module, state_dict: State | None = None) -> State:
    """The trainable tensors of ``distiller``, taken from ``state_dict`` (its ``state_dict()``
    as gathered from a sharded run) or from the module itself, on the CPU."""
    if distiller.merged:
        raise CheckpointError("This distiller's LoRA adapters were merged for inference "
                              "(merge_adapters), so there is no adapter to save: save it "
                              "before merging, or load the checkpoint again.")
    own = distiller.state_dict() if state_dict is None else state_dict
    state = {k: v for k, v in own.items() if k == "placeholders"
             or k.startswith(("projection.", "scorer.", "gates."))}
    encoder = _part(own, "encoder")
    if distiller.config.train_mode == "lora":
        encoder = get_peft_model_state_dict(distiller.encoder, state_dict=encoder)
    state.update({f"encoder.{k}": v for k, v in encoder.items()})
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def load_into(distiller: nn.Module, state: State) -> None:
    """Inverse of :func:`state_of`: every part's shapes are checked before any is copied."""
    ph = state.get("placeholders")
    if ph is None or ph.shape != distiller.placeholders.shape:
        raise CheckpointError(
            f"The checkpoint's placeholders have shape "
            f"{None if ph is None else tuple(ph.shape)}, but this distiller needs "
            f"{tuple(distiller.placeholders.shape)} (num_placeholders x distiller hidden size).")
    proj, mine = _part(state, "projection"), distiller.projection.state_dict()
    if not _fits(proj, mine):
        raise CheckpointError(
            f"The checkpoint's projection ({_shapes(proj)}) does not fit this distiller and "
            f"LLM ({_shapes(mine)}): the LLM's hidden size ({distiller.llm.hidden_size}) must be "
            f"the one the checkpoint was trained for.")
    scorer = _optional(state, "scorer", distiller.scorer, "learned scorer", "learned_scorer",
                       distiller.config.learned_scorer)
    gates = _optional(state, "gates", distiller.gates, "seeded placeholders' gates",
                      "seeded_placeholders", distiller.config.seeded_placeholders)
    encoder = _part(state, "encoder")
    with torch.no_grad():
        distiller.placeholders.copy_(ph)
    distiller.projection.load_state_dict(proj)
    if distiller.scorer is not None:
        distiller.scorer.load_state_dict(scorer)
    if distiller.gates is not None:
        distiller.gates.load_state_dict(gates)
    if distiller.config.train_mode == "lora":
        result = set_peft_model_state_dict(distiller.encoder, encoder)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise CheckpointError(f"LoRA weights do not fit the distiller: {unexpected[:3]}")
    else:
        try:
            distiller.encoder.load_state_dict(encoder, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"The checkpoint's distiller weights do not fit "
                                  f"`{distiller.config.distiller}`: {e}") from None


def _part(state: State, prefix: str) -> State:
    """The tensors under ``prefix.``, with the prefix taken off."""
    return {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(f"{prefix}.")}


def _optional(state: State, name: str, module: nn.Module | None, what: str, setting: str,
              value) -> State:
    """The checkpoint's ``name.*`` tensors, checked against ``module``, a part only some
    settings have (None where this distiller has none)."""
    theirs = _part(state, name)
    mine = {} if module is None else module.state_dict()
    if not _fits(theirs, mine):
        raise CheckpointError(
            f"The checkpoint's {what} ({_shapes(theirs)}) does not fit this distiller's "
            f"({_shapes(mine)}; {setting}: {value}): set {setting} as the checkpoint was "
            f"trained, on the same distiller.")
    return theirs


def _fits(theirs: State, mine: State) -> bool:
    return theirs.keys() == mine.keys() and all(theirs[k].shape == mine[k].shape for k in mine)


def _shapes(state: State) -> str:
    return ", ".join(f"{k} {tuple(v.shape)}" for k, v in state.items()) or "none"
