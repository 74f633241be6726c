"""Bad input on the public API and the command line: each gets the MendError that names the
problem and the fix, never a library traceback, and no file is changed by it."""

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from mend import (
    BackboneError,
    CheckpointError,
    ConfigError,
    Distiller,
    InputError,
    MendConfig,
    load_config,
)
from mend.cli import main as cli
from mend.core.kv_compress import KVCompressor
from mend.methods import MethodConfig
from mend.methods.mend import ObjectiveConfig
from mend.training.config import TrainConfig

DEMOS = [("great movie", "positive"), ("dull plot", "negative")]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model):  # noqa: C901
    """A tiny distiller, its context, and a folder of files that no bad input may touch."""
    root = tmp_path_factory.mktemp("bad")
    (root / "notes.txt").write_text("a file that is not a checkpoint\n")
    (root / "bad.yaml").write_text("distiller: x\nllm: y\nnum_placholders: 4\n")
    (root / "eval.yaml").write_text("method: icl\nllm: nowhere/at/all\n")
    (root / "tab.yaml").write_text("method: icl\n\tllm: x\n")
    (root / "quote.yaml").write_text('method: "icl\n')
    (root / "tag.yaml").write_text("method: !!python/object:os.system icl\n")
    (root / "latin1.yaml").write_bytes(b"method: icl # caf\xe9\n")
    (root / "self.yaml").write_text("base: self.yaml\nmethod: icl\n")
    (root / "not-json.json").write_text("{results: 1")
    (root / "other.json").write_text('{"a": 1}')
    (root / "ro").mkdir()
    (root / "ro" / "keep.txt").write_text("kept\n")
    (root / "ro").chmod(0o555)
    _bad_data(root)
    llm = tiny_model("gpt2", 48)
    torch_seeded = Distiller.from_config(MendConfig(distiller=llm, llm=llm, num_placeholders=2,
                                                    max_distiller_length=64))
    torch_seeded.save_pretrained(root / "ckpt")
    for name, change in (("newer", lambda m: {**m, "mend_version": "99.0"}),
                         ("unknown-key", lambda m: {**m, "config": {**m["config"], "warp": 9}}),
                         ("other-kind", lambda m: {**m, "kind": "mend2"})):
        torch_seeded.save_pretrained(root / name)
        meta = json.loads((root / name / "mend_config.json").read_text())
        (root / name / "mend_config.json").write_text(json.dumps(change(meta)))
    yield root, torch_seeded, torch_seeded.compress(DEMOS), llm
    (root / "ro").chmod(0o755)


def _bad_data(root: Path) -> None:
    """MetaICL folders, each damaged in one way a hand-made or half-copied one is."""
    import gzip

    row = {"input": "great", "output": "positive", "options": ["positive", "negative"]}
    files = {
        "malformed-line": ["{broken"],
        "row-is-a-list": [json.dumps(["great", "positive"])],
        "row-without-output": [json.dumps({"input": "great", "options": ["a"]})],
    }
    for name, lines in files.items():
        folder = root / "data" / name
        (folder / "config").mkdir(parents=True)
        (folder / "config" / "part.json").write_text('{"train": [], "test": ["t", "u"]}')
        for task in ("t", "u"):
            (folder / task).mkdir()
            good = json.dumps(row) + "\n"
            (folder / task / f"{task}_16_100_train.jsonl").write_text(good * 4)
            (folder / task / f"{task}_test.jsonl").write_text(
                good + "\n".join(lines) + "\n" if task == "t" else good)
    bad_partition = root / "data" / "bad-partition"
    (bad_partition / "config").mkdir(parents=True)
    (bad_partition / "config" / "part.json").write_text('{"train": ["t"]')
    no_test = root / "data" / "no-test"
    (no_test / "config").mkdir(parents=True)
    (no_test / "config" / "part.json").write_text('{"train": ["t"]}')
    bad_task = root / "data" / "bad-task-json"
    (bad_task / "config" / "tasks").mkdir(parents=True)
    (bad_task / "config" / "part.json").write_text('{"train": [], "test": ["t"]}')
    (bad_task / "config" / "tasks" / "t.json").write_text("{task_type")
    (bad_task / "t").mkdir()
    latin = root / "data" / "latin1"
    (latin / "config").mkdir(parents=True)
    (latin / "config" / "part.json").write_text('{"train": [], "test": ["t"]}')
    (latin / "t").mkdir()
    (latin / "t" / "t_16_100_train.jsonl").write_text((json.dumps(row) + "\n") * 4)
    with gzip.open(latin / "t" / "t_test.jsonl.gz", "wb") as f:
        f.write(b'{"input": "caf\xe9", "output": "a", "options": ["a"]}\n')


