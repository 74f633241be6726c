"""Per-GPU memory of a stage-1 run, before it starts: parameters, gradients, optimizer state
and activations, under DDP, FSDP, or DDP with the LLM in 8-bit.

    mend memory --config configs/pretrain/smollm2-llama2-7b.yaml --engine fsdp --processes 8

- **Parameters** are accelerate's own sizes: what ``accelerate estimate-memory`` reports for a
  model (``accelerate.utils.calculate_maximum_sizes`` over an empty model built from its
  config on the meta device, so no weight is read), scaled to the dtype the way it scales
  them (int8 is a quarter of float32). The configs are read locally when the name is a
  directory, a ``.gguf`` file or a zoo name, else from the hub.
- **Gradients and optimizer state** are those of what trains (the distiller or its LoRA
  adapters, the placeholders and the projection): float32 gradients, held twice under DDP
  (its buckets), and AdamW's two float32 moments.
- **Activations are measured, not modelled**: one step of the real loss
  (:class:`~mend.methods.mend.MendObjective`) on copies of both models cut to one and two
  layers (real widths, weights left at zero), at batch 1 and the configured lengths, counting
  the bytes autograd saves for the backward pass. The difference between depths is one
  layer's share, scaled to the real depths, then to the batch.
- **Engines.** DDP holds everything on every GPU. FSDP divides parameters, gradients and
  optimizer state by the number of processes, and adds what it gathers at once: the root
  unit (embeddings, norms, heads, placeholders, projection), which stays gathered through a
  step, and two layers (the one running and the one prefetched). Activations are per
  process under every engine.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
from collections.abc import Iterator
from typing import Literal

import torch
from accelerate import init_empty_weights
from accelerate.utils import calculate_maximum_sizes, compute_module_sizes
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from mend import tiny
from mend.config import replace
from mend.core.backbones import DTYPES, add_lora, load_tokenizer, resolve
from mend.core.config import MendConfig
from mend.core.distiller import Distiller
from mend.core.prefix_lm import PrefixLM
from mend.data.pretrain import TextDataConfig
from mend.errors import BackboneError, ConfigError
from mend.methods.mend import MendObjective, ObjectiveConfig

Engine = Literal["ddp", "fsdp", "8bit"]
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}
GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Sizes:
    """One model's parameter bytes (float32, as accelerate counts them) by where FSDP puts
    them: its layers (one unit each) and the rest (the root unit)."""
    total: int
    largest_layer: int
    root: int

    def scaled(self, dtype: str) -> Sizes:
        f = BYTES[dtype] / 4
        return Sizes(int(self.total * f), int(self.largest_layer * f), int(self.root * f))


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Bytes per GPU."""
    engine: str
    processes: int
    batch_size: int
    parameters: int
    """Held throughout: every parameter (DDP) or this process's shard of each (FSDP)."""
    gathered: int
    """FSDP: full copies gathered for compute at once (root unit and two layers); else 0."""
    gradients: int
    """float32 gradients of what trains (their shard under FSDP; twice under DDP, whose
    buckets hold a copy)."""
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return (self.parameters + self.gathered + self.gradients + self.optimizer
                + self.activations)

    def row(self) -> dict[str, float | int | str]:
        """GiB, for tables."""
        parts = ("parameters", "gathered", "gradients", "optimizer", "activations", "total")
        return {"engine": self.engine, "processes": self.processes,
                "batch_size": self.batch_size,
                **{f"{p}_gib": round(getattr(self, p) / GiB, 3) for p in parts}}


@functools.cache
def model_config(name: str):
    """The transformers config of a model reference (hub id, directory, .gguf file, zoo).
    Read once per name (a GGUF file takes seconds to parse); callers must not change it."""
    source, gguf_file = resolve(name)
    return AutoConfig.from_pretrained(source, **({"gguf_file": gguf_file} if gguf_file else {}))


