"""The MEND distiller: demonstrations in, ``l`` vectors for a frozen LLM out.

    demonstration text --(distiller tokenizer)--> [pad.. demo tokens | l placeholders]
        --(distiller LM)--> last-layer hidden states at the placeholders
        --(Linear+Tanh when hidden sizes differ)--(RMSNorm with vector_norm: match)-->
        (B, l, d_llm) vectors

The vectors replace the demonstrations in front of the frozen LLM (:mod:`mend.core.prefix_lm`).
Compress once, then score or generate for as many queries as you like::

    distiller = Distiller.from_config(MendConfig(distiller="smollm2-135m", llm="smollm2-135m"))
    ctx = distiller.compress([("great movie!", "positive"), ("dull plot", "negative")])
    scores = distiller.score(ctx, ["a joyless film"], options=[["positive", "negative"]])

The module's parameters are only what trains (the distiller LM or its LoRA adapters, the
placeholders and the projection); the frozen LLM is held beside them, not inside them.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from mend.config import from_dict, replace, to_dict
from mend.core import attention, checkpoint, context, kv_cache, seeding, trainable
from mend.core import compaction as compactions
from mend.core.backbones import (
    DTYPES,
    add_lora,
    enable_checkpointing,
    hidden_size,
    init_vectors,
    load_model,
    load_tokenizer,
    max_positions,
)
from mend.core.compaction.learned import LearnedScorer
from mend.core.config import FrozenLLM, MendConfig
from mend.core.context import DistilledContext, ServesContext
from mend.core.kv_cache import Prefill
from mend.core.prefix_lm import PrefixLM
from mend.core.refine import check_steps, refine_each
from mend.core.text import DemoFormat, Demos, bos_ids, encode, fit, positions
from mend.counters import Counters
from mend.errors import CheckpointError, ConfigError, InputError, TruncationWarning

__all__ = ["DistilledContext", "Distiller", "read_config"]

CONFIG_FILE, WEIGHTS_FILE = (p.name for p in checkpoint.paths(".", "mend"))


# Fields that define a checkpoint's weights: a stage-2 run started from a stage-1 checkpoint
# must agree on them; load-time fields (dtype, 8-bit, separators) may differ.
IDENTITY = ("distiller", "llm", "num_placeholders", "output", "projection", "train_mode", "lora_r",
            "lora_target_modules", "learned_scorer", "seeded_placeholders")


class Distiller(ServesContext, nn.Module):
    """Demonstrations in, ``l`` vectors (or a key/value prefix) out; see the module docs."""

    def __init__(self, config: MendConfig, encoder: nn.Module, tokenizer, llm: PrefixLM):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.llm = llm  # a plain object, not a submodule: never trained, saved or DDP-wrapped
        self.format = DemoFormat(config.io_sep, config.demo_sep)
        self._bos = bos_ids(tokenizer)
        d_enc, d_llm = hidden_size(encoder), llm.hidden_size
        if config.output != "embeddings" and kv_cache.shapes(encoder.config) != kv_cache.shapes(
                llm.model.config):
            raise InputError(
                f"output: {config.output} hands the distiller's keys and values to the LLM, so "
                f"both need the "
                f"same (layers, key/value heads, head size); the distiller has "
                f"{kv_cache.shapes(encoder.config)} and the LLM "
                f"{kv_cache.shapes(llm.model.config)}. Use the LLM itself as the distiller "
                f"(train_mode: lora keeps it small), or output: embeddings.")
        # A compacted cache and seeded placeholders are picked from a repeat pass.
        repeats = config.output == "compacted" or config.seeded_placeholders > 0
        reads = config.max_distiller_length * (2 if repeats else 1)
        limit = max_positions(encoder)
        if limit is not None and reads > limit:
            raise ConfigError(
                f"The distiller reads up to {reads} positions (max_distiller_length "
                f"{config.max_distiller_length}"
                + (", twice: the demonstrations and their repeat" if reads > config.
                   max_distiller_length else "")
                + f") but `{config.distiller}` takes {limit}. Lower max_distiller_length.")
        if (config.output == "embeddings" and llm.max_length is not None
                and config.num_placeholders + len(llm.bos) >= llm.max_length):
            raise ConfigError(f"{config.num_placeholders} placeholders leave no room for a "
                              f"query in the LLM's {llm.max_length} positions. Use fewer.")
        if config.projection == "none" and d_enc != d_llm:
            raise InputError(f"The distiller's hidden size ({d_enc}) differs from the LLM's "
                             f"({d_llm}), and projection='none' forbids mapping between them. "
                             f"Set projection='auto'.")
        weight = encoder.get_input_embeddings().weight
        self._prompt: list[int] | None = None
        """What the repeat pass reads before the demonstrations again, where one is read."""
        self.compaction = None
        """With ``output: compacted``: the compaction of the distiller's own cache."""
        self.scorer: LearnedScorer | None = None
        """With ``learned_scorer``: its corrections of the compaction's scores."""
        if config.output == "compacted":
            # No placeholder is read: the kept positions are the demonstrations' own. An
            # empty, frozen tensor keeps the checkpoint's layout and leaves DDP nothing unused.
            self.compaction = compactions.get(config.compaction)
            self._prompt = (compactions.prompt_ids(tokenizer, self.format)
                            if self.compaction.needs_repeat else None)
            self.placeholders = nn.Parameter(weight.new_zeros(0, weight.shape[1]),
                                             requires_grad=False)
            if config.learned_scorer:  # float32, as LoRA's adapters are
                layers, _, head_dim = kv_cache.shapes(encoder.config)
                self.scorer = LearnedScorer(layers, head_dim).to(weight.device)
        else:
            self.placeholders = nn.Parameter(self._init_placeholders(encoder, weight.dtype))
        self.gates: seeding.Gates | None = None
        """With ``seeded_placeholders``: how far the seeded placeholders read past their token."""
        if config.seeded_placeholders:
            self._prompt = compactions.prompt_ids(tokenizer, self.format)
            layers = kv_cache.shapes(encoder.config)[0]
            heads = getattr(encoder.config, "text_config", encoder.config).num_attention_heads
            self.gates = seeding.Gates(layers, heads, weight.device)
        self.projection: nn.Module = nn.Identity()
        if config.projection == "always" or (config.projection == "auto" and d_enc != d_llm):
            self.projection = nn.Sequential(
                nn.Linear(d_enc, d_llm, dtype=weight.dtype, device=weight.device), nn.Tanh())
        if config.vector_norm == "match":
            self.projection = nn.Sequential(*_layers(self.projection), _matched_norm(llm, weight))
        if config.train_mode == "lora":
            encoder = add_lora(encoder, config.lora_r, config.lora_alpha, config.lora_dropout,
                               config.lora_target_modules)
        self.encoder = encoder
        self.merged = False
        """True once :meth:`merge_adapters` has folded the LoRA adapters in (inference only)."""

    def _init_placeholders(self, encoder: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        emb = encoder.get_input_embeddings()
        learned = self.config.num_placeholders - self.config.seeded_placeholders
        return init_vectors(emb, min(len(self.tokenizer), emb.num_embeddings), learned,
                            self.config.placeholder_init, dtype)

    # ----------------------------------------------------------------------------------------
    # Building and saving

    @classmethod
    def from_config(cls, config: MendConfig, device: str | torch.device | None = None
                    ) -> Distiller:
        """Load the distiller and the frozen LLM that ``config`` names; fresh placeholders."""
        encoder = load_model(config.distiller, with_head=False, dtype=config.distiller_dtype,
                             device=device, attn_implementation=config.attn_implementation)
        return cls(config, encoder, load_tokenizer(config.distiller),
                   PrefixLM.load(FrozenLLM.of(config), device))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device | None = None,
                        **overrides) -> Distiller:
        """Rebuild a saved distiller. ``overrides`` change load-time settings of the config,
        e.g. ``llm_8bit=False`` to run an 8-bit-trained distiller on a CPU."""
        if path is None:
            raise CheckpointError("from_pretrained needs a checkpoint directory (what "
                                  "save_pretrained wrote, or a training run's output_dir); got "
                                  "None.")
        config = read_config(path)
        if overrides:
            config = replace(config, **overrides)
        model = cls.from_config(config, device=device)
        model.load_trainable_state_dict(checkpoint.load_weights(path, "mend"))
        return model

    def save_pretrained(self, path: str | os.PathLike, dtype: torch.dtype | None = None,
                        state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write the trainable weights (safetensors) and the config (JSON) to ``path``.

        ``dtype`` stores the weights in another floating dtype (``torch.bfloat16`` halves a
        checkpoint that is shipped; loading casts them back to the model's dtype).
        ``state_dict``: this module's weights as gathered from a sharded run (FSDP,
        DeepSpeed), where the module itself holds only its shard; by default its own."""
        state = self.trainable_state_dict(state_dict)
        if dtype is not None:
            dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
            if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
                raise InputError(f"save_pretrained stores the weights in a floating dtype "
                                 f"(torch.bfloat16, torch.float16, torch.float32 or their "
                                 f"names), not {dtype!r}: an integer dtype would round them "
                                 f"to nothing.")
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        checkpoint.save(path, "mend", to_dict(self.config), state)

    def merge_adapters(self) -> Distiller:
        """Fold the LoRA adapters into the distiller's weights, for inference: the same vectors
        without the adapters' extra matmuls per layer (compress runs about 1.5x faster on a
        CPU). A merged distiller is no longer an adapter to train or save. Returns ``self``."""
        if self.config.train_mode == "lora" and not self.merged:
            self.encoder = self.encoder.merge_and_unload()
            self.merged = True
        return self

    def trainable_state_dict(self, state_dict: dict[str, torch.Tensor] | None = None
                             ) -> dict[str, torch.Tensor]:
        """Placeholders, projection, the learned scorer, and the distiller's weights (or only
        its LoRA adapters), taken from ``state_dict`` (this module's, gathered from a sharded
        run) or from the module itself (:func:`mend.core.trainable.state_of`)."""
        return trainable.state_of(self, state_dict)

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`trainable_state_dict`; checks every shape before copying."""
        trainable.load_into(self, state)

    def gradient_checkpointing_enable(self) -> None:
        """Trade compute for memory in the distiller and in the frozen LLM's student pass.

        Not with a cache output (``kv``, ``compacted``): transformers turns a layer's cache
        off under checkpointing, and there the cache is the distiller's output and the LLM's
        prefix. A warning says so, and training runs without it (the LLM then reads only the
        inputs, not the prefix, so its pass is small)."""
        if self.config.output != "embeddings":
            warnings.warn(f"gradient checkpointing has no effect with output: "
                          f"{self.config.output} (the key/value prefix is a cache, which "
                          f"checkpointed layers drop).", stacklevel=2)
            return
        enable_checkpointing(self.encoder)
        self.llm.gradient_checkpointing_enable()

    # ----------------------------------------------------------------------------------------
    # Distilling

    def tokenize(self, demo_sets: Sequence[Demos], counters: Counters | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Demonstration sets -> left-padded ``(B, S)`` distiller ids and mask, and ``S``.

        Truncation rule: a set may use ``max_distiller_length - num_placeholders`` tokens
        (bos included; with ``output: compacted``, which reads no placeholder,
        ``max_distiller_length``). Whole demonstrations are kept in order while they fit; the
        first one that does not fit, and every one after it, is dropped. If even the first
        does not fit, it is cut to the budget, keeping its first tokens. A
        :class:`TruncationWarning` counts the demonstrations and tokens dropped, or, when
        ``counters`` is given (training pipelines), the counts are added there instead.

        With a compaction that reads the demonstrations twice (:mod:`mend.core.compaction`),
        and with seeded placeholders (picked the same way), each row goes on with its repeat
        pass, right-padded after column ``S``.
        """
        budget = self.config.max_distiller_length - (
            0 if self.compaction is not None else self.config.num_placeholders)
        seqs, dropped_demos, dropped_tokens, cut_sets = [], 0, 0, 0
        for demos in demo_sets:
            pieces = encode(self.tokenizer, self.format.pieces(demos))
            seq, demos_out, tokens_out = fit(pieces, budget, head=self._bos)
            seqs.append(seq)
            dropped_demos += demos_out
            dropped_tokens += tokens_out
            cut_sets += tokens_out > 0
        if counters is not None:
            counters.add("distiller_demos_dropped", dropped_demos)
            counters.add("distiller_tokens_dropped", dropped_tokens)
        elif cut_sets:
            warnings.warn(
                f"{cut_sets} of {len(seqs)} demonstration set(s) exceeded the distiller budget of "
                f"{budget} tokens (max_distiller_length {self.config.max_distiller_length}"
                + ("" if self.compaction is not None else
                   f" - {self.config.num_placeholders} placeholders")
                + f"): dropped {dropped_demos} demonstration(s) and {dropped_tokens} token(s) in "
                  f"all.", TruncationWarning, stacklevel=2)
        ids, mask, width = compactions.layout(seqs, len(self._bos), self._prompt,
                                              self.tokenizer.pad_token_id)
        device = self.placeholders.device
        return ids.to(device), mask.to(device), width

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                width: int | None = None) -> torch.Tensor | Prefill:
        """Distill tokenized demonstrations (from :meth:`tokenize`) into vectors.

        Args:
            input_ids: ``(B, S)`` left-padded distiller token ids (then the repeat pass, with
                ``output: compacted`` and a compaction that reads one).
            attention_mask: ``(B, S)``, 1 on real tokens.
            width: where the demonstrations end and a repeat pass begins (None: no repeat).

        Returns:
            ``(B, l, d_llm)`` in the LLM's dtype; differentiable w.r.t. the trainable weights.
            With ``output: kv``, a :class:`~mend.core.kv_cache.Prefill` of ``B`` rows instead: each
            layer's keys and values at bos and the ``l`` placeholders (differentiable too).
            With ``output: compacted``, a ``Prefill`` of the distiller's own cache of the
            demonstrations, compacted to bos and ``l`` positions (and the fitted bias).
            With ``seeded_placeholders``, the ``kv`` prefix of :mod:`mend.core.seeding`.
        """
        b, num_placeholders = input_ids.shape[0], self.config.num_placeholders  # the paper's l
        if self.compaction is not None:
            embeds = self.encoder.get_input_embeddings()(input_ids)
            head = compactions.compact(self.encoder, embeds, attention_mask,
                                       input_ids.shape[1] if width is None else width,
                                       self.compaction, num_placeholders + 1, self.scorer)
            return kv_cache.cast(head, self.llm.dtype)
        if num_placeholders == 0:
            return self.placeholders.new_zeros(b, 0, self.llm.hidden_size).to(self.llm.dtype)
        embeds = self.encoder.get_input_embeddings()(input_ids)
        if self.gates is not None:
            return self._seeded(embeds, attention_mask, width)
        embeds = torch.cat([embeds, self.placeholders.to(embeds.dtype).expand(b, -1, -1)], 1)
        mask = torch.cat([attention_mask, attention_mask.new_ones(b, num_placeholders)], dim=1)
        # Left padding keeps the placeholders in the last l columns for every row, and the
        # position ids skip the padding, so a set gives the same vectors alone or in a batch.
        kv = self.config.output == "kv"
        out = self.encoder(inputs_embeds=embeds, attention_mask=mask,
                           position_ids=positions(mask), use_cache=kv)
        if kv:
            return kv_cache.from_distiller(out.past_key_values, mask,
                                           out.last_hidden_state[:, -1], num_placeholders,
                                           self.llm.dtype)
        return self.projection(out.last_hidden_state[:, -num_placeholders:]).to(self.llm.dtype)

    def _seeded(self, embeds: torch.Tensor, mask: torch.Tensor, width: int) -> Prefill:
        """``output: kv`` with seeded placeholders (:mod:`mend.core.seeding`): ``(B, S + Q,
        d)`` embeddings of the demonstrations and their repeat pass (:meth:`tokenize`), their
        mask, and ``S``, in; the prefix of bos and the ``l`` placeholders out, positioned as
        the tokens they copy."""
        m = self.config.seeded_placeholders
        learned = self.config.num_placeholders - m
        index, valid = seeding.pick(self.encoder, embeds, mask, width, m)
        embeds, mask = embeds[:, :width], mask[:, :width]  # the main pass reads no repeat
        b, s = mask.shape
        full, wide, pos = seeding.layout(mask, index, valid, learned)
        seeded = embeds.gather(1, index[..., None].expand(-1, -1, embeds.shape[-1]))
        embeds = torch.cat([embeds, seeded, self.placeholders.to(embeds.dtype).expand(b, -1, -1)],
                           1)
        with attention.kernel(self.encoder):
            out = self.encoder(inputs_embeds=embeds, attention_mask=full, position_ids=pos,
                               use_cache=True, reopen=(wide, list(self.gates())))
        # With every placeholder seeded, the first query token is predicted where the
        # demonstrations end, as from the LLM's own cache; with learned ones, at the last.
        last = out.last_hidden_state[:, s - 1 if learned == 0 else -1]
        kept = torch.cat([mask, valid.to(mask.dtype), mask.new_ones(b, learned)], 1)
        head = kv_cache.from_distiller(out.past_key_values, kept, last,
                                       self.config.num_placeholders, self.llm.dtype)
        # The query continues after the demonstrations and the learned placeholders: the
        # seeded ones sit at their tokens' positions.
        head.mask[:, 1:1 + m] = valid
        head.offset = mask.sum(-1) + learned
        return head

    @torch.no_grad()
    def compress(self, demos: Demos, refine_steps: int = 0) -> DistilledContext:
        """Distill one demonstration set: pairs, strings, or one string. ``(1, l, d_llm)``.

        ``refine_steps`` > 0 then optimises this context alone against the ICL teacher on its
        own demonstrations, leave-one-out (:func:`mend.core.refine.refine`): a one-off cost
        per context, none per query."""
        return self.compress_batch([demos], refine_steps=refine_steps)

    @torch.no_grad()
    def compress_batch(self, demo_sets: Sequence[Demos], batch_size: int = 16,
                       refine_steps: int = 0) -> DistilledContext:
        """Distill many demonstration sets, ``batch_size`` at a time. ``(B, l, d_llm)``.
        ``refine_steps``: as in :meth:`compress`, for each set on its own."""
        demo_sets = context.demo_sets(demo_sets)
        context.count(batch_size, "batch_size")
        check_steps(refine_steps)
        was_training = self.training
        self.eval()
        try:
            rows = [self(*self.tokenize(demo_sets[i:i + batch_size]))
                    for i in range(0, len(demo_sets), batch_size)]
        finally:
            self.train(was_training)
        ctx = DistilledContext.cat([DistilledContext.of(r) for r in rows])
        return refine_each(self.llm, self.format, ctx, demo_sets, refine_steps)


def read_config(path: str | os.PathLike) -> MendConfig:
    """The :class:`MendConfig` stored in a checkpoint directory."""
    try:
        return from_dict(MendConfig, checkpoint.read_config(path, "mend"))
    except ConfigError as e:
        if "Unknown config key" not in str(e):
            raise
        raise CheckpointError(f"{path} holds a setting this mend does not know ({e}) It was "
                              f"probably written by a newer mend: upgrade mend (pip install -U "
                              f"mend, or pull and reinstall it).") from None


def _layers(module: nn.Module) -> list[nn.Module]:
    if isinstance(module, nn.Identity):
        return []
    return list(module) if isinstance(module, nn.Sequential) else [module]


def _matched_norm(llm: PrefixLM, like: torch.Tensor) -> nn.RMSNorm:
    """An RMSNorm over the LLM's hidden size (in ``like``'s dtype and device, the distiller's)
    whose gains start at the RMS of the LLM's token embeddings, taken through its embedding
    module so that Gemma's scaled embeddings count as the LLM sees them."""
    vocab = llm.model.get_input_embeddings().weight.shape[0]
    ids = torch.randperm(vocab, generator=torch.Generator().manual_seed(0))[:4096]
    with torch.no_grad():
        rms = llm.embed(ids).float().pow(2).mean().sqrt().item()
    norm = nn.RMSNorm(llm.hidden_size, eps=1e-6, device=like.device, dtype=like.dtype)
    nn.init.constant_(norm.weight, rms)
    return norm

