"""The engine a run trains on, as ``accelerate launch`` chose it, and what differs between
engines: one device, DDP, FSDP (FSDP2) or DeepSpeed ZeRO-3.

    accelerate launch --config_file configs/accelerate/fsdp.yaml pretrain/run.py --config ...

- **What accelerate prepares** is a :class:`TrainStep`: a module whose forward is the method's
  loss, so that every pass through the frozen LLM happens inside one forward of the prepared
  module, where a sharding engine gathers the parameters it needs. Under DDP (and on one
  device) it holds only the trained module; every rank keeps its own copy of the frozen LLM,
  as before. Under FSDP and DeepSpeed the frozen LLM is a submodule too, so its parameters
  are sharded across ranks with the distiller's; its layers become FSDP units beside the
  distiller's (``_no_split_modules`` names both models' layer classes for accelerate's
  ``TRANSFORMER_BASED_WRAP``).
- **What a checkpoint holds:** the trainable weights only. Frozen parameters and buffers (the
  LLM, a LoRA distiller's base weights) are left out of :class:`TrainStep`'s state dict and
  are taken from the loaded models on resume, so a checkpoint of a 13B-LLM run holds the
  distiller and its optimizer state, not 26 GB of weights nobody trains.
- **Reading the whole model** (model selection, the content monitor, the final save): a
  sharded model has no rank holding all of it. :func:`gathered` lets every rank run the same
  evaluation in step (each layer gathers its shards as it runs), and :func:`trained_state_dict`
  gathers the trained module's full weights onto the main process for ``save_pretrained``.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import inspect
import itertools
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from mend import optional
from mend.core.backbones import pick_device
from mend.errors import ConfigError

if TYPE_CHECKING:  # type hints only
    from mend.methods.base import Trainable
    from mend.training.config import TrainConfig

Engine = Literal["single", "ddp", "fsdp", "deepspeed"]
SHARDED = ("fsdp", "deepspeed")


def check_launch() -> None:
    """Fail early, naming the install command, when the launch config asks for DeepSpeed and
    it is not installed (accelerate would raise an ImportError from inside itself)."""
    if launched_sharded() == "deepspeed":
        optional.require("deepspeed", "The DeepSpeed engine (configs/accelerate/deepspeed_zero3"
                                      ".yaml)")


def end_launch() -> None:
    """Destroy the process group of a launch whose job finished on every rank. Left to
    interpreter shutdown, gloo's worker threads can outlive the interpreter and abort a run
    that succeeded (SIGABRT, "terminate called without an active exception"). Not after an
    error: a rank still waiting in a collective would hang on it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Every rank has returned from its last collective before any tears down, so no
        # rank's gloo threads are still reading from a peer that has gone; then the Python
        # objects that hold gloo work (finished collectives' handles and their tensors) are
        # freed while the interpreter is whole, not at its finalization
        # (pytorch/pytorch#179291 describes that abort).
        _all_returned()
        gc.collect()
        torch.distributed.destroy_process_group()
        gc.collect()


_ENDS = itertools.count()
"""How many launches this process has ended: each end's key on the store is its own."""


def _all_returned() -> None:
    """Wait until every rank is here. Under ``accelerate launch`` (torchrun), on the
    launcher's own store, which its agent hosts and which outlives the ranks: a gloo barrier
    cannot do this, since the rank that finishes it first may close its connections while a
    peer still reads the barrier's last message from them ("Connection closed by peer", seen
    once in 120 launches). Elsewhere (a process group set up by hand), a barrier."""
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "MASTER_PORT" not in env:
        torch.distributed.barrier()
        return
    store = torch.distributed.TCPStore(env.get("MASTER_ADDR", "localhost"),
                                       int(env["MASTER_PORT"]), is_master=False,
                                       timeout=datetime.timedelta(minutes=10))
    key = (f"mend/end/{env.get('TORCHELASTIC_RUN_ID', '')}/"
           f"{env.get('TORCHELASTIC_RESTART_COUNT', '0')}/{next(_ENDS)}")
    if store.add(key, 1) == torch.distributed.get_world_size():
        store.set(key + "/all", "1")
    store.wait([key + "/all"])


def launched_sharded() -> str | None:
    """The sharding engine ``accelerate launch`` asked for (``fsdp``, ``deepspeed``), read
    from the environment it sets, before any Accelerator exists; None otherwise."""
    for name in ("fsdp", "deepspeed"):
        if os.environ.get(f"ACCELERATE_USE_{name.upper()}", "false").lower() == "true":
            return name
    return None


