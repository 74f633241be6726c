"""The built-in tasks of ``mend demo``, written for this project and shipped with it.

Each task's answer depends on its demonstrations: ``country_capital`` and
``country_language`` ask about the same countries with the same two options (the capital and
the language), so only the demonstrations say which is meant; ``animal_fruit`` labels words
with made-up labels (dax, wug) that only the demonstrations define; ``sentence_agent`` asks
who acted in a sentence whose two names are both options. Their demonstrations are short (3
to 12 tokens), so ICL given only what fits in a distiller's 16 positions still sees a few.

Two more evaluated tasks have long demonstrations (22 to 29 tokens each, about 440 for all
16), where ICL at that memory cannot hold even one: ``trip_capital`` and ``story_agent`` ask
what ``country_capital`` and ``sentence_agent`` ask, of the same countries and sentences
placed inside long, neutral sentences ("My cousin spent the whole of last summer travelling
by train and bus through Greece, ..."). (Long tasks with made-up labels were tried first;
SmolLM2-135M's ICL did not learn them, so they could not show anything.)

Five more tasks of the same kinds (``country_continent``, ``tool_vehicle``,
``sentence_patient``, ``number_parity`` and the long ``news_section``) are for meta-training
only, so the evaluated tasks stay unseen.

:func:`materialize` writes them in MetaICL layout (partition ``demo``), so the demo runs
through the same loaders and harness as any MetaICL evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path

TASKS_FILE = Path(__file__).with_name("tasks.jsonl")
PARTITION = "demo"
SEED = 100
NUM_DEMOS = 16
LONG_TASKS = ("trip_capital", "story_agent")
"""The evaluated tasks whose single demonstration is longer than a 16-position prefix."""


def materialize(root: str | Path) -> Path:
    """Write the tasks under ``root`` in MetaICL layout; returns ``root``.

    Evaluated tasks: 16 train rows (the demonstrations, seed 100), the rest as test rows.
    Meta-training tasks: every row in the test file (their training pool), the first 16 also
    as train rows.
    """
    root = Path(root)
    by_task: dict[str, list[dict]] = {}
    sides: dict[str, str] = {}
    for line in TASKS_FILE.read_text().splitlines():
        row = json.loads(line)
        sides[row["task"]] = row.pop("side")
        by_task.setdefault(row["task"], []).append(row)
    (root / "config" / "tasks").mkdir(parents=True, exist_ok=True)
    split = {side: [t for t, s in sides.items() if s == side] for side in ("train", "test")}
    (root / "config" / f"{PARTITION}.json").write_text(json.dumps(split))
    for task, rows in by_task.items():
        folder = root / task
        folder.mkdir(exist_ok=True)
        (root / "config" / "tasks" / f"{task}.json").write_text(json.dumps(
            {"task_type": "classification", "options": sorted({o for r in rows
                                                                for o in r["options"]})}))
        demos, rest = rows[:NUM_DEMOS], rows[NUM_DEMOS:]
        test = rows if sides[task] == "train" else rest
        _write(folder / f"{task}_16_{SEED}_train.jsonl", demos)
        _write(folder / f"{task}_16_{SEED}_dev.jsonl", rest[:NUM_DEMOS])
        _write(folder / f"{task}_test.jsonl", test)
    return root


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
