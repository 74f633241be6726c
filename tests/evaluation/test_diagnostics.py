"""The content controls can fail: vectors that ignore their input show no gain, vectors that
carry it show one, on held-out text and on tasks."""

import gzip
import json

import pytest

from mend.cli import main as cli
from mend.data.pretrain import TextDataConfig
from mend.errors import ConfigError
from mend.evaluation.diagnostics import ContentConfig, content_gain, held_out_examples
from tests.support import write_metaicl

WORDS = ("river stone garden music winter harbor lantern meadow copper violin orchard "
         "thunder silver canyon pepper marble falcon velvet").split()


def write_articles(path, n=6, words=90):
    """WikiText-style articles: a ` = Title = ` line, then a paragraph of distinct words."""
    lines = []
    for a in range(n):
        lines.append(f" = Article {a} = \n")
        text = " ".join(WORDS[(a * 7 + i * (a + 1)) % len(WORDS)] for i in range(words))
        lines.append(f" {text} \n")
    with gzip.open(path, "wt") as f:
        f.writelines(lines)
    return path


@pytest.fixture
def held_out(tmp_path, make_distiller):
    """A tiny distiller whose distiller and LLM share GPT-2's tokenizer, and its windows."""
    d = make_distiller("gpt2", "gpt2", distiller_hidden=48, llm_hidden=48, num_placeholders=4)
    cfg = ContentConfig(data=TextDataConfig(path=str(write_articles(tmp_path / "t.tokens.gz")),
                                            documents="wikitext", max_length=40,
                                            min_length=16), windows=6, batch_size=4)
    return d, held_out_examples(cfg, d.llm.tokenizer, d.llm.bos)


def test_held_out_windows_are_one_per_document(held_out):
    _, examples = held_out
    assert len(examples) == 6
    # Every window is the start of another article.
    assert all(e.demos.startswith(f"= Article {i} =") for i, e in enumerate(examples))


def test_vectors_that_ignore_the_input_have_no_content_gain(held_out, monkeypatch):
    d, examples = held_out
    constant = lambda ids, mask, width=None: d.projection(  # noqa: E731  the same for every input
        d.placeholders.expand(ids.shape[0], -1, -1)).to(d.llm.dtype)
    monkeypatch.setattr(d, "forward", constant)
    r = content_gain(d, examples, batch_size=4)
    assert r["kl_own"] == pytest.approx(r["kl_swap"], abs=1e-6)
    assert abs(r["content_gain"]) < 1e-6 and r["own_beats_swap"] == 0.0
    assert r["kl_none"] > 0 and r["windows"] == 6


def test_vectors_that_carry_the_input_have_a_positive_gain(held_out, monkeypatch):
    """Hand-built encoder: the vectors are the LLM's own embeddings of the last 4 tokens the
    distiller read (the two share a tokenizer), so they carry the window's text."""
    d, examples = held_out
    monkeypatch.setattr(d, "forward", lambda ids, mask, width=None: d.llm.embed(ids[:, -4:]))
    r = content_gain(d, examples, batch_size=4)
    assert r["kl_own"] < r["kl_swap"]
    # A random tiny LLM barely reads its context (KLs of about 0.01), so the gain is judged
    # relative to the swap: about 12% here, and exactly 0 for the constant above.
    assert 0.05 < r["content_share"] < 1 and r["own_beats_swap"] == 1.0
    # The KL is the stage-1 objective itself: with the teacher's full context as the
    # "vectors" the student is the teacher, and every KL is 0.
    full = lambda ids, mask, width=None: d.llm.embed(ids)  # noqa: E731  (GPT-2 reads no bos)
    monkeypatch.setattr(d, "forward", full)
    same = content_gain(d, examples[:1] * 2, batch_size=4)
    assert same["kl_own"] == pytest.approx(0.0, abs=1e-5)


def test_swap_needs_two_windows(held_out):
    d, examples = held_out
    with pytest.raises(ConfigError, match="two windows"):
        content_gain(d, examples[:1])
    with pytest.raises(ConfigError, match="windows must be >= 2"):
        ContentConfig(windows=1)


