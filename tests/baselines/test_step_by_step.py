"""Distilling step-by-step: rationale parsing, safe arithmetic, loss masks, and causal and
seq2seq students end to end on tiny models."""

import gzip
import json

import pytest
import torch

from mend.baselines.step_by_step.data import (
    RationaleExample,
    is_correct,
    load,
    parse_cot,
    safe_value,
)
from mend.baselines.step_by_step.student import IGNORE, StepByStepObjective, Student, StudentConfig
from mend.config import load_config
from mend.counters import Counters


@pytest.mark.parametrize("text, dataset, expected", [
    ("Beavers build dams. So the answer is (c) wooded area.\n\nQ: next question ...", "cqa",
     ("Beavers build dams.", "wooded area")),
    ("He had 84 points in 2 rounds. 84 / 2 = 42. The answer is (84 / 2).", "svamp",
     ("He had 84 points in 2 rounds. 84 / 2 = 42.", "84 / 2")),
    ("reasoning first. so the answer is neutral", "esnli", ("reasoning first.", "neutral")),
    ("No phrase here at all.", "cqa", None),                       # malformed: no phrase
    ("So the answer is (a) park.", "cqa", None),                   # malformed: no rationale
    ("Some reasoning. So the answer is", "cqa", None),             # malformed: no answer
    ("Reasoning.\n\nQ: So the answer is (b) zoo.", "cqa", None),   # the phrase is past the cut
])
def test_chain_of_thought_parsing(text, dataset, expected):
    assert parse_cot(text, dataset) == expected


def test_svamp_answers_are_evaluated_numerically_and_safely():
    assert safe_value("( 84.0 / 2.0 )") == 42.0
    assert safe_value("-(3 - 5) * 2") == 4.0
    for unsafe in ("__import__('os').system('true')", "2 ** 100000", "x + 1", "len('ab')",
                   "1 / 0", "", "(1, 2)"):
        assert safe_value(unsafe) is None, unsafe
    assert is_correct("84 / 2", "( 84.0 / 2.0 )", "svamp")
    assert not is_correct("84 / 3", "( 84.0 / 2.0 )", "svamp")
    assert is_correct(" Wooded Area.", "wooded area", "cqa")


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_loss_masks_cover_only_the_targets(tiny_model, arch, tmp_path):
    from mend import tiny
    path = tiny.build(tmp_path / arch, arch, "metaspace") if arch == "t5" else tiny_model(arch)
    student = Student.from_config(StudentConfig(str(path)))
    assert student.seq2seq == (arch == "t5")
    batch = student.batch(["[label] the cat sat", "[label] a dog"], ["yes", "no no"])
    tok = student.tokenizer
    for row, target in enumerate(["yes", "no no"]):
        labels = batch["labels"][row]
        kept = labels[labels != IGNORE].tolist()
        want = tok(("" if student.seq2seq else "\n") + target, add_special_tokens=False)[
            "input_ids"] + [tok.eos_token_id]
        assert kept == want
        if not student.seq2seq:  # labels sit exactly under the target tokens
            ids = batch["input_ids"][row][labels != IGNORE].tolist()
            assert ids == want
            assert (labels[batch["attention_mask"][row] == 0] == IGNORE).all()
    loss = student(**batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    objective = StepByStepObjective(student, rationale_weight=0.5)
    examples = [RationaleExample("the cat sat", "yes", "cats sit", "yes")]
    out = objective.loss(student, objective.collate(examples))
    assert out["loss"].item() == pytest.approx(out["label"].item() + 0.5 * out["rationale"]
                                               .item(), rel=1e-5)


@pytest.fixture
def cqa_root(tmp_path):
    """CommonsenseQA-layout files with PaLM-style outputs (one malformed)."""
    folder = tmp_path / "step_by_step" / "cqa"
    (folder / "palm").mkdir(parents=True)
    rows, cots = [], []
    for i in range(24):
        answer = ["yes", "no"][i % 2]
        rows.append({"id": str(i), "question": f"is the cat {i} here?",
                     "choices": ["yes", "no", "maybe", "cat", "dog"], "answer": answer})
        cots.append(f"The cat is {answer}. So the answer is ({'ab'[i % 2]}) {answer}.\n\nQ: x"
                    if i != 5 else "garbled output")
    for split, part in (("train", slice(0, 16)), ("test", slice(16, 24))):
        with gzip.open(folder / f"cqa_{split}.json.gz", "wt") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows[part]))
        with gzip.open(folder / "palm" / f"{split}_CoT_0.json.gz", "wt") as f:
            json.dump(cots[part], f)
    return tmp_path


def test_rationale_files_load_with_malformed_ones_counted(cqa_root):
    counters = Counters()
    train = load("cqa", "train", cqa_root, counters)
    assert len(train) == 16 and counters.counts == {"malformed_rationales": 1}
    assert train[5].rationale is None and train[4].rationale == "The cat is yes."
    assert train[1].teacher_label == "no" and train[0].input.endswith("(e) dog")


@pytest.mark.parametrize("arch, weight, source", [
    ("llama", 1.0, "gold"), ("llama", 0.0, "teacher"), ("t5", 1.0, "gold")])
def test_students_train_and_evaluate_end_to_end(cqa_root, tiny_model, tmp_path, arch, weight,
                                                source):
    from mend import tiny
    from mend.baselines.step_by_step.recipe import (
        StepByStepConfig,
        StepByStepEvalConfig,
        main,
        main_eval,
    )
    path = tiny.build(tmp_path / arch, arch, "metaspace") if arch == "t5" else tiny_model(arch)
    out = tmp_path / "run"
    result = main(load_config(StepByStepConfig, None, [
        f"student.model={path}", f"data.root={cqa_root}", "epochs=2", "train.batch_size=8",
        f"rationale_weight={weight}", f"label_source={source}", "train.progress=false",
        f"output_dir={out}"]))
    saved = json.loads((out / "results.json").read_text())
    assert saved["train_examples"] == (15 if weight or source == "teacher" else 16)
    assert saved["counts"]["malformed_rationales"] == 1
    assert result.step == 4 and 0.0 <= saved["best_accuracy"] <= 1.0
    evaluated = main_eval(load_config(StepByStepEvalConfig, None, [
        f"checkpoint={out}", f"data.root={cqa_root}", f"output_dir={tmp_path / 'ev'}"]))
    assert evaluated["accuracy"] == pytest.approx(saved["best_accuracy"])


def test_teacher_rationales_are_parsed_and_malformed_ones_counted(cqa_root, tiny_model):
    from mend.baselines.step_by_step.recipe import RationaleDataConfig, teacher_rationales
    counters = Counters()
    examples = load("cqa", "train", cqa_root)[:4]
    data = RationaleDataConfig(root=str(cqa_root), rationale_source="teacher",
                               teacher=tiny_model("gpt2", 48), teacher_shots=2,
                               teacher_max_new_tokens=8)
    written = teacher_rationales(data, examples, counters, "cpu")
    assert len(written) == 4 and [e.label for e in written] == [e.label for e in examples]
    # A random tiny teacher never writes "So the answer is": all four are malformed.
    assert counters.counts["malformed_teacher_outputs"] == 4
    assert all(e.rationale is None for e in written)
