"""Chaos soak (issue 7): a mixed multi-threaded workload while the worker is killed and hung.

The engine is ``tests/chaos.py`` (its docstring explains the ledger); ``benchmarks/soak.py`` runs
the same engine for minutes and writes its figures. Here it runs for about half a minute: long
enough on this 2-core machine for ~15-30 real faults (SIGKILL, SIGSEGV, SIGBUS via ``os.kill``,
SIGSTOP cut by the client deadline, a call hanging past ``call_timeout``). The long run is
``python benchmarks/soak.py --seconds 300`` (no permanently skipped test here).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from chaos import SoakConfig, run_soak

# Slow (soaks under faults): not in the everyday lane, -m "not slow".
pytestmark = pytest.mark.slow

# Override for a longer local run: SAFECHROMA_SOAK_SECONDS=120 pytest tests/test_chaos.py
SECONDS = float(os.environ.get("SAFECHROMA_SOAK_SECONDS", "30"))


@pytest.mark.parametrize("threads", [4, 8])
def test_soak_under_faults_loses_nothing(tmp_path: Path, threads: int) -> None:
    """Pins: under random real faults, on default options (but the deadline that cuts a
    SIGSTOPped worker), every acknowledged write is present exactly once with its document,
    metadata and vector (read back by chromadb in a child process), every write with an
    unknown outcome is all-or-nothing, no read during the run contradicts the ledger (issue 13:
    chromadb's vector swap once made such reads), the caller never dies or sees an unexpected
    error type, no thread is left behind (processes and fds: the autouse leak check) and RSS
    stays flat.

    Recall misses (an intact record not returned first by its own vector: HNSW is approximate,
    plain chromadb shows them with no faults) are counted and printed, not failed."""
    seconds = SECONDS if threads == 4 else SECONDS / 2
    cfg = SoakConfig(seconds=seconds, threads=threads, seed=7 + threads)
    report = run_soak(str(tmp_path / "db"), cfg)
    print(report.markdown())
    assert report.problems == []
    assert report.contradictions == []
    assert report.records_lost == 0
    assert report.records_checked == threads * 120
    assert sum(report.faults_injected.values()) >= 5, "the soak must really inject faults"
    assert sum(report.deaths.values()) >= 5 and report.served_after_last_fault
    assert report.records_present > 50 and report.operations > 100
    assert report.threads_after == report.threads_before
    # Generous: the caller holds no per-call state; 64 MiB allows for allocator noise.
    assert report.rss_after_kib - report.rss_before_kib < 64 * 1024


def test_soak_without_faults_is_the_control(tmp_path: Path) -> None:
    """Pins: the ledger and the final check agree with chromadb when nothing goes wrong, so a
    problem reported under faults is the faults' doing, not the checker's. Also pins that
    ``faults=()`` runs no injector (it once died with ``IndexError`` from ``rng.choice(())``)."""
    report = run_soak(str(tmp_path / "db"), SoakConfig(seconds=6, seed=3, faults=(), warmup=1))
    assert report.problems == [] and report.records_lost == 0
    assert report.contradictions == []  # without faults every read agrees with the ledger
    assert sum(report.deaths.values()) == 0 and report.unknown_writes == 0
    assert report.records_checked == 4 * 120 and report.operations > 100
