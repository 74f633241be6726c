"""The repository keeps its promises: CI runs the README's Quickstart lines, configs parse."""

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_quickstart() -> list[str]:
    """The command lines of the README's Quickstart code block."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Quickstart"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_ci_runs_both_readme_quickstart_lines_verbatim():
    calls = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
             if line.startswith("quickstart ")]
    ran = [shlex.split(line)[1] for line in calls]  # the one argument, as bash passes it
    lines = readme_quickstart()
    assert len(lines) == 2 and "mend demo" in lines[0] and "pytest" in lines[1]
    assert ran == lines


def test_the_readme_layout_names_every_package_of_mend():
    text = (ROOT / "README.md").read_text()
    layout = text[text.index("## Layout"):]
    packages = sorted(p.parent.name for p in (ROOT / "mend").glob("*/__init__.py"))
    assert packages and [p for p in packages if f"  {p}/" not in layout] == []
    mirrored = {p.name for p in (ROOT / "tests").iterdir() if (p / "__init__.py").is_file()}
    assert mirrored <= set(packages), "tests/ folders mirror mend/'s packages"


def test_imports_point_down_the_layers():
    """The contracts of setup.cfg's [importlinter]: core < data < methods < training/evaluation <
    reporting < recipes < baselines < cli, and the two baselines independent."""
    import subprocess
    import sys

    lint = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run([str(lint) if lint.exists() else "lint-imports"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "2 kept, 0 broken" in done.stdout
