"""Data for distilling step-by-step: questions, gold labels and rationales.

Datasets (``../shared/data/step_by_step`` and ``../shared/data/esnli``):

- ``cqa``: CommonsenseQA. The input is the question and its lettered choices; the label is the
  answer text. Rationales come from PaLM's few-shot chain-of-thought outputs, one per row.
- ``svamp``: SVAMP math word problems. The label is the equation (``( 84.0 / 2.0 )``), which
  is scored by its value. Rationales come from PaLM, as for CQA.
- ``esnli``: e-SNLI. The input is the premise and hypothesis; the label is entailment,
  neutral or contradiction; the rationale is the first human explanation. The dev split
  trains and the test split evaluates.

**Parsing a chain of thought** (:func:`parse_cot`), the PaLM files' and a teacher's alike:

1. The text is cut at the first ``"\\n\\nQ:"``, where few-shot models begin a new question.
2. It must contain ``"So the answer is"`` (CQA) or ``"The answer is"`` (SVAMP), matched
   case-insensitively. The text before is the rationale; after it comes the answer.
3. The answer loses a trailing period, an outer pair of parentheses (SVAMP), and a choice
   letter like ``(c)`` (CQA).

An output missing the phrase, or with an empty rationale or answer, is malformed. It is
counted and its example is skipped where a rationale is needed.

**SVAMP values** (:func:`safe_value`) are computed by walking the expression's syntax tree,
allowing only numbers, + - * / and unary minus. Nothing is ever ``eval``-ed.
"""

from __future__ import annotations

import ast
import gzip
import json
import operator
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tqdm.auto import tqdm

from mend.config import checked
from mend.core.config import FrozenLLM
from mend.core.prefix_lm import PrefixLM
from mend.counters import Counters
from mend.errors import ConfigError

PHRASES = {"cqa": "So the answer is", "svamp": "The answer is", "esnli": "So the answer is"}


@dataclass(frozen=True)
class RationaleExample:
    input: str
    label: str
    """The gold label (CQA answer text, SVAMP equation, e-SNLI label)."""
    rationale: str | None = None
    teacher_label: str | None = None
    """The label the rationale's author (PaLM, a teacher) gave; None when unparsed."""


def parse_cot(text: str, dataset: str) -> tuple[str, str] | None:
    """``(rationale, answer)`` from a chain-of-thought output, or None when malformed."""
    text = text.split("\n\nQ:", 1)[0]
    match = re.search(re.escape(PHRASES[dataset]), text, flags=re.IGNORECASE)
    if match is None:
        return None
    rationale = text[:match.start()].strip()
    answer = text[match.end():].strip().rstrip(".").strip()
    if dataset == "svamp" and answer.startswith("(") and answer.endswith(")"):
        answer = answer[1:-1].strip()
    answer = re.sub(r"^\([a-e]\)\s*", "", answer)
    return (rationale, answer) if rationale and answer else None


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv}


