"""Bad input on the public API and the command line: each gets the MendError that names the
problem and the fix, never a library traceback, and no file is changed by it."""

import hashlib
from pathlib import Path

import pytest

from mend import (BackboneError, CheckpointError, ConfigError, Distiller, InputError,
                  MendConfig, load_config)
from mend.cli import main as cli
from mend.methods import MethodConfig
from mend.methods.mend import ObjectiveConfig
from mend.training.config import TrainConfig

DEMOS = [("great movie", "positive"), ("dull plot", "negative")]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model):
    """A tiny distiller, its context, and a folder of files that no bad input may touch."""
    root = tmp_path_factory.mktemp("bad")
    (root / "notes.txt").write_text("a file that is not a checkpoint\n")
    (root / "bad.yaml").write_text("distiller: x\nllm: y\nnum_placholders: 4\n")
    (root / "eval.yaml").write_text("method: icl\nllm: nowhere/at/all\n")
    llm = tiny_model("gpt2", 48)
    torch_seeded = Distiller.from_config(MendConfig(distiller=llm, llm=llm, num_placeholders=2,
                                                    max_distiller_length=64))
    torch_seeded.save_pretrained(root / "ckpt")
    return root, torch_seeded, torch_seeded.compress(DEMOS), llm


def api_cases(root: Path, d: Distiller, ctx, llm: str):
    """``(name, call, error type, words the message must hold)``."""
    kv = dict(distiller=llm, llm=llm)
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
