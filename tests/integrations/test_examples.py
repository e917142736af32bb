"""The scripts in examples/ run offline and print what they promise (the README's recipes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Slow (runs every example program with its framework): not in the everyday lane, -m "not slow".
pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
EXPECTED = {
    "langchain_chroma_store.py": "['cherry tart', 'apple pie']",
    "llamaindex_chroma_store.py": "1 record left",
    "mem0_memory.py": "['lives in Lisbon']",
    "crewai_rag_client.py": "['apple pie']",
}


def test_every_example_is_listed() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_example_runs_offline(script: str, tmp_path: Path) -> None:
    env = {**os.environ, "MEM0_DIR": str(tmp_path / "mem0")}
    p = subprocess.run(
        [sys.executable, str(EXAMPLES / script), str(tmp_path / "db")],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert EXPECTED[script] in p.stdout.splitlines()
