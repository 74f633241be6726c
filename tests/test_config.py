from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mend.config import from_dict, load_config, parse_overrides, replace, to_dict
from mend.core.config import MendConfig
from mend.errors import ConfigError
from mend.recipes.pretrain import PretrainConfig

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Inner:
    lr: float = 1e-4
    steps: int = 10
    kind: str = "a"


@dataclass(frozen=True)
class Outer:
    name: str
    inner: Inner = field(default_factory=Inner)
    tags: tuple[str, ...] = ()
    maybe: int | None = None


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\ninner:\n  lr: 5e-5\n  steps: 3\ntags: [a, b]\n")
    cfg = load_config(Outer, path, ["inner.steps=7", "maybe=null"])
    # YAML reads "5e-5" as a string; float fields accept it.
    assert cfg == Outer(name="x", inner=Inner(lr=5e-5, steps=7), tags=("a", "b"), maybe=None)
    assert to_dict(cfg) == {"name": "x", "inner": {"lr": 5e-5, "steps": 7, "kind": "a"},
                            "tags": ["a", "b"], "maybe": None}


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"Unknown config key `inner.step`.*`inner.steps`"):
        from_dict(Outer, {"name": "x", "inner": {"step": 3}})


@pytest.mark.parametrize("data, message", [
    ({"name": "x", "inner": {"steps": "many"}}, "inner.steps` must be an integer"),
    ({"name": "x", "inner": {"steps": True}}, "inner.steps` must be an integer"),
    ({"name": 3}, "`name` must be a string"),
    ({"name": "x", "tags": "a"}, "`tags` must be a list"),
    ({}, "Missing required config key"),
    ({"name": "x", "inner": 5}, "expected a mapping"),
])
def test_bad_values_are_named(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Outer, data)


def test_literal_choices_and_cross_field_checks():
    with pytest.raises(ConfigError, match="placeholder_init` must be one of 'random', 'vocab'"):
        from_dict(MendConfig, {"distiller": "a", "llm": "b", "placeholder_init": "zeros"})
    with pytest.raises(ConfigError, match="max_distiller_length"):
        MendConfig(distiller="a", llm="b", num_placeholders=100, max_distiller_length=50)
    with pytest.raises(ConfigError, match="num_placeholders must be >= 0"):
        MendConfig(distiller="a", llm="b", num_placeholders=-1)


def test_yaml_booleans_map_back_to_word_choices():
    # YAML 1.1 reads `mixed_precision: no` as False; the choice "no" is what was meant.
    from mend.training.config import TrainConfig
    assert from_dict(TrainConfig, {"mixed_precision": False}).mixed_precision == "no"
    assert load_config(Outer, None, ["name=x"]).name == "x"
    with pytest.raises(ConfigError, match="must be one of"):
        from_dict(TrainConfig, {"mixed_precision": True})


def test_replace_checks_like_loading():
    cfg = MendConfig(distiller="a", llm="b")
    assert replace(cfg, llm_8bit=True).llm_8bit is True
    with pytest.raises(ConfigError, match="Unknown config key `llm_8bits`"):
        replace(cfg, llm_8bits=True)


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["train.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "nope.yaml")


def test_override_values_are_parsed_as_yaml_strings_included():
    assert parse_overrides(['model.demo_sep="\\n\\n"']) == {"model": {"demo_sep": "\n\n"}}
    assert parse_overrides(["io_sep=' '", 'x=" "']) == {"io_sep": " ", "x": " "}
    assert parse_overrides(["a=3", "b=[1, 2]", "c=null", "d=yes"]) == {
        "a": 3, "b": [1, 2], "c": None, "d": True}
    # Unquoted, backslash-n stays two characters, as in YAML, and the user is told to quote.
    with pytest.warns(UserWarning, match='model.demo_sep="\\\\n\\\\n"'):
        assert parse_overrides(["model.demo_sep=\\n\\n"]) == {"model": {"demo_sep": "\\n\\n"}}


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*/**/*.yaml")),
                         ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_shipped_config_parses_and_opens_with_its_command(path):
    from mend.baselines.nli.recipes import VERBS as NLI
    from mend.baselines.step_by_step.recipe import VERBS as SBS
    from mend.config import from_dict, read_yaml
    from mend.recipes.efficiency import EfficiencyConfig
    from mend.recipes.evaluate import EvalConfig
    from mend.recipes.finetune import recipe_for
    stage = path.relative_to(ROOT / "configs").parts[0]
    first = path.read_text().splitlines()[0]
    assert first.startswith("# "), "every config opens with a comment"
    if stage in ("base", "accelerate") or "not runnable alone" in first:
        return
    data = read_yaml(path)
    words = first.split()
    job = words[words.index("mend") + 1] if "mend" in words else next(
        w.split("/")[0] for w in words if w.endswith("/run.py"))
    verb = words[words.index(job) + 1] if job in ("nli", "sbs") else None
    cls = {"pretrain": lambda: PretrainConfig, "finetune": lambda: recipe_for(data).config,
           "eval": lambda: EvalConfig, "efficiency": lambda: EfficiencyConfig,
           "nli": lambda: NLI[verb].config, "sbs": lambda: SBS[verb].config}[job]()
    cfg = from_dict(cls, data)
    assert str(path.relative_to(ROOT)) in first
    assert any(word in first for word in ("run.py", "mend "))
    assert cfg.output_dir.startswith("out/")


def test_an_override_of_a_nested_config_keeps_that_fields_own_default():
    """`mend diagnose CKPT content.windows=64` (docs/evaluation.md) keeps diagnose's held-out
    WikiText-2 text, which is its field's default, not ContentConfig's (no text)."""
    from mend.config import load_config
    from mend.recipes.diagnose import DiagnoseConfig
    cfg = load_config(DiagnoseConfig, None, ["checkpoint=x", "content.windows=64"])
    assert cfg.content.windows == 64 and cfg.content.data.path.endswith("wiki.test.tokens.gz")
    cfg = load_config(DiagnoseConfig, None, ["checkpoint=x", "content.data.max_length=64"])
    assert cfg.content.data.max_length == 64 and cfg.content.data.documents == "wikitext"
    assert load_config(DiagnoseConfig, None, ["checkpoint=x", "content.data=null"]
                       ).content.data is None
