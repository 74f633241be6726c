"""Load any transformers causal LM (hub id, local directory, ``.gguf`` file or zoo name).

Two roles use it:

- the **distiller** loads the base model (no LM head: only its hidden states are used),
  trainable, in ``distiller_dtype``;
- the **frozen LLM** loads with its head, in ``llm_dtype`` or 8-bit, with every parameter's
  ``requires_grad`` off and in eval mode. Gradients still flow *through* it to its inputs.

8-bit loading goes through bitsandbytes' LLM.int8(), on any device where bitsandbytes itself
runs it (CUDA; the CPU with bitsandbytes 0.50): :func:`bitsandbytes_problem` asks it, with
one small int8 layer. Asked for where it cannot run, it raises
:class:`~mend.errors.BackboneError` naming the reason, unless the caller allowed a fallback,
which loads in ``dtype`` with a warning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    GgufConfig,
)
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging as hf_logging

from mend import optional
from mend.core import zoo
from mend.errors import BackboneError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve(name: str) -> tuple[str, str | None]:
    """Map a model reference to ``(directory or hub id, gguf file name or None)``."""
    if zoo.is_zoo_name(name):
        return str(zoo_path(name)), None
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise BackboneError(f"GGUF file {p} does not exist.")
        return str(p.parent), p.name
    if p.exists() and not p.is_dir():
        raise BackboneError(f"{p} is a file but not a .gguf file: pass a model directory, a "
                            f"hub id, a .gguf file or a zoo name ({', '.join(zoo.ZOO)}).")
    if p.is_dir() and not (p / "config.json").is_file():
        raise BackboneError(f"{p} is a directory without config.json, so it is not a "
                            f"transformers model directory.")
    if not p.is_dir() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise BackboneError(f"Model directory {p} does not exist.")
    return name, None


def load_tokenizer(name: str):
    """The model's tokenizer, with a pad token (the EOS token where the model has none)."""
    source, gguf_file = resolve(name)
    _require_gguf(name, gguf_file)
    tok = _from_pretrained(AutoTokenizer, name, source, gguf_file=gguf_file)
    if tok.pad_token_id is None:
        # mend pads by hand and masks every pad position, so which id fills them is immaterial.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def load_model(name: str, *, with_head: bool = True, dtype: str = "float32",
               device: str | torch.device | None = None, load_in_8bit: bool = False,
               allow_8bit_fallback: bool = False,
               attn_implementation: str | None = "sdpa") -> nn.Module:
    """Load a causal LM (``with_head``) or its base model, in ``dtype`` or 8-bit."""
    source, gguf_file = resolve(name)
    _require_gguf(name, gguf_file)
    device = check_device(device)
    kwargs: dict = {"dtype": DTYPES[dtype]}
    if attn_implementation:
        kwargs["attn_implementation"] = check_attention(attn_implementation)
    if load_in_8bit:
        where = torch.device(device or pick_device())
        problem = bitsandbytes_problem(where)
        if problem is not None:
            if not allow_8bit_fallback:
                raise BackboneError(
                    f"8-bit loading of `{name}` was requested, but {problem}. Either install "
                    f"a bitsandbytes that runs LLM.int8() on {where.type} (`pip install "
                    f"'mend[8bit]'`), set llm_8bit=false, or set allow_8bit_fallback=true to "
                    f"load it in {dtype} instead.")
            warnings.warn(f"8-bit loading of `{name}` is not possible ({problem}); loading it "
                          f"in {dtype} because allow_8bit_fallback is set.", stacklevel=2)
            load_in_8bit = False
    if load_in_8bit:
        if gguf_file is not None:
            raise BackboneError(f"8-bit loading of the GGUF file {name} is not supported: use "
                                f"the zoo name or save it once as a transformers directory.")
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": where.index or 0} if where.type == "cuda" else {"": "cpu"}
        # Said on every 8-bit matmul of a model not in float16, and nothing to act on.
        warnings.filterwarnings("ignore", message=INT8_CAST)
    elif gguf_file is not None:
        kwargs.update(gguf_file=gguf_file, quantization_config=GgufConfig(dequantize=True))
    if with_head:
        model = _from_pretrained(AutoModelForCausalLM, name, source, **kwargs)
    else:
        # A causal-LM checkpoint read as a base model leaves its LM head unused by design;
        # transformers would print a load report about it on every load, so quiet it here.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model = _from_pretrained(AutoModel, name, source, **kwargs)
        finally:
            hf_logging.set_verbosity(verbosity)
    if device is not None and not load_in_8bit:
        model.to(device)
    return model


