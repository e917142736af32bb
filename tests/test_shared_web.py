"""A real uvicorn app with two worker processes on one directory (the multi-worker check).

Runs ``python -m safechroma._examples.shared_web``: uvicorn ``--workers 2`` serving an ASGI app
whose workers share one supervised Chroma, written to and read over HTTP while one uvicorn
worker and then the safechroma worker are SIGKILLed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# Slow (real uvicorn servers and several programs): not in the everyday lane, -m "not slow".
pytestmark = pytest.mark.slow


def _run_example(name: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        [sys.executable, "-m", f"safechroma._examples.{name}"],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "TMPDIR": str(tmp_path)},
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    return out


def test_uvicorn_with_two_workers_loses_nothing_through_kills(tmp_path: Path) -> None:
    """Every request got an answer (200, or 503 with a JSON error) or, when its uvicorn worker
    was the one killed, a dropped connection; every acknowledged note reads back with its text;
    the safechroma worker exits after the server; the demo removes its directory."""
    out = _run_example("shared_web", tmp_path)
    assert "OK: two uvicorn workers shared one supervised Chroma" in out.stdout
    summary = re.search(
        r"(\d+) writes: (\d+) acknowledged, (\d+) answered 503, (\d+) dropped .*; "
        r"(\d+)/(\d+) acknowledged notes read back",
        out.stdout,
    )
    assert summary is not None, out.stdout
    writes, acked, refused, dropped, back, total = map(int, summary.groups())
    assert writes == acked + refused + dropped == 180
    assert back == total == acked > 150
    assert dropped <= 2  # only requests in flight in the killed uvicorn worker
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith("safechroma-")] == []


def test_several_programs_example(tmp_path: Path) -> None:
    """``python -m safechroma._examples.shared_processes``: three programs on one directory,
    the one that started the worker SIGKILLed; one worker served all three, every acknowledged
    note is there, nothing is left running."""
    out = _run_example("shared_processes", tmp_path)
    assert "OK: one worker served all three" in out.stdout
    assert out.stdout.count("150 notes acknowledged") == 2
