"""benchmarks/upstream_api.py: chromadb's own tests on both clients, and the differences found.

Runs two of chromadb's tests through the real runner: one that passes on both clients, and one
that reads ``client._system`` (chromadb's in-process ``System``, which ``SafeClient`` does not
have by design), so the comparison must report exactly that test as differing. Needs the
``upstream`` extra (what chromadb's test suite imports).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

RUNNER = Path(__file__).resolve().parent.parent / "benchmarks" / "upstream_api.py"


def test_the_runner_reports_only_the_test_that_reads_chromadb_internals(tmp_path: Path) -> None:
    pytest.importorskip("fastapi", reason="needs the upstream extra")
    pytest.importorskip("psutil", reason="needs the upstream extra")
    out = tmp_path / "upstream.md"
    proc = subprocess.run(
        [
            sys.executable,
            str(RUNNER),
            "chromadb/test/api/test_get_database.py",
            "chromadb/test/client/test_multiple_clients_concurrency.py",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]  # 1: differences were found
    report = json.loads(out.with_suffix(".json").read_text())
    persistent, safe = report["runs"]
    assert set(persistent["opened"]) == {"chromadb.api.client.Client"}
    assert set(safe["opened"]) == {"safechroma.api.client.SafeClient"}
    get_db = "chromadb/test/api/test_get_database.py::test_get_database_not_found"
    assert persistent["results"][get_db]["outcome"] == "passed"
    assert safe["results"][get_db]["outcome"] == "passed"
    [diff] = report["differences"]
    assert diff["test"].endswith("test_multiple_clients_concurrently")
    assert (diff["persistent"], diff["safe"]) == ("passed", "failed")
    assert "'SafeClient' object has no attribute '_system'" in diff["safe_message"]
    assert "test_multiple_clients_concurrently" in out.read_text()