def safe_value(expression: str) -> float | None:
    """The value of an arithmetic expression, or None if it is anything else."""
    if not isinstance(expression, str) or len(expression) > 200:
        return None
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        return None

    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return float(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = walk(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        raise ValueError("not arithmetic")
    try:
        return walk(tree)
    except (ValueError, ZeroDivisionError, OverflowError):
        return None


def is_correct(prediction: str, gold: str, dataset: str) -> bool:
    """SVAMP: equal values (within 1e-4); otherwise equal normalised text."""
    if dataset == "svamp":
        p, g = safe_value(prediction), safe_value(gold)
        return p is not None and g is not None and abs(p - g) <= 1e-4 * max(1.0, abs(g))
    return _norm(prediction) == _norm(gold)


def _norm(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


def _read(path: Path):
    with gzip.open(path, "rt") as f:
        text = f.read()
    return json.loads(text) if text.lstrip().startswith("[") else [
        json.loads(line) for line in text.splitlines() if line.strip()]


def _cot(folder: Path, split: str) -> list[str]:
    files = sorted(folder.glob(f"{split}_CoT_*.json.gz"), key=lambda p: int(p.stem.split("_")[-1]
                                                                          .split(".")[0]))
    return [text for f in files for text in _read(f)]


def load(dataset: str, split: str, root: str | Path = "../shared/data",
         counters=None) -> list[RationaleExample]:
    """The ``train`` or ``test`` examples of ``dataset``, each with its rationale when the
    files give one that parses (malformed ones are counted in ``counters``)."""
    root = Path(root)
    if dataset == "esnli":
        return _esnli(root / "esnli", "dev" if split == "train" else "test")
    if dataset not in ("cqa", "svamp"):
        raise ConfigError(f"Unknown dataset {dataset!r}: use cqa, svamp or esnli.")
    folder = root / "step_by_step" / dataset
    path = folder / f"{dataset}_{split}.json.gz"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; point data.root at ../shared/data.")
    rows = _read(path)
    cots = _cot(folder / "palm", split)
    out = []
    for i, row in enumerate(rows):
        if dataset == "cqa":
            letters = "abcde"
            text = row["question"] + "\nAnswer Choices:\n" + "\n".join(
                f"({letters[j]}) {c}" for j, c in enumerate(row["choices"]))
            gold = row["answer"]
        else:
            text, gold = row["input"], row["label"]
        parsed = parse_cot(cots[i], dataset) if i < len(cots) else None
        if parsed is None and counters is not None:
            counters.add("malformed_rationales")
        out.append(RationaleExample(text, gold, *(parsed or (None, None))))
    return out


def _esnli(folder: Path, split: str) -> list[RationaleExample]:
    def lines(name):
        with gzip.open(folder / f"{name}.{split}.gz", "rt") as f:
            return [line.rstrip("\n") for line in f]
    premises, hypotheses, labels, expl = (lines(n) for n in ("s1", "s2", "labels",
                                                               "preproc1_expl_1"))
    return [RationaleExample(f"premise: {p.strip()}\nhypothesis: {h.strip()}", y.strip(),
                             e.strip() or None, y.strip())
            for p, h, y, e in zip(premises, hypotheses, labels, expl)]


@dataclass(frozen=True)
@checked
class RationaleDataConfig:
    dataset: Literal["cqa", "svamp", "esnli"] = "cqa"
    root: str = "../shared/data"
    fraction: float = 1.0
    """Train on this fraction of the training set (a seeded subset)."""
    eval_limit: int | None = 500
    """Test examples scored (None: all)."""
    rationale_source: Literal["file", "teacher"] = "file"
    teacher: str | None = None
    """The LLM that writes rationales when ``rationale_source: teacher``."""
    teacher_shots: int = 4
    teacher_max_new_tokens: int = 96
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"data.fraction must be in (0, 1], got {self.fraction}.")
        if self.rationale_source == "teacher" and not self.teacher:
            raise ConfigError("data.rationale_source=teacher needs data.teacher (a model).")


def teacher_rationales(data: RationaleDataConfig, examples: list[RationaleExample],
                       counters: Counters, device) -> list[RationaleExample]:
    """Rationales and labels written by a teacher LLM from a few-shot chain-of-thought prompt
    (its shots: the first training examples that have file rationales)."""
    phrase = PHRASES[data.dataset]
    shots = [e for e in examples if e.rationale and e.teacher_label][:data.teacher_shots]
    prompt = "".join(f"Q: {e.input}\nA: {e.rationale} {phrase} {e.teacher_label}.\n\n"
                     for e in shots)
    teacher = PrefixLM.load(FrozenLLM(data.teacher), device)
    tok = teacher.tokenizer
    out = []
    for i in tqdm(range(0, len(examples), 8), desc="teacher rationales"):
        part = examples[i:i + 8]
        ids = tok([prompt + f"Q: {e.input}\nA:" for e in part],
                  add_special_tokens=False)["input_ids"]
        texts = tok.batch_decode(teacher.generate(ids, max_new_tokens=data.teacher_max_new_tokens),
                                 skip_special_tokens=True)
        for e, text in zip(part, texts):
            parsed = parse_cot(text, data.dataset)
            if parsed is None:
                counters.add("malformed_teacher_outputs")
            out.append(RationaleExample(e.input, e.label, *(parsed or (None, None))))
    return out