def init_vectors(embeddings: nn.Module, vocab_size: int, n: int, how: str,
                 dtype: torch.dtype) -> torch.Tensor:
    """``(n, d)`` learned vectors' starting values (MEND's placeholders, prompt tuning's
    prompt): the embeddings of ``n`` random tokens among the first ``vocab_size`` (``vocab``,
    Lester et al.), read through the module so that scaled embeddings (Gemma) stay right; or
    N(0, 0.02^2) (``random``)."""
    weight = embeddings.weight
    if how == "vocab":
        ids = torch.randperm(vocab_size)[:n] if n <= vocab_size else torch.randint(
            vocab_size, (n,))
        with torch.no_grad():
            return embeddings(ids.to(weight.device)).detach().clone().to(dtype)
    return torch.randn(n, weight.shape[1], dtype=dtype, device=weight.device) * 0.02


def add_lora(model: nn.Module, r: int, alpha: int, dropout: float,
             target_modules: str | Sequence[str]) -> nn.Module:
    """``model`` wrapped with peft's LoRA adapters on ``target_modules`` (a name list, or
    peft's regex string); only the adapters train."""
    with warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing`, which warns on
        # every wrap; nothing a user of mend can act on.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                category=FutureWarning)
        return get_peft_model(model, LoraConfig(
            r=r, lora_alpha=alpha, lora_dropout=dropout,
            target_modules=target_modules if isinstance(target_modules, str) else list(
                target_modules),
            # GPT-2 stores its linear layers transposed, as Conv1D.
            fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules())))


def pick_device(requested: str | None = None) -> str:
    """``requested`` (checked), else this process's device as accelerate sees it: the rank's
    GPU under a launcher, else CUDA when available, else the CPU."""
    if requested:
        return str(check_device(requested))
    return str(process_state().device)


def check_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` as a ``torch.device``, refused where it is not one or is not here."""
    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise BackboneError(f"`{device}` is not a device: use cpu, cuda or cuda:N.") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise BackboneError(f"device={device} asks for CUDA, and no CUDA device is available "
                            f"here. Use device=cpu (or leave it out: mend takes CUDA when "
                            f"there is one).")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise BackboneError(f"device={device}: this machine has {torch.cuda.device_count()} "
                            f"CUDA device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}.")
    return parsed


def check_attention(name: str) -> str:
    """An attention kernel transformers knows (its ``AttentionInterface``, or ``eager``)."""
    from transformers import AttentionInterface

    known = {"eager", *AttentionInterface()}
    if name not in known and not name.startswith("kernels-community/"):
        raise BackboneError(f"Unknown attn_implementation `{name}`; choose from "
                            f"{', '.join(sorted(known))} (or leave it out).")
    return name


def process_state():
    """accelerate's ``PartialState`` of this process (rank, device, main or not).

    The first one made fixes the process group for the whole run. accelerate's Accelerator
    reads ``ACCELERATE_USE_CPU`` (several CPU processes, as the tests launch them), and so
    must this, or CPU processes would each take themselves for the only one."""
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing, under either of transformers' method names
    (``activation_checkpointing_enable`` from 5.2x, ``gradient_checkpointing_enable`` before)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def freeze(model: nn.Module) -> nn.Module:
    """Turn off every parameter's gradient and put the model in eval mode (no dropout)."""
    model.requires_grad_(False)
    return model.eval()


def bitsandbytes_problem(device: str | torch.device = "cuda") -> str | None:
    """Why bitsandbytes cannot run LLM.int8() on ``device``, or None when it can: whether it
    is installed, and whether one small 8-bit layer runs forward and backward there (asked
    once per device type)."""
    if not optional.available("bitsandbytes"):
        return f"bitsandbytes is not installed ({optional.OPTIONAL['bitsandbytes'].install})"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available"
    return _int8_problem(device.type)