def api_cases(root: Path, d: Distiller, ctx, llm: str):
    """``(name, call, error type, words the message must hold)``."""
    kv = kv_models = dict(distiller=llm, llm=llm)
    compressor = KVCompressor(d.llm, d.format, 2)
    return [
        ("output not a choice", lambda: MendConfig(**kv, output="bogus"), ConfigError,
         "'embeddings', 'kv'"),
        ("unknown llm dtype", lambda: MendConfig(**kv, llm_dtype="float8"), ConfigError,
         "'float32', 'bfloat16', 'float16'"),
        ("train mode not a choice", lambda: MendConfig(**kv, train_mode="half"), ConfigError,
         "'full', 'lora'"),
        ("negative placeholders", lambda: MendConfig(**kv, num_placeholders=-1), ConfigError,
         ">= 0"),
        ("LoRA of rank 0", lambda: MendConfig(**kv, train_mode="lora", lora_r=0), ConfigError,
         "lora_r"),
        ("kv output with a projection", lambda: MendConfig(**kv, output="kv",
                                                          projection="always"),
         ConfigError, "projection: auto"),
        ("objective logits chunk 0", lambda: ObjectiveConfig(logits_chunk=0), ConfigError,
         "auto or null"),
        ("objective distill_on", lambda: ObjectiveConfig(distill_on="everywhere"), ConfigError,
         "'input', 'answer'"),
        ("negative learning rate", lambda: TrainConfig(lr=-1.0), ConfigError, "train.lr"),
        ("train precision", lambda: TrainConfig(mixed_precision="fp8"), ConfigError, "'bf16'"),
        ("unknown method", lambda: MethodConfig("icl2", llm=llm), ConfigError, "choose from"),
        ("misspelt YAML key", lambda: load_config(MendConfig, root / "bad.yaml"), ConfigError,
         "Did you mean `num_placeholders`"),
        ("missing model", lambda: Distiller.from_config(MendConfig(distiller=str(root / "none"),
                                                                   llm=llm)),
         BackboneError, "does not exist"),
        ("missing checkpoint", lambda: Distiller.from_pretrained(root / "none"),
         CheckpointError, ""),
        ("no demonstrations", lambda: d.compress([]), InputError, "non-empty"),
        ("empty demonstration string", lambda: d.compress(""), InputError, "empty string"),
        ("a bare pair", lambda: d.compress(("a", "b")), InputError, "wrap it"),
        ("a number as output", lambda: d.compress([("a", 1)]), InputError, "pair of strings"),
        ("a lone surrogate", lambda: d.compress(["ok \ud800"]), InputError, "lone surrogate"),
        ("negative refine steps", lambda: d.compress(DEMOS, refine_steps=-1), InputError,
         "refine_steps"),
        ("a string for a batch", lambda: d.compress_batch("abc"), InputError, "compress()"),
        ("score without a context", lambda: d.score(None, ["q"], ["a"]), InputError,
         "compress(demos)"),
        ("no queries", lambda: d.score(ctx, [], ["a"]), InputError, "non-empty list"),
        ("a string for queries", lambda: d.score(ctx, "q", ["a"]), InputError,
         "non-empty list"),
        ("a string for options", lambda: d.score(ctx, ["q"], "positive"), InputError,
         "wrap it in a list"),
        ("an empty option", lambda: d.score(ctx, ["q"], ["", "b"]), InputError,
         "Option 0 is empty"),
        ("options for fewer queries", lambda: d.score(ctx, ["q", "r"], [["a"]]), InputError,
         "option lists"),
        ("a lone surrogate in a query", lambda: d.score(ctx, ["q\udfff"], ["a"]), InputError,
         "lone surrogate"),
        ("negative max_new_tokens", lambda: d.generate(ctx, ["q"], max_new_tokens=-1),
         InputError, ">= 1"),
        ("zero max_new_tokens", lambda: d.generate(ctx, ["q"], max_new_tokens=0), InputError,
         ">= 1"),
        ("generate without a context", lambda: d.generate("ctx", ["q"]), InputError,
         "DistilledContext"),
        ("save onto a file", lambda: d.save_pretrained(root / "notes.txt"), CheckpointError,
         "it is a file"),
        # Silently wrong before: each now refused before any work.
        ("score with a negative batch", lambda: d.score(ctx, ["q"], ["a"], batch_size=-1),
         InputError, "batch_size"),
        ("save in an integer dtype", lambda: d.save_pretrained(root / "x", dtype=torch.int8),
         InputError, "floating dtype"),
        ("KV compressor refining -1 steps", lambda: compressor.compress(DEMOS, refine_steps=-1),
         InputError, "refine_steps"),
        # Raw errors from the API before.
        ("None for queries", lambda: d.score(ctx, None, ["a"]), InputError, "a NoneType"),
        ("a generator of queries", lambda: d.score(ctx, (q for q in "ab"), ["a"]), InputError,
         "a generator"),
        ("None for options", lambda: d.score(ctx, ["q"], None), InputError, "a NoneType"),
        ("a generator of options", lambda: d.score(ctx, ["q"], (o for o in "ab")), InputError,
         "a generator"),
        ("None for prompts", lambda: d.generate(ctx, None), InputError, "a NoneType"),
        ("None for the sets", lambda: d.compress_batch(None), InputError, "a NoneType"),
        ("a generator of sets", lambda: d.compress_batch(iter([DEMOS])), InputError,
         "list_iterator"),
        ("refine 1.5 steps", lambda: d.compress(DEMOS, refine_steps=1.5), InputError,
         "whole number"),
        ('refine "3" steps', lambda: d.compress(DEMOS, refine_steps="3"), InputError,
         "whole number"),
        ("refine None steps", lambda: d.compress(DEMOS, refine_steps=None), InputError,
         "whole number"),
        ("compress a batch of 0", lambda: d.compress_batch([DEMOS], batch_size=0), InputError,
         "batch_size"),
        ("score a batch of 0", lambda: d.score(ctx, ["q"], ["a"], batch_size=0), InputError,
         "batch_size"),
        ('num_placeholders "4"', lambda: MendConfig(**kv_models, num_placeholders="4"),
         ConfigError, "must be an integer"),
        ("num_placeholders 2.5", lambda: MendConfig(**kv_models, num_placeholders=2.5),
         ConfigError, "must be an integer"),
        ('max_distiller_length "1024"', lambda: MendConfig(**kv_models,
                                                           max_distiller_length="1024"),
         ConfigError, "must be an integer"),
        ("lora_r 2.5", lambda: MendConfig(**kv_models, lora_r=2.5), ConfigError,
         "must be an integer"),
        ("io_sep None", lambda: MendConfig(**kv_models, io_sep=None), ConfigError,
         "must be a string"),
        ("distiller 123", lambda: MendConfig(distiller=123, llm=llm), ConfigError,
         "must be a string"),
        ("placeholders past the LLM's positions",
         lambda: Distiller.from_config(MendConfig(**kv_models, num_placeholders=3000,
                                                  max_distiller_length=3100)),
         ConfigError, "takes 2048"),
        ("temperature 0", lambda: d.generate(ctx, ["q"], do_sample=True, temperature=0),
         InputError, "temperature must be > 0"),
        ("negative temperature", lambda: d.generate(ctx, ["q"], do_sample=True,
                                                     temperature=-1.0),
         InputError, "temperature must be > 0"),
        ("a misspelt generate keyword", lambda: d.generate(ctx, ["q"], temprature=0.5),
         InputError, "did you mean `temperature`"),
        ("two sequences per prompt", lambda: d.generate(ctx, ["q"], num_return_sequences=2),
         InputError, "one text per prompt"),
        ("an unknown attention kernel",
         lambda: Distiller.from_config(MendConfig(**kv_models, attn_implementation="fast")),
         BackboneError, "Unknown attn_implementation `fast`"),
        ("CUDA where there is none", lambda: Distiller.from_pretrained(root / "ckpt",
                                                                        device="cuda"),
         BackboneError, "no CUDA device is available"),
        ("a device that is no device", lambda: Distiller.from_pretrained(root / "ckpt",
                                                                          device="gpu0"),
         BackboneError, "is not a device"),
        ("from_pretrained(None)", lambda: Distiller.from_pretrained(None), CheckpointError,
         "got None"),
        # A read-only folder (root, as CI runs, writes anywhere but under /sys).
        ("save where it cannot write", lambda: d.save_pretrained(
            root / "ro" / "ckpt" if os.geteuid() else Path("/sys/mend-ckpt")),
         CheckpointError, "Choose a writable path"),
        ("save below a file", lambda: d.save_pretrained(root / "notes.txt" / "ckpt"),
         CheckpointError, "Cannot"),
        # Misleading messages before.
        ("compress a dict", lambda: d.compress({"great": "positive"}), InputError, "a dict"),
        ("compress a generator", lambda: d.compress(x for x in DEMOS), InputError,
         "a generator"),
        ("a checkpoint of a newer mend", lambda: Distiller.from_pretrained(root / "newer"),
         CheckpointError, "Upgrade mend"),
        ("a checkpoint with an unknown setting",
         lambda: Distiller.from_pretrained(root / "unknown-key"), CheckpointError,
         "upgrade mend"),
        ("a checkpoint of another kind", lambda: Distiller.from_pretrained(root / "other-kind"),
         CheckpointError, "`mend2` checkpoint"),
        ("refine a billion steps", lambda: d.compress(DEMOS, refine_steps=10**9), InputError,
         "from 0 to 10000"),
    ]