def sizes(name: str, with_head: bool) -> Sizes:
    """accelerate's parameter sizes of ``name`` (float32), split into layers and root."""
    with init_empty_weights():
        model = (AutoModelForCausalLM if with_head else AutoModel).from_config(
            model_config(name), dtype=torch.float32)
    # An empty model's head is not yet tied to its embeddings (loading ties it); tie it, or a
    # tied head would be counted twice.
    model.tie_weights()
    total, _ = calculate_maximum_sizes(model)
    by_module = compute_module_sizes(model)
    layers = [by_module[n] for n, m in model.named_modules()
              if type(m).__name__ in (model._no_split_modules or ())]
    return Sizes(total, max(layers, default=0), total - sum(layers))


def trainable_bytes(model: MendConfig, distiller: Sizes) -> int:
    """float32 bytes of what trains: the distiller (or its LoRA adapters, counted on an empty
    model), the placeholders and the projection."""
    enc, llm = model_config(model.distiller), model_config(model.llm)
    d_enc, d_llm = _width(enc), _width(llm)
    extra = model.num_placeholders * d_enc
    if model.projection == "always" or (model.projection == "auto" and d_enc != d_llm):
        extra += d_enc * d_llm + d_llm
    if model.train_mode == "full":
        return distiller.total + 4 * extra

    with init_empty_weights():
        adapted = add_lora(AutoModel.from_config(enc), model.lora_r, model.lora_alpha, 0.0,
                           model.lora_target_modules)
    return 4 * (sum(p.numel() for p in adapted.parameters() if p.requires_grad) + extra)


