"""Real corrupted Chroma directories that crash Chroma natively (issue 3).

The caller survives, the breaker or the recovery stops the crash loop, and no acknowledged
record is lost. Directories are built and verified by Chroma in child processes
(tests/chroma_dirs.py); the test process only talks to safechroma.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Any

import chroma_dirs
import numpy as np
import pytest

from safechroma import (
    BreakerPolicy,
    CrashLoopError,
    Event,
    SafeClient,
    WorkerCrashedError,
)
from safechroma._demo import _break_level0

N, DIM = 300, 8


@pytest.fixture(scope="module")
def healthy_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    root = tmp_path_factory.mktemp("template") / "db"
    info = chroma_dirs.make_collection_dir(str(root), n=N, dim=DIM, sync_threshold=100)
    return str(root), info["spec"]


def _copy(template: tuple[str, dict[str, Any]], dest: Path) -> str:
    shutil.copytree(template[0], dest)
    return str(dest)


def _assert_all_records_intact(path: str, spec: dict[str, Any]) -> None:
    report = chroma_dirs.verify_dir(path, spec)["coll"]
    assert report.get("count") == N, report
    assert report["missing"] == [] and report["bad_document"] == [] and report["not_first"] == []
    assert report["wrong_vector"] == []


def test_segfaulting_query_without_hooks_ends_at_the_breaker(
    healthy_template: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    """count works, query segfaults in every new worker: the breaker stops the loop.

    The first worker served count() before its query killed it (progress: bad luck); the two
    retries die at their first call (no progress: 2 of max_deaths=3). count() is still served
    (a worker that does not touch the damage), and the next query's deaths open the breaker."""
    path = _copy(healthy_template, tmp_path / "db")
    _break_level0(chroma_dirs.segment_dir(path))
    policy = BreakerPolicy(max_deaths=3, window=60, cooldown=600)
    with SafeClient(
        path, validator=None, recovery=None, breaker=policy, sleep=lambda s: None
    ) as client:
        col = client.get_collection("coll", embedding_function=None)
        assert col.count() == N
        with pytest.raises(WorkerCrashedError) as info:
            col.query(query_embeddings=chroma_dirs.vectors("coll", 1, DIM), n_results=3)
        assert info.value.signal == "SIGSEGV" and info.value.operation == "query"
        assert client.stats().deaths == {"SIGSEGV": 3}  # one try and two retries
        assert col.count() == N
        with pytest.raises(CrashLoopError):
            col.query(query_embeddings=chroma_dirs.vectors("coll", 2, DIM), n_results=3)
        with pytest.raises(CrashLoopError):
            col.count()


