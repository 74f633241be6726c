"""Tiny random models and tokenizers, built from configs in milliseconds, with no download.

They go through the same loading path as real models: :func:`build` saves a transformers
directory (weights plus tokenizer) that ``MendConfig(distiller=..., llm=...)`` can name. The
tests use them, and so does ``mend demo --tiny``.

Two tokenizer styles cover the two families mend must handle:

- ``bytelevel``: GPT-2 style byte-level BPE; spaces are part of tokens; no BOS is added.
- ``metaspace``: SentencePiece style (``▁`` marks a space); a BOS token is added.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer
from transformers import PreTrainedTokenizerFast

from mend._files import user_mode

ARCHS = ("gpt2", "opt", "llama", "qwen2", "gemma3")
"""The causal architectures; ``t5`` (seq2seq) is built too, for the step-by-step student."""

CORPUS = """\
The film was great and the actors were wonderful. The plot was dull and the movie was too long.
A joyless film with a weak script. What a delightful story, full of warmth and humour!
Question: is the sky blue? Answer: yes. Question: is fire cold? Answer: no.
positive negative neutral entailment contradiction true false yes no
Paris is the capital of France. Berlin is the capital of Germany. Rome is in Italy.
The cat sat on the mat while the dog slept by the door. Birds sing in the morning.
one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9 + - = ? ! . , : ;
Review: an instant classic. Sentiment: positive. Review: a waste of time. Sentiment: negative.
"""


def tokenizer(style: str = "bytelevel", vocab_size: int = 384):
    """A fast tokenizer trained on :data:`CORPUS`; deterministic for a given style and size."""
    if style == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                             show_progress=False)
        tok.train_from_iterator(CORPUS.splitlines(), trainer)
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                       eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    if style == "metaspace":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
        trainer = BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
        tok.train_from_iterator(CORPUS.splitlines(), trainer)
        bos = tok.token_to_id("<bos>")
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>",
                                       eos_token="<eos>", unk_token="<unk>", pad_token="<pad>")
    raise ValueError(f"Unknown tokenizer style {style!r}: use 'bytelevel' or 'metaspace'.")


def model(arch: str, vocab_size: int, hidden: int = 32, layers: int = 2, seed: int = 0,
          max_positions: int = 2048, tok=None):
    """A randomly initialised causal LM of architecture ``arch`` (one of :data:`ARCHS`)."""
    special = {}
    if tok is not None:
        special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    common = dict(vocab_size=vocab_size, num_hidden_layers=layers, num_attention_heads=2,
                  max_position_embeddings=max_positions, **special)
    decoder = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_key_value_heads=1)
    configs = {
        "gpt2": lambda: tf.GPT2Config(vocab_size=vocab_size, n_positions=max_positions,
                                      n_embd=hidden, n_layer=layers, n_head=2, **special),
        "opt": lambda: tf.OPTConfig(hidden_size=hidden, ffn_dim=2 * hidden,
                                    word_embed_proj_dim=hidden, **common),
        "llama": lambda: tf.LlamaConfig(**decoder, **common),
        "qwen2": lambda: tf.Qwen2Config(**decoder, **common),
        # A short sliding window, so tests exercise Gemma's local attention too.
        "gemma3": lambda: tf.Gemma3TextConfig(
            **decoder, **common, head_dim=hidden // 2, sliding_window=8,
            layer_types=["sliding_attention", "full_attention"][:layers]),
    }
    if arch == "t5":
        torch.manual_seed(seed)
        return tf.AutoModelForSeq2SeqLM.from_config(tf.T5Config(
            vocab_size=vocab_size, d_model=hidden, d_kv=hidden // 2, d_ff=2 * hidden,
            num_layers=layers, num_heads=2, decoder_start_token_id=special.get("pad_token_id", 0),
            **special))
    if arch not in configs:
        raise ValueError(f"Unknown tiny architecture {arch!r}; choose from {ARCHS} or t5.")
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(configs[arch]())


def build(directory: str | Path, arch: str = "llama", style: str = "bytelevel",
          hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """Save a tiny model and its tokenizer as a transformers directory; returns its path.

    The directory is written whole beside its place and renamed into it, under a file lock,
    so an interrupted build (Ctrl-C, a kill) or two processes building at once never leave a
    half-written one; one found incomplete (a build by an older mend) is built again. The
    models are deterministic, so a rebuilt one is the same model."""
    directory = Path(directory)
    if _complete(directory):
        return directory
    from filelock import FileLock  # a dependency of transformers' hub client

    directory.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(directory) + ".lock"):
        if _complete(directory):  # another process built it meanwhile
            return directory
        staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}-"))
        try:
            tok = tokenizer(style)
            lm = model(arch, len(tok), hidden=hidden, layers=layers, seed=seed, tok=tok)
            lm.save_pretrained(staging)
            tok.save_pretrained(staging)
            user_mode(staging, *staging.iterdir())
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(staging, directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return directory


def _complete(directory: Path) -> bool:
    """Whether ``directory`` holds a whole tiny model: a readable config, weights and a
    tokenizer."""
    try:
        json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (any(directory.glob("*.safetensors"))
            and (directory / "tokenizer.json").is_file())
