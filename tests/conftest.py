"""Shared fixtures: tiny random models saved as real transformers directories."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mend import Distiller, MendConfig, tiny

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
"""The project's data, beside the checkout (``../shared``); tests that need it skip without it."""

# The tokenizer family each tiny architecture is paired with, like its real counterpart.
STYLE = {"gpt2": "bytelevel", "opt": "bytelevel", "qwen2": "bytelevel",
         "llama": "metaspace", "gemma3": "metaspace"}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """``tiny_model(arch, hidden=32, style=None) -> directory`` of a saved tiny model."""
    root = tmp_path_factory.mktemp("tiny")

    def make(arch: str, hidden: int = 32, style: str | None = None) -> str:
        style = style or STYLE[arch]
        return str(tiny.build(root / f"{arch}-{hidden}-{style}", arch, style, hidden=hidden))
    return make


@pytest.fixture
def make_distiller(tiny_model):
    """``make_distiller(distiller_arch, llm_arch, **config) -> Distiller`` with tiny models."""
    def make(distiller: str = "llama", llm: str = "gpt2", distiller_hidden: int = 32,
             llm_hidden: int = 48, **kwargs) -> Distiller:
        kwargs.setdefault("num_placeholders", 4)
        kwargs.setdefault("max_distiller_length", 256)
        # Build (or find) the models first: building seeds the RNG, so seeding before it would
        # give a different distiller on a test's first call than on its later ones.
        paths = tiny_model(distiller, distiller_hidden), tiny_model(llm, llm_hidden)
        torch.manual_seed(0)
        cfg = MendConfig(distiller=paths[0], llm=paths[1], **kwargs)
        return Distiller.from_config(cfg)
    return make


DEMOS = [("great movie!", "positive"), ("dull plot", "negative"),
         ("a delightful story", "positive")]


def write_metaicl(root: Path, train: list[str], test: list[str], partition: str = "part",
                  seeds: tuple[int, ...] = (100,)) -> Path:
    """A MetaICL-layout folder of small sentiment-like classification tasks; tasks named in
    the partition but called ``gone`` are left out, as missing tasks are in real data."""
    import json
    import random

    (root / "config" / "tasks").mkdir(parents=True, exist_ok=True)
    (root / "config" / f"{partition}.json").write_text(json.dumps({"train": train,
                                                                  "test": test}))
    words = ["great", "dull", "delightful", "weak", "wonderful", "long", "joyless", "warm"]
    good = {"great", "delightful", "wonderful", "warm"}
    for t, name in enumerate(dict.fromkeys(train + test)):
        if name == "gone":
            continue
        rng = random.Random(t)
        options = ["positive", "negative"]
        rows = []
        for i in range(40):
            word = rng.choice(words)
            rows.append({"task": name, "input": f"the film {i} was {word}",
                         "output": options[word not in good], "options": options})
        folder = root / name
        folder.mkdir(exist_ok=True)
        (root / "config" / "tasks" / f"{name}.json").write_text(
            json.dumps({"task_type": "classification", "options": options}))
        lines = lambda rs: "".join(json.dumps(r) + "\n" for r in rs)  # noqa: E731
        (folder / f"{name}_test.jsonl").write_text(lines(rows[:8]))
        for seed in seeds:
            (folder / f"{name}_16_{seed}_train.jsonl").write_text(lines(rows[8:24]))
            (folder / f"{name}_16_{seed}_dev.jsonl").write_text(lines(rows[24:40]))
    return root