def test_mend_diagnose_scores_a_checkpoint(tmp_path, make_distiller, capsys):
    d = make_distiller("gpt2", "gpt2", distiller_hidden=48, llm_hidden=48, num_placeholders=4)
    d.save_pretrained(tmp_path / "ckpt")
    text = write_articles(tmp_path / "t.tokens.gz")
    assert cli(["diagnose", str(tmp_path / "ckpt"), f"content.data.path={text}",
                "content.data.documents=wikitext", "content.data.max_length=40",
                "content.data.min_length=16", "content.windows=4",
                f"output={tmp_path / 'd.json'}"]) == 0
    printed = capsys.readouterr().out
    assert "content gain (KL_swap - KL_own)" in printed and "| swapped" in printed
    saved = json.loads((tmp_path / "d.json").read_text())
    assert saved["windows"] == 4 and "versions" in saved["provenance"]
    assert saved["content_gain"] == pytest.approx(saved["kl_swap"] - saved["kl_own"])


def test_content_controls_are_logged_during_training(tmp_path, tiny_model):
    from mend.config import load_config
    from mend.recipes.pretrain import PretrainConfig
    from mend.recipes.pretrain import main as pretrain

    text = write_articles(tmp_path / "t.tokens.gz", n=8)
    cfg = load_config(PretrainConfig, None, [
        f"model.distiller={tiny_model('llama')}", f"model.llm={tiny_model('gpt2', 48)}",
        "model.num_placeholders=4", "model.max_distiller_length=128",
        f"data.path={text}", "data.documents=wikitext", "data.max_length=40",
        "data.min_length=16", f"content.data.path={text}", "content.data.documents=wikitext",
        "content.data.max_length=40", "content.data.min_length=16", "content.windows=3",
        "train.max_steps=4", "train.batch_size=2", "train.eval_every=2", "train.log_every=1",
        "train.progress=false", f"output_dir={tmp_path / 'run'}"])
    pretrain(cfg)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().split("\n")
             if x]
    monitored = [r for r in lines if "monitor_content_gain" in r]
    assert [r["step"] for r in monitored] == [2, 4]
    assert all(r["monitor_content_gain"] == pytest.approx(
        r["monitor_kl_swap"] - r["monitor_kl_own"]) for r in monitored)
    assert (tmp_path / "run" / "loss.png").is_file()


def test_own_minus_swapped_is_the_content_gap():
    from mend.evaluation.harness import TaskResult, aggregate, content_gap

    def results(scores):
        return aggregate([TaskResult(t, s, [], [], {"score": v, "macro_f1": v, "accuracy": v})
                          for (t, s), v in scores.items()])
    own = results({("a", 1): 0.8, ("a", 2): 0.6, ("b", 1): 0.5, ("b", 2): 0.7})
    swapped = results({("a", 1): 0.4, ("a", 2): 0.6, ("b", 1): 0.5, ("b", 2): 0.3})
    gap = content_gap(own, swapped)
    assert gap["tasks"] == pytest.approx({"a": 0.2, "b": 0.2})
    assert gap["mean"] == pytest.approx(0.2)
    # per seed: seed 1 (0.4 + 0.0) / 2 = 0.2, seed 2 (0.0 + 0.4) / 2 = 0.2 -> std 0
    assert gap["std"] == pytest.approx(0.0)


