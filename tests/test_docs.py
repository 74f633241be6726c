"""The docs say only what is true: every `mend.…` name and `mend <command>` they mention exists,
and the README's code blocks run (on tiny models)."""

import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from mend.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DATA = ROOT.parent / "shared" / "data"
NAME = re.compile(r"(?<![\w/.-])mend(?:\.[A-Za-z_]\w*)+")
INLINE = re.compile(r"`mend ([a-z]+)")
LINE = re.compile(r"^\s*mend ([a-z]+)", re.M)


def resolves(dotted: str) -> bool:
    """Whether ``mend.a.b.C`` is a module, or an attribute of the longest module prefix."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def test_every_mend_name_the_docs_mention_exists():
    names = {(page.name, n) for page in PAGES for n in NAME.findall(page.read_text())
             if not n.endswith((".py", ".md", ".json", ".yaml"))}
    assert len(names) >= 5
    assert [x for x in sorted(names) if not resolves(x[1])] == []


def test_every_mend_command_the_docs_mention_exists():
    known = {c.name for c in COMMANDS}
    said = {(page.name, c) for page in PAGES
            for c in INLINE.findall(page.read_text())
            + [c for block in blocks(page.read_text(), "bash") for c in LINE.findall(block)]}
    assert {c for _, c in said} >= {"demo", "pretrain", "finetune", "eval", "diagnose"}
    assert [x for x in sorted(said) if x[1] not in known] == []


def readme_section(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(heading)
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else len(text)]


def test_the_readmes_api_block_runs_on_tiny_models(tiny_model, tmp_path, monkeypatch):
    (code,) = blocks(readme_section("## The API"), "python")
    # The zoo's real models stand in for tiny ones of other families, so that the block's
    # projection between two hidden sizes runs as written.
    code = (code.replace('"smollm2-135m"', repr(tiny_model("llama", 32)))
                .replace('"gemma3-270m"', repr(tiny_model("gpt2", 48))))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own code
    assert len(scope["scores"]) == 1 and len(scope["scores"][0]) == 2
    assert (tmp_path / "out" / "ckpt" / "mend_config.json").is_file()
    assert scope["distiller"].config.num_placeholders == 100


@pytest.mark.slow  # three commands, each a process that loads models
@pytest.mark.skipif(not (DATA / "metaicl" / "glue-sst2").exists(),
                    reason=f"the shared data is not at {DATA}")
def test_the_readmes_training_block_runs_on_tiny_models(tiny_model, tmp_path):
    (block,) = blocks(readme_section("## Training a distiller"), "bash")
    commands = [shlex.split(c.split("#")[0]) for c in block.replace("\\\n", " ").splitlines()
                if c.strip()]
    assert [c[:2] for c in commands] == [["mend", "pretrain"], ["mend", "finetune"],
                                        ["mend", "diagnose"]]
    tiny = tiny_model("gpt2", 48)
    out = tmp_path / "out"
    extra = {"pretrain": [f"model.distiller={tiny}", f"model.llm={tiny}", "train.max_steps=2",
                          "train.eval_every=0", "train.save_every=2",
                          f"output_dir={out}/pretrain/smollm2-wikitext-cpu"],
             "finetune": [f"model.distiller={tiny}", f"model.llm={tiny}", "train.max_steps=2",
                          "train.eval_every=0", "train.save_every=2",
                          f"output_dir={out}/finetune/class_to_class/smollm2-cpu"],
             "diagnose": ["content.windows=4"]}
    for command in commands:
        args = [a.replace("out/", f"{out}/", 1) if a.startswith(("out/", "init_from=out/"))
                else a.replace("=out/", f"={out}/") for a in command[1:]]
        done = subprocess.run([sys.executable, "-m", "mend.cli", *args, *extra[command[1]]],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    assert "content_share" in done.stdout or "content" in done.stdout


class _StandIn:
    """What a serving engine's client is handed, recorded: the docs' recipes run against
    these where vLLM, SGLang and openai are not installed (they are not, on a CPU machine)."""

    def __init__(self):
        self.calls: list[tuple[str, object]] = []

    def module(self, name: str):
        import types
        stand_in = self
        mod = types.ModuleType(name)

        class LLM:
            def __init__(self, model, enable_prompt_embeds=False, **kwargs):
                assert enable_prompt_embeds, "vLLM takes prompt embeddings only when enabled"

            def generate(self, prompts, params=None):
                stand_in.calls.append(("vllm", prompts))
                return []

        class Completions:
            def create(self, **kwargs):
                stand_in.calls.append(("openai", kwargs["extra_body"]["prompt_embeds"]))

        class OpenAI:
            def __init__(self, **kwargs):
                self.completions = Completions()

        class Engine:
            def __init__(self, **kwargs):
                pass

            def generate(self, input_embeds=None, sampling_params=None):
                stand_in.calls.append(("sglang", input_embeds))
                return []

        mod.LLM, mod.SamplingParams = LLM, lambda **kwargs: kwargs
        mod.OpenAI, mod.Engine = OpenAI, Engine
        return mod


@pytest.mark.parametrize("page", [p.name for p in PAGES if blocks(p.read_text(), "python")])
def test_every_python_block_of_the_docs_runs(page, tiny_model, tmp_path, monkeypatch):
    """Every ```python block of README.md and docs/*.md, in order, one scope a page, on tiny
    models (zoo names and the shipped distiller's folder stand for them) and, where a block
    serves through an engine that cannot run here, against a recording stand-in."""
    import base64
    import io

    import torch

    from mend import Distiller, MendConfig

    path = ROOT / page if page == "README.md" else ROOT / "docs" / page
    llama, other = tiny_model("llama", 48), tiny_model("llama", 32)  # two hidden sizes
    shipped = tmp_path / "shipped"
    Distiller.from_config(MendConfig(distiller=llama, llm=llama, output="kv", num_placeholders=4,
                                     train_mode="lora")).save_pretrained(shipped)
    code = "\n".join(blocks(path.read_text(), "python"))
    code = (code.replace('"smollm2-135m"', repr(llama)).replace('"gemma3-270m"', repr(other))
                .replace('"mend/assets/demo-distiller"', repr(str(shipped))))
    stand_in = _StandIn()
    for name in ("vllm", "openai", "sglang"):
        monkeypatch.setitem(sys.modules, name, stand_in.module(name))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(path), "exec"), {})  # noqa: S102 - the docs' own code
    hidden = Distiller.from_pretrained(shipped).llm.hidden_size
    for engine, handed in stand_in.calls:
        if engine == "vllm":
            assert all(p["prompt_embeds"].dim() == 2 and p["prompt_embeds"].shape[1] == hidden
                       for p in handed)
        elif engine == "openai":
            tensor = torch.load(io.BytesIO(base64.b64decode(handed)))
            assert tensor.dim() == 2 and tensor.shape[1] == hidden
        else:
            assert all(len(p[0]) == hidden and isinstance(p[0][0], float) for p in handed)
    if "prompt_embeds" in code:
        assert {engine for engine, _ in stand_in.calls} == {"vllm", "openai", "sglang"}
