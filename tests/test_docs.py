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