def load_device(llm_8bit: bool = False) -> str:
    """Where a training recipe loads its models: the CPU when the launch shards them, since
    the engine moves each process's shard to its GPU itself (a 70B LLM does not fit one GPU
    whole); else this process's device. An 8-bit LLM under a sharding engine is refused here,
    before anything loads."""

    sharded = launched_sharded()
    if sharded is None:
        return pick_device()
    if llm_8bit:
        raise ConfigError(_NO_8BIT.format(engine=sharded))
    return "cpu"


_NO_8BIT = ("The frozen LLM is loaded in 8-bit (llm_8bit: true), whose weights {engine} cannot "
            "shard. Shard it in bf16 instead (model.llm_8bit=false model.llm_dtype=bfloat16), or "
            "keep 8-bit on one GPU or under DDP (configs/accelerate/multi_gpu.yaml).")


def engine_of(accelerator: Accelerator) -> Engine:
    """Which engine ``accelerator`` runs: ``single``, ``ddp``, ``fsdp`` or ``deepspeed``."""
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        if not accelerator.is_fsdp2:
            raise ConfigError("mend shards with FSDP2: set fsdp_version: 2 in the accelerate "
                              "config (configs/accelerate/fsdp.yaml).")
        return "fsdp"
    if kind == DistributedType.DEEPSPEED:
        return "deepspeed"
    return "ddp" if accelerator.num_processes > 1 else "single"


def frozen_models(module: nn.Module) -> list[nn.Module]:
    """The frozen LLM a trained module reads through (MEND's distiller and prompt tuning hold
    it as ``module.llm``, a :class:`~mend.core.prefix_lm.PrefixLM`), or none."""
    llm = getattr(module, "llm", None)
    model = getattr(llm, "model", None)
    return [model] if isinstance(model, nn.Module) else []


def check_shardable(method: Trainable, accelerator: Accelerator, train_cfg: TrainConfig) -> None:
    """A sharding engine needs a method that saves from gathered weights, and a frozen LLM
    whose parameters it can shard (not bitsandbytes' 8-bit ones); DeepSpeed, settings that
    agree with the loop's (:func:`_check_deepspeed`)."""
    name = type(method).__name__
    if "state_dict" not in inspect.signature(method.save_pretrained).parameters:
        raise ConfigError(f"{name} trains on one device or under DDP only; launch it with "
                          f"configs/accelerate/multi_gpu.yaml (FSDP and DeepSpeed are for MEND "
                          f"and prompt tuning).")
    for model in frozen_models(method.module):
        if getattr(model, "is_loaded_in_8bit", False):
            raise ConfigError(_NO_8BIT.format(engine=engine_of(accelerator)))
    if engine_of(accelerator) == "deepspeed":
        _check_deepspeed(accelerator, train_cfg)
    config = getattr(method.module, "config", None)
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if getattr(config, "output", None) == "kv" and getattr(plugin, "activation_checkpointing",
                                                            False):
        raise ConfigError("fsdp_activation_checkpointing recomputes the LLM's layers in the "
                          "backward pass, which would append the key/value prefix (output: kv) "
                          "to its cache twice. Set fsdp_activation_checkpointing: false in the "
                          "accelerate config, or use output: embeddings.")