def cli_cases(root: Path, llm: str):
    """``(name, argv, words stderr must hold)``: each exits 2 with ``mend: error:``."""
    return [
        ("a config that is not there", ["eval", "--config", str(root / "none.yaml")],
         "none.yaml"),
        ("an override without a value", ["eval", "--config", str(root / "eval.yaml"), "k"],
         "key=value"),
        ("an LLM that is not there", ["eval", "--config", str(root / "eval.yaml")],
         "does not exist"),
        ("a method finetune does not train", ["finetune", "method=icl", f"model.llm={llm}"],
         "not trained by mend finetune"),
        ("a learning rate that is no number", ["pretrain", "train.lr=fast"], "number"),
        ("a checkpoint that is not there", ["diagnose", f"checkpoint={root / 'none'}"], ""),
        ("a YAML syntax error", ["eval", "--config", str(root / "quote.yaml")],
         "quote.yaml is not valid YAML"),
        ("a tab indent", ["eval", "--config", str(root / "tab.yaml")], "never tabs"),
        ("a python tag", ["eval", "--config", str(root / "tag.yaml")], "no !!python tags"),
        ("a non-UTF-8 config", ["eval", "--config", str(root / "latin1.yaml")],
         "not UTF-8 text"),
        ("a base that names itself", ["eval", "--config", str(root / "self.yaml")],
         "lead back to it"),
        ("an unclosed override", ["eval", f"llm={llm}", "data.seeds=[100"],
         "not valid YAML"),
        *[(f"a data folder: {name}", ["eval", f"llm={llm}", "method=icl",
                                      f"data.root={root / 'data' / name}",
                                      "data.partition=part", "data.seeds=[100]",
                                      f"output_dir={root / 'out'}"], words)
          for name, words in (("malformed-line", "line 2: not JSON"),
                              ("row-is-a-list", "line 2: a row is an object"),
                              ("row-without-output", "line 2: a row is an object"),
                              ("bad-partition", "part.json (partition part) is not valid JSON"),
                              ("no-test", "none under `test`"),
                              ("bad-task-json", "t.json (task t's config) is not valid JSON"),
                              ("latin1", "not UTF-8 text"))],
        ("eval with batch_size 0", ["eval", "method=icl", f"llm={llm}", "batch_size=0"],
         "batch_size"),
        ("eval with a limit of -1", ["eval", "method=icl", f"llm={llm}", "data.limit=-1"],
         "data.limit"),
        ("an output_dir that is a file", ["eval", "method=icl", f"llm={llm}",
                                          f"output_dir={root / 'notes.txt'}"], "is a file"),
        ("eval on CUDA where there is none", ["eval", "method=icl", f"llm={llm}", "device=cuda",
                                              f"output_dir={root / 'out'}",
                                              f"data.root={root / 'data' / 'no-test'}"],
         "no CUDA device"),
        ("eval on a device that is no device", ["eval", "method=icl", f"llm={llm}",
                                                "device=gpu0",
                                                f"output_dir={root / 'out'}"],
         "is not a device"),
        ("a demo of no queries", ["demo", "--tiny", "queries=0"], "queries must be >= 1"),
        ("compare a missing file", ["compare", str(root / "none.json")], "does not exist"),
        ("compare a file that is not JSON", ["compare", str(root / "not-json.json")],
         "is not JSON"),
        ("compare a file of no results", ["compare", str(root / "other.json")],
         "holds no evaluation results"),
    ]


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_bad_inputs_on_the_api_raise_their_mend_error_and_change_no_file(world):
    root, d, ctx, llm = world
    cases = api_cases(root, d, ctx, llm)
    assert len(cases) >= 30
    before = digest(root)
    for name, call, kind, words in cases:
        with pytest.raises(kind) as caught:
            call()
            pytest.fail(f"{name}: no error")
        assert words in str(caught.value), (name, str(caught.value))
        assert digest(root) == before, f"{name} changed a file"


def test_bad_inputs_on_the_command_line_exit_2_with_one_line(world, capsys):
    root, _, _, llm = world
    before = digest(root)
    for name, argv, words in cli_cases(root, llm):
        code = cli(argv)
        err = capsys.readouterr().err
        assert code == 2, (name, code, err[-500:])
        assert "mend: error:" in err and "Traceback" not in err and words in err, (name, err)
        assert digest(root) == before, f"{name} changed a file"
