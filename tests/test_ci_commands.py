"""CI runs exactly the README's test commands, and installs what the suite imports."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    start = text.index("Run the test suite (what CI runs")
    block = text[start:].split("\n\n", 2)[1]  # the indented lines after the sentence
    return [line.strip() for line in block.splitlines()]


def ci_lines() -> list[str]:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    body = lines[lines.index('cd "$(dirname "$0")/.."') + 1 :]
    return [line.strip() for line in body if line.strip() and not line.startswith("#")]


def ci_commands() -> list[str]:
    """The commands of ``.ci/run``, without the subshell around each."""
    return [line[1:-1] if line[:1] + line[-1:] == "()" else line for line in ci_lines()]


def test_ci_runs_the_readme_commands() -> None:
    assert readme_commands() == ci_commands()
    assert len(ci_commands()) == 5


def test_a_failure_anywhere_in_a_ci_line_fails_ci() -> None:
    """``set -e`` ignores a failure inside an ``&&`` list unless it is the last command: a failed
    install would skip that line's tests and CI would go on. In a subshell it cannot."""
    assert all(line.startswith("(") and line.endswith(")") for line in ci_lines()), ci_lines()
    assert "set -euo pipefail" in (ROOT / ".ci" / "run").read_text()


def test_ci_installs_the_framework_extra_and_pins_the_oldest_supported_chromadb() -> None:
    first, portable, types, oldest, mcp = ci_commands()
    assert "'.[test,mcp]'" in mcp and mcp.endswith("-m pytest tests/programs")
    assert "'.[test,integrations,lint]'" in first and first.endswith("-m pytest")
    assert portable.startswith("SAFECHROMA_PORTABLE=1 .venv/bin/python -m pytest tests/")
    for system in ("linux", "darwin", "win32"):  # issue 23: the type check of every platform
        assert f"-m mypy --platform {system}" in types
    pyproject = (ROOT / "pyproject.toml").read_text()
    low = re.search(r'"chromadb>=([0-9.]+),<[0-9.]+"', pyproject)
    assert low is not None
    assert f"'chromadb=={low.group(1)}'" in oldest  # the lower bound of the pin is what CI runs
    assert "integrations = [" in pyproject