def _check_deepspeed(accelerator: Accelerator, train_cfg: TrainConfig) -> None:
    """DeepSpeed steps the optimizer inside its backward and clips by its own config, so the
    loop's accumulation and clipping must be what DeepSpeed's config says. It also reads the
    batch size from a dataloader, which this loop does not hand to accelerate: it is set
    here, as accelerate's error for that case asks."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = train_cfg.batch_size
    ds["train_batch_size"] = train_cfg.batch_size * accelerator.num_processes
    steps, clip = ds.get("gradient_accumulation_steps", 1), ds.get("gradient_clipping")
    if train_cfg.grad_accum != 1 or steps not in (1, "auto"):
        raise ConfigError(f"Under DeepSpeed, accumulate with more processes or a larger "
                          f"train.batch_size: set train.grad_accum=1 (now "
                          f"{train_cfg.grad_accum}) and gradient_accumulation_steps: 1 in the "
                          f"accelerate config (now {steps}).")
    if clip not in ("auto", train_cfg.max_grad_norm):
        raise ConfigError(f"DeepSpeed clips gradients to its config's gradient_clipping "
                          f"({clip}), which differs from train.max_grad_norm "
                          f"({train_cfg.max_grad_norm}); make them equal.")


class TrainStep(nn.Module):
    """What accelerate prepares: ``forward(batch)`` is ``method.loss(trained, batch)``.

    Args:
        method: a :class:`~mend.methods.base.Trainable`.
        shard_frozen: hold the frozen LLM as a submodule (``frozen``), for engines that shard
            parameters; under DDP it stays outside, one copy per rank.
    """

    def __init__(self, method: Trainable, shard_frozen: bool):
        super().__init__()
        self.trained = method.module
        self.frozen = nn.ModuleList(frozen_models(method.module) if shard_frozen else [])
        self._loss = method.loss
        layers = set()
        for model in (*self.trained.modules(), *self.frozen):
            layers.update(getattr(model, "_no_split_modules", None) or [])
        # accelerate's TRANSFORMER_BASED_WRAP reads the layer classes to shard from here.
        self._no_split_modules = sorted(layers)
        # By state-dict key, so that tied weights (an LM head sharing the embeddings) count
        # under each of their names.
        self._untrained = {name for name, value in self.state_dict(keep_vars=True).items()
                           if not value.requires_grad}
        self._keep_untrained = False
        self.register_state_dict_post_hook(_drop_untrained)
        self.register_load_state_dict_pre_hook(_restore_untrained)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self._loss(self.trained, batch)

    @contextlib.contextmanager
    def whole_state_dict(self) -> Iterator[None]:
        """Frozen weights in the state dict too, for the block: accelerate's FSDP loading on
        the main process only (``fsdp_cpu_ram_efficient_loading``) sends every other rank its
        weights, the LLM's included, from the main process's state dict."""
        self._keep_untrained = True
        try:
            yield
        finally:
            self._keep_untrained = False

    def train(self, mode: bool = True) -> TrainStep:
        """Train mode for the trained module only: the frozen LLM stays in eval mode (no
        dropout), as it does outside this module under DDP."""
        super().train(mode)
        self.frozen.eval()
        return self


def _drop_untrained(module: TrainStep, state_dict: dict[str, Any], prefix: str,
                    local_metadata: dict[str, Any]) -> None:
    """State-dict post-hook: leave out frozen parameters and buffers (see the module doc)."""
    if not module._keep_untrained:
        for name in module._untrained:
            state_dict.pop(prefix + name, None)


def _restore_untrained(module: TrainStep, state_dict: dict[str, Any], prefix: str, *args) -> None:
    """Load pre-hook: what :func:`_drop_untrained` left out is loaded from the module itself
    (names and tensors as its own state dict gives them, sharded ones included). Checkpoints
    written before this module existed hold the trained module's own keys, and load too."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        if not key[len(prefix):].startswith(("trained.", "frozen.")):
            state_dict[f"{prefix}trained.{key[len(prefix):]}"] = state_dict.pop(key)
    with module.whole_state_dict():
        own = module.state_dict(prefix=prefix, keep_vars=True)
    for name in module._untrained:
        if prefix + name in own:
            state_dict.setdefault(prefix + name, own[prefix + name])


@contextlib.contextmanager
def gathered(accelerator: Accelerator, model: nn.Module) -> Iterator[None]:
    """Run code that reads the prepared model outside its forward (evaluation, monitoring).

    Under FSDP the root unit's parameters (embeddings, norms, heads, placeholders) are
    gathered for the block, and each layer gathers its own as it runs, so every rank must run
    the same code in step. DeepSpeed ZeRO-3 gathers each module's parameters as it runs; on
    one device and under DDP nothing is sharded.
    """
    if engine_of(accelerator) != "fsdp":
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def trained_state_dict(accelerator: Accelerator, model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained module's full state dict (frozen parameters left out) on the main process,
    an empty dict on the others; every rank must call it, since the weights are gathered.

    FSDP gathers through accelerate's ``get_state_dict``, which reads :class:`TrainStep`'s
    state dict, so the frozen LLM is never gathered. Under ZeRO-3 only the trained module's
    parameters are gathered (DeepSpeed's ``GatheredParameters``), for the same reason."""
    if engine_of(accelerator) == "deepspeed":
        import deepspeed  # optional: mend[deepspeed]
        trained = accelerator.unwrap_model(model).trained
        with deepspeed.zero.GatheredParameters(list(trained.parameters())):
            if not accelerator.is_main_process:
                return {}
            return {k: v.detach().cpu().clone() for k, v in trained.state_dict().items()}
    state = accelerator.get_state_dict(model)
    return {k[len("trained."):]: v for k, v in (state or {}).items()
            if k.startswith("trained.")}


def save_state_kwargs(accelerator: Accelerator) -> dict[str, Any]:
    """Keyword arguments for ``accelerator.save_state``: DeepSpeed writes its own checkpoint,
    told to leave the frozen parameters out as :class:`TrainStep`'s state dict does."""
    return {"exclude_frozen_parameters": True} if engine_of(accelerator) == "deepspeed" else {}
