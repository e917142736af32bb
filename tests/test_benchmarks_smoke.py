"""Smoke test of the benchmark suite (issue 5): the tiniest run writes complete, sane results."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Slow (runs the benchmarks end to end): not in the everyday lane, -m "not slow".
pytestmark = pytest.mark.slow

RUN = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"
OPS = {
    "heartbeat",
    "count",
    "get_ids10",
    "get_limit100_emb",
    "query1",
    "query16",
    "get_bulk_emb",
    "add384",
    "add1536",
    "upsert384",
    "upsert1536",
}


def test_tiniest_run_writes_positive_numbers(tmp_path: Path) -> None:
    out = tmp_path / "out"
    chart = importlib.util.find_spec("matplotlib") is not None  # the "bench" extra
    proc = subprocess.run(
        [
            sys.executable,
            str(RUN),
            "--quick",
            "--records",
            "500",
            "--rounds",
            "1",
            "--reps",
            "1",
            "--startup-trials",
            "1",
            "--crash-trials",
            "1",
            "--throughput-seconds",
            "0.2",
            "--fresh-trials",
            "1",
            "--modes",
            "direct,safechroma",
            "--out",
            str(out),
            "--workdir",
            str(tmp_path / "work"),
            "--no-cache",
            *([] if chart else ["--no-chart"]),
        ],
        capture_output=True,
        text=True,
        timeout=480,
        env={**os.environ, "PYTHONWARNINGS": ""},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert (out / "results.md").read_text().startswith("# safechroma benchmark results")
    if chart:
        assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    for key in (
        "machine",
        "config",
        "ops",
        "targets",
        "summary",
        "bulk",
        "rss",
        "crash",
        "startup",
    ):
        assert key in results, key
    for key in ("cpu_model", "logical_cpus", "ram_gib", "python", "chromadb", "numpy", "kernel"):
        assert results["machine"][key], key
    assert set(results["ops"]) == OPS
    for op, entry in results["ops"].items():
        for mode in ("direct", "safechroma"):
            s = entry["modes"][mode]
            assert s["n"] >= 1 and s["median_ms"] > 0 and s["p95_ms"] >= s["median_ms"] > 0, (
                op,
                mode,
            )
        assert entry["modes"]["safechroma"]["ratio_to_direct"] > 0
        assert entry["modes"]["safechroma"]["transport_us"]["median"] > 0
    assert results["bulk"]["get_bulk_emb"]["gb_per_s_median"] > 0
    crash = results["summary"]["crash"]
    assert crash["all_answered"] and crash["new_worker_each_time"] and crash["median_ms"] > 0
    assert results["summary"]["startup"]["safechroma_open_to_first_count"]["median_ms"] > 0
    mem = results["summary"]["memory"]["safechroma"]
    assert mem["caller_mib"] > 0 and mem["children_total_mib"] > 0
    assert {t["verdict"] for t in results["targets"]} <= {"PASS", "MISS"}
    tp = results["throughput"]
    for kind, counts in (("threads", ("1", "2", "4", "8")), ("tasks", ("8", "64"))):
        for op in ("query1", "get_ids10", "upsert100"):
            for n in counts:
                for mode in ("direct", "safechroma"):
                    cell = tp[kind][op][n][mode]
                    assert cell["calls"] > 0 and cell["per_s"] > 0 and not cell["errors"], cell
    for mode in ("direct", "safechroma"):
        assert min(results["fresh_open"][mode]["open_to_first_answer_ns"]) > 0
    if chart:
        assert (out / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert results["leftover_children"] == []
    assert results["errors"] == []