@functools.cache
def _int8_problem(device_type: str) -> str | None:
    import bitsandbytes as bnb  # optional: mend[8bit]

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=INT8_CAST)
            layer = bnb.nn.Linear8bitLt(8, 8, bias=False, has_fp16_weights=False).to(device_type)
            x = torch.ones(2, 8, device=device_type, requires_grad=True)
            layer(x).sum().backward()
    except Exception as e:  # noqa: BLE001 - any failure means this device cannot run it
        return (f"bitsandbytes {bnb.__version__} cannot run LLM.int8() on {device_type} "
                f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
    return None


INT8_CAST = "MatMul8bitLt: inputs will be cast from"
"""bitsandbytes' note, on every 8-bit matmul of a model that is not in float16, that it casts
the inputs to float16 to quantize them: nothing a user can act on, so mend filters it where
it runs an 8-bit LLM."""


def _require_gguf(name: str, gguf_file: str | None) -> None:
    if gguf_file is not None:
        optional.require("gguf", f"Reading the GGUF file of `{name}`")


def hidden_size(model: nn.Module) -> int:
    """Width of the model's input embeddings, which is what a prefix vector must match."""
    return model.get_input_embeddings().embedding_dim


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model was built for (None when it does not say)."""
    cfg = model.config
    cfg = getattr(cfg, "text_config", cfg)
    return getattr(cfg, "max_position_embeddings", None)


def _from_pretrained(auto, name: str, source: str, **kwargs):
    try:
        return auto.from_pretrained(source, **kwargs)
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise BackboneError(
            f"Could not load `{name}`: {e}\nPass a local model directory, a .gguf file or a "
            f"zoo name ({', '.join(zoo.ZOO)})"
            + (" (HF_HUB_OFFLINE=1 is set, so hub ids must already be cached)." if offline
               else ", or a hub id on a machine that can reach the hub.")) from e


def zoo_path(name: str) -> Path:
    """The local transformers directory of zoo model ``name``, converting it on first use.

    Conversion writes to a temporary directory and renames it, under a file lock, so
    concurrent processes (one per GPU) never see a half-written cache."""
    if name not in zoo.ZOO:
        raise BackboneError(f"`{name}` is not a zoo model. Zoo models: {', '.join(zoo.ZOO)}.")
    entry = zoo.ZOO[name]
    target = zoo.cache_root() / "zoo" / name
    if (target / "zoo.json").is_file():
        return target
    if not zoo.is_installed(name):
        raise BackboneError(f"Zoo model `{name}` needs the package {entry.package}, which is not "
                            f"installed. Install it with:\n    {entry.install}")
    from filelock import FileLock  # a dependency of transformers' hub client

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "zoo.json").is_file():  # another process may have finished meanwhile
            _convert_zoo(entry, target)
    return target


def zoo_from_gguf(name: str, gguf: str | Path) -> Path:
    """Convert a GGUF file of zoo model ``name`` that arrived without its package (carried to a
    machine with no network, say) into the zoo cache, where its name then resolves."""
    entry = zoo.ZOO[name]
    target = zoo.cache_root() / "zoo" / name
    if not (target / "zoo.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        _convert_zoo(dataclasses.replace(entry, locate=lambda scratch: Path(gguf)), target)
    return target


@contextlib.contextmanager
def _gguf_read_once():
    """Inside the block, the ``gguf`` package parses each file once and builds each tensor-name
    map once. transformers (5.x) parses a GGUF file anew for its config, its tokenizer and its
    weights, and rebuilds gguf's name map for every module it walks: on SmolLM2-135M, 12 s
    and 6 s of a 16 s conversion, which every new user pays on first use. Both are pure
    functions of their arguments (a read-only memory map; a lookup table), so they are
    memoised for the block and restored after it; where gguf lacks either name, nothing is
    changed and the conversion is only slower."""
    import gguf

    saved = {name: getattr(gguf, name) for name in ("GGUFReader", "get_tensor_name_map")
             if hasattr(gguf, name)}
    for name, fn in saved.items():
        setattr(gguf, name, functools.lru_cache(maxsize=None)(fn))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(gguf, name, fn)


def _convert_zoo(entry: zoo.ZooModel, target: Path) -> None:
    optional.require("gguf", f"Converting zoo model `{entry.name}` from its GGUF file (done once)")
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{entry.name}-") as tmp, \
            _gguf_read_once():
        gguf = entry.locate(Path(tmp))
        # The same GGUF path users get for a .gguf file: dequantized, real float32 weights.
        tokenizer = load_tokenizer(str(gguf))
        model = load_model(str(gguf), dtype="float32", attn_implementation=None)
        out = Path(tmp) / "model"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        try:
            version = importlib.metadata.version(entry.package)
        except importlib.metadata.PackageNotFoundError:  # a GGUF file carried without it
            version = None
        (out / "zoo.json").write_text(json.dumps({
            "name": entry.name, "package": entry.package, "package_version": version,
            "gguf_file": gguf.name, "description": entry.description}, indent=2))
        if target.exists():  # a stale or partial directory without zoo.json
            shutil.rmtree(target)
        os.replace(out, target)