def test_task_swap_control_in_evaluation(tmp_path, tiny_model, monkeypatch):
    """An evaluation of a method that reads demonstrations reports own, swapped and the gap;
    a MEND whose vectors ignore the demonstrations has a gap of exactly 0."""
    from mend import Distiller, MendConfig
    from mend.config import load_config
    from mend.recipes.evaluate import EvalConfig
    from mend.recipes.evaluate import main as evaluate

    root = write_metaicl(tmp_path / "data", ["t1"], ["t1", "t2", "t3"])
    d = Distiller.from_config(MendConfig(distiller=tiny_model("llama"),
                                         llm=tiny_model("gpt2", 48), num_placeholders=4))
    d.save_pretrained(tmp_path / "m")
    args = [f"data.root={root}", "data.partition=part", "data.seeds=[100]", "data.limit=4",
            "context.k=4", f"checkpoint={tmp_path / 'm'}"]
    monkeypatch.setattr(Distiller, "forward", lambda self, ids, mask, width=None: self.projection(
        self.placeholders.expand(ids.shape[0], -1, -1)).to(self.llm.dtype))
    result = evaluate(load_config(EvalConfig, None, [*args, f"output_dir={tmp_path / 'e'}"]))
    assert result["content_gap"]["mean"] == 0.0
    assert result["swapped"]["average"] == result["results"]["average"]
    assert "content gap" in (tmp_path / "e" / "results.md").read_text()
    icl = evaluate(load_config(EvalConfig, None, [
        *args[:-1], "method=icl", f"llm={tiny_model('gpt2', 48)}",
        f"output_dir={tmp_path / 'icl'}"]))
    assert set(icl["content_gap"]["tasks"]) == {"t1", "t2", "t3"}
    one = evaluate(load_config(EvalConfig, None, [
        *args, "data.tasks=[t1]", f"output_dir={tmp_path / 'one'}"]))
    assert one["content_gap"] is None and "no other task" in one["content_gap_note"]
    with pytest.raises(ConfigError, match="another task"):
        evaluate(load_config(EvalConfig, None, [*args, "data.tasks=[t1]", "demos.source=other_task",
                                                f"output_dir={tmp_path / 'x'}"]))


def test_controls_table_reads_what_the_runs_wrote(tmp_path, capsys):
    import yaml

    def run(name, own, swap, gap=None):
        d = tmp_path / name
        d.mkdir()
        (d / "config.yaml").write_text(yaml.safe_dump({
            "model": {"output": "kv", "placeholder_init": "vocab"},
            "objective": {"distill": 1.0, "reconstruct": 0.5}, "train": {"grad_accum": 1}}))
        lines = [{"step": 10, "loss": 1.0, "steps_per_s": 1.0, "tokens_per_s": 100.0},
                 {"step": 10, "monitor_kl_own": own + 1, "monitor_kl_swap": swap,
                  "monitor_kl_none": 3.0, "monitor_content_gain": swap - own - 1,
                  "monitor_content_share": 0.0, "monitor_own_beats_swap": 0.0},
                 {"step": 20, "monitor_kl_own": own, "monitor_kl_swap": swap,
                  "monitor_kl_none": 3.0, "monitor_content_gain": swap - own,
                  "monitor_content_share": (swap - own) / swap, "monitor_own_beats_swap": 1.0}]
        (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        if gap is not None:
            (d / "eval-demo").mkdir()
            (d / "eval-demo" / "results.json").write_text(json.dumps({
                "results": scores(0.5 + gap), "swapped": scores(0.5),
                "content_gap": {"mean": gap, "std": 0.0}}))
        return d

    def scores(m):  # one task, scored m
        return {"average": {"score": {"mean": m, "std": 0.0}},
                "tasks": {"t": {"score": {"mean": m, "std": 0.0}}}}
    a, b = run("kv", 0.5, 1.0, gap=0.25), run("plain", 2.0, 2.0)
    for name, m in (("zs", 0.25), ("icl", 1.0)):
        (tmp_path / f"{name}.json").write_text(json.dumps({
            "label": name, "results": scores(m), "swapped": scores(0.25),
            "content_gap": {"mean": m - 0.25, "std": 0.0}}))
    assert cli(["controls", str(a), str(b), "--output", str(tmp_path / "t.md"), "--reference",
                str(tmp_path / "icl.json"), "--zero-shot", str(tmp_path / "zs.json")]) == 0
    rows = {line.split(" | ")[0][2:]: line for line in (tmp_path / "t.md").read_text()
            .splitlines() if line.startswith("| kv") or line.startswith("| plain")}
    assert "| 0.500 | 1.000 | 3.000 | +0.500 | +50.0% | 100% | +25.0 (75.0 ± 0.0 own" in rows["kv"]
    assert "output kv; init vocab; 1·distill + 0.5·reconstruct" in rows["kv"]
    assert "10 steps" in rows["kv"] and "| +0.000 | +0.0% |" in rows["plain"]
    assert rows["plain"].endswith("| not run | – |")
    # Recovered share by hand: (0.75 - 0.25) / (1.0 - 0.25).
    assert rows["kv"].endswith(f"| {100 * 0.5 / 0.75:.0f}% |")
