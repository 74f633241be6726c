"""What several test modules share besides fixtures: the data folder, demonstrations, and a
MetaICL partition written to disk. Imported as ``from tests.support import ...``."""

from __future__ import annotations

from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
"""The project's data, beside the checkout (``../shared``); tests that need it skip without it."""


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