def estimate(model: MendConfig, data: TextDataConfig, batch_size: int, engine: Engine,
             processes: int, mixed_precision: str = "no",
             activation_checkpointing: bool = False) -> Estimate:
    """Per-GPU bytes of stage 1 with ``model`` and ``data`` at ``batch_size`` per process."""
    if engine not in ("ddp", "fsdp", "8bit") or processes < 1:
        raise ConfigError(f"engine must be ddp, fsdp or 8bit and processes >= 1; got "
                          f"{engine!r} on {processes}.")
    distiller = sizes(model.distiller, with_head=False)
    llm = sizes(model.llm, with_head=True)
    trained = trainable_bytes(model, distiller)
    llm_dtype = "int8" if engine == "8bit" else model.llm_dtype
    params = distiller.scaled(model.distiller_dtype).total + llm.scaled(llm_dtype).total
    gathered, grads, moments = 0, trained, 2 * trained
    if engine == "fsdp":
        compute = "bfloat16" if mixed_precision == "bf16" else model.distiller_dtype
        gathered = (distiller.scaled(compute).root + llm.scaled(model.llm_dtype).root
                    + 2 * max(distiller.scaled(compute).largest_layer,
                              llm.scaled(model.llm_dtype).largest_layer))
        params, grads, moments = (params // processes, grads // processes,
                                  moments // processes)
    else:
        grads *= 2  # DDP's buckets hold a copy of the gradients
    per_example = activation_bytes(model, data, mixed_precision, activation_checkpointing)
    return Estimate(engine, processes, batch_size, params, gathered, grads, moments,
                    per_example * batch_size)


# --------------------------------------------------------------------------------------------
# Activations


def lengths(model: MendConfig, data: TextDataConfig, bos: int = 1) -> dict[str, int]:
    """Tokens per example in stage 1: a full window of ``data.max_length`` LLM tokens split at
    ``beta``, and the distiller's tokens for the same text (see :func:`token_ratio`)."""
    n = data.max_length - bos
    context = int(data.beta * n)
    return {"context": context, "input": n - context,
            "distiller": min(round(context * token_ratio(model)),
                             model.max_distiller_length - model.num_placeholders)}


def token_ratio(model: MendConfig) -> float:
    """Distiller tokens per LLM token on English text (:data:`mend.tiny.CORPUS`), where both
    tokenizers can be loaded here; 1.0 where one cannot (a hub model offline)."""

    try:
        counts = [len(load_tokenizer(name)(tiny.CORPUS, add_special_tokens=False)["input_ids"])
                  for name in (model.distiller, model.llm)]
    except (BackboneError, OSError, ValueError):
        return 1.0
    return counts[0] / counts[1]


@functools.cache
def activation_bytes(model: MendConfig, data: TextDataConfig, mixed_precision: str = "no",
                     activation_checkpointing: bool = False) -> int:
    """Measured bytes saved for backward by one example's step (see the module doc); the
    same for every engine, so measured once per setting."""
    depth = {"distiller": _depth(model_config(model.distiller)),
             "llm": _depth(model_config(model.llm))}
    n = lengths(model, data)
    base = _probe(model, n, 1, 1, mixed_precision, activation_checkpointing)
    per_layer = {"distiller": _probe(model, n, 2, 1, mixed_precision,
                                     activation_checkpointing) - base,
                 "llm": _probe(model, n, 1, 2, mixed_precision,
                               activation_checkpointing) - base}
    return base + sum((depth[k] - 1) * per_layer[k] for k in depth)


@contextlib.contextmanager
def saved_bytes(exclude: list[nn.Module]) -> Iterator[list[int]]:
    """Count the bytes autograd saves for backward inside the block (each storage once),
    leaving out the parameters of ``exclude``: ``with saved_bytes([m]) as n: ...; n[0]``."""
    params = {_local(p).untyped_storage().data_ptr() for m in exclude for p in m.parameters()}
    seen: dict[int, int] = {}
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        # A parameter saved by a layer is a weight, not an activation (FSDP's gathered copies
        # are parameters too, and are freed after the layer whatever autograd holds).
        if not isinstance(t, nn.Parameter) and ptr not in params and ptr not in seen:
            seen[ptr] = storage.nbytes()
            total[0] += seen[ptr]
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total


def _probe(model: MendConfig, n: dict[str, int], distiller_layers: int, llm_layers: int,
           mixed_precision: str, checkpointing: bool) -> int:
    """Bytes saved for backward by one example of :func:`lengths` ``n`` on the models cut to
    the given depths."""

    tok = tiny.tokenizer("metaspace")  # only bos and padding are read from it
    llm_dtype = "bfloat16" if model.llm_8bit else model.llm_dtype
    encoder = _cut(model.distiller, distiller_layers, model.distiller_dtype, head=False)
    llm = _cut(model.llm, llm_layers, llm_dtype, head=True)
    config = replace(model, llm_8bit=False, llm_dtype=llm_dtype)
    distiller = Distiller(config, encoder, tok, PrefixLM(llm, tok))
    if checkpointing:
        distiller.gradient_checkpointing_enable()
    ids = lambda k: torch.zeros(1, k, dtype=torch.long)  # noqa: E731
    ones = lambda k: torch.ones(1, k, dtype=torch.long)  # noqa: E731
    d = n["distiller"] + len(distiller._bos)
    batch = {"demo_ids": ids(d), "demo_mask": ones(d), "context_ids": ids(n["context"]),
             "context_mask": ones(n["context"]), "input_ids": ids(n["input"]),
             "input_mask": ones(n["input"]), "target_mask": ones(n["input"]).bool()}
    objective = MendObjective(distiller, ObjectiveConfig())
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed_precision == "bf16")
    with saved_bytes([distiller, llm]) as total, autocast:
        objective.loss(distiller, batch)["loss"]
    return total[0]


def _local(t: torch.Tensor) -> torch.Tensor:
    """A sharded parameter's local shard (FSDP's DTensors), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _cut(name: str, layers: int, dtype: str, head: bool) -> nn.Module:
    """``name``'s architecture with ``layers`` layers, weights left at zero (no init cost)."""
    cfg = copy.deepcopy(model_config(name))  # the cached config stays whole
    cfg.num_hidden_layers = layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:layers]
    with torch.device("meta"):
        model = (AutoModelForCausalLM if head else AutoModel).from_config(
            cfg, dtype=DTYPES[dtype], attn_implementation="sdpa")
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            t.zero_()
    return model


def _width(config) -> int:
    return getattr(config, "hidden_size", None) or config.n_embd


def _depth(config) -> int:
    return getattr(config, "num_hidden_layers", None) or config.n_layer