def test_segfaulting_directory_is_repaired_before_the_first_worker(
    healthy_template: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    path = _copy(healthy_template, tmp_path / "db")
    _break_level0(chroma_dirs.segment_dir(path))
    events: list[Event] = []
    with SafeClient(path, on_event=events.append) as client:
        col = client.get_collection("coll", embedding_function=None)
        vecs = chroma_dirs.vectors("coll", N, DIM)
        res = col.query(query_embeddings=vecs, n_results=1)
        assert [hit[0] for hit in res["ids"]] == chroma_dirs.record_ids("coll", N)
        assert client.stats().deaths == {}
    assert [e.kind for e in events][:3] == ["validated", "recovered", "worker_started"]
    assert events[0].detail["healthy"] is False
    _assert_all_records_intact(path, healthy_template[1])


def test_damage_found_after_a_crash_is_repaired_before_the_respawn(
    healthy_template: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    """The files break under a running worker; it dies; the respawn cycle repairs first."""
    path = _copy(healthy_template, tmp_path / "db")
    events: list[Event] = []
    with SafeClient(path, on_event=events.append) as client:
        col = client.get_collection("coll", embedding_function=None)
        assert col.count() == N
        _break_level0(chroma_dirs.segment_dir(path))  # a disk error under the live worker
        os.kill(client.stats().worker_pid, signal.SIGKILL)
        vec = chroma_dirs.vectors("coll", 5, DIM)
        res = col.query(query_embeddings=vec, n_results=1)
        assert [h[0] for h in res["ids"]] == chroma_dirs.record_ids("coll", 5)
    validated = [e for e in events if e.kind == "validated"]
    assert [e.detail["reason"] for e in validated] == ["start", "crash"]
    assert validated[1].detail["healthy"] is False
    assert any(e.kind == "recovered" for e in events)
    _assert_all_records_intact(path, healthy_template[1])


def test_poison_wal_crash_loop_is_stopped_then_repaired_without_loss(
    healthy_template: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    """A crash while add() applies to HNSW leaves records in the WAL that crash every new
    process on its first call (CHROMA_FACTS.md section 3): stop the loop, then repair."""
    path = _copy(healthy_template, tmp_path / "db")
    chroma_dirs.corrupt(path, "header_truncated")
    extra = np.random.default_rng(5).uniform(-1, 1, (50, DIM)).astype(np.float32)
    policy = BreakerPolicy(max_deaths=3, window=60, cooldown=600)
    with SafeClient(
        path, validator=None, recovery=None, breaker=policy, sleep=lambda s: None
    ) as client:
        col = client.get_collection("coll", embedding_function=None)
        with pytest.raises(WorkerCrashedError) as info:
            col.add(ids=[f"extra-{i}" for i in range(50)], embeddings=extra)
        assert info.value.outcome_unknown and info.value.signal == "SIGSEGV"
        with pytest.raises((WorkerCrashedError, CrashLoopError)):
            col.count()  # the poisoned WAL replays in every new worker
        with pytest.raises(CrashLoopError):
            col.count()
    # The default hooks repair it: every acknowledged record is there, and the add whose
    # outcome was unknown is either wholly applied or wholly absent.
    with SafeClient(path) as client:
        col = client.get_collection("coll", embedding_function=None)
        ids = chroma_dirs.record_ids("coll", N)
        got = col.get(ids=ids, include=["documents"])
        assert sorted(got["ids"]) == sorted(ids)
        assert col.count() in (N, N + 50)
        hits = col.query(query_embeddings=chroma_dirs.vectors("coll", N, DIM), n_results=1)
        assert [h[0] for h in hits["ids"]] == ids
        if col.count() == N + 50:
            res = col.query(query_embeddings=extra, n_results=1)
            assert [h[0] for h in res["ids"]] == [f"extra-{i}" for i in range(50)]


def test_records_whose_vectors_are_gone_are_reembedded_when_allowed(
    healthy_template: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    """Vectors that exist nowhere (index zeroed, WAL purged) are re-embedded from their
    documents by the caller's embedding function, in the worker, when ``reembed=`` is given
    and it reproduces the vectors that survived (issue 12: never an unchecked function)."""
    import reembed_fn

    path = _copy(healthy_template, tmp_path / "db")
    chroma_dirs.corrupt(path, "data_zeroed")
    events: list[Event] = []
    with SafeClient(path, reembed=reembed_fn.embed, on_event=events.append) as client:
        col = client.get_collection("coll", embedding_function=None)
        ids = chroma_dirs.record_ids("coll", N)
        got = col.get(ids=ids, include=["embeddings", "documents"])
        assert sorted(got["ids"]) == sorted(ids)
        applied = [e.detail["summary"] for e in events if e.kind == "salvage_applied"]
        assert applied and applied[0]["reembedded"] > 0 and applied[0]["not_recovered"] == []
        assert applied[0]["reembed_rejected"] is None
        original = dict(zip(ids, chroma_dirs.vectors("coll", N, DIM), strict=False))
        for rid, vec in zip(got["ids"], got["embeddings"], strict=False):
            np.testing.assert_allclose(vec, original[rid], atol=1e-5)
