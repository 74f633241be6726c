"""The repository keeps its promises: CI runs the README's test command, configs parse."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    command = ci_lines[-1]
    assert "pytest" in command
    assert command in (ROOT / "README.md").read_text().splitlines()
