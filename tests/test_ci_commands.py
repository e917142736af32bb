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


def ci_commands() -> list[str]:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    body = lines[lines.index('cd "$(dirname "$0")/.."') + 1 :]
    return [line.strip() for line in body if line.strip() and not line.startswith("#")]


def test_ci_runs_the_readme_commands() -> None:
    assert readme_commands() == ci_commands()
    assert len(ci_commands()) == 2


def test_ci_installs_the_framework_extra_and_pins_the_oldest_supported_chromadb() -> None:
    first, oldest = ci_commands()
    assert "'.[test,integrations]'" in first and first.endswith("-m pytest")
    pyproject = (ROOT / "pyproject.toml").read_text()
    low = re.search(r'"chromadb>=([0-9.]+),<[0-9.]+"', pyproject)
    assert low is not None
    assert f"'chromadb=={low.group(1)}'" in oldest  # the lower bound of the pin is what CI runs
    assert "integrations = [" in pyproject
