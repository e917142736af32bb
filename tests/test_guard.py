"""The guard against chromadb's vector-swapping bug (issue 13, part 3).

chromadb 1.5.9: when a process writes to a collection before its first read, the first read's
WAL backfill resets the HNSW writer, and the next write re-applies the WAL since the last
persist; an ``update`` of an id that was absent the first time then overwrites the vector of a
later ``add`` of that id. ``safechroma.runtime.guard`` reads each collection before its first
write in a worker and never sends Chroma updates of absent ids.

Where chromadb itself is wrong, safechroma is right, and these tests say so: each case runs the
same calls through plain chromadb (in a child process, so this process never opens a Chroma
directory) and through ``SafeClient``.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from chromadb.errors import InvalidArgumentError, NotFoundError
from conftest import run_plain_chromadb

from safechroma import SafeClient, WorkerCrashedError

X_ADDED = [0.0, 1.0, 0.0]  # the vector x was created with (the last write to x)
X_IGNORED = [1.0, 0.0, 0.0]  # the vector of the update Chroma ignored (x did not exist yet)
CONFIG = {"hnsw": {"sync_threshold": 100}}


REPRODUCER = """
    col = chromadb.PersistentClient(path).create_collection(
        "repro", embedding_function=None, configuration={"hnsw": {"sync_threshold": 100}})
    col.add(ids=["a"], embeddings=[[0, 0, 1]])
    col.update(ids=["x"], embeddings=[[1, 0, 0]], documents=["update"])
    col.add(ids=["x"], embeddings=[[0, 1, 0]], documents=["add"])
    first = col.get(ids=["x"], include=["embeddings"])["embeddings"][0].tolist()
    col.upsert(ids=["b"], embeddings=[[0.5, 0.5, 0]])
    second = col.get(ids=["x"], include=["embeddings"])["embeddings"][0].tolist()
    print(first, second)
"""


def _x(col: object) -> list[float]:
    got = col.get(ids=["x"], include=["embeddings", "documents"])  # type: ignore[attr-defined]
    assert got["documents"] == ["add"]
    return [float(v) for v in got["embeddings"][0]]


def test_plain_chromadb_swaps_the_vector(tmp_path: object) -> None:
    """The control: chromadb 1.5.9 itself returns the ignored update's vector for x after any
    later write. If this fails, chromadb fixed the bug; the guard stays harmless."""
    out = run_plain_chromadb(REPRODUCER, str(tmp_path) + "/plain")
    assert out == f"{X_ADDED} {X_IGNORED}"


def test_reproducer_through_safeclient_returns_the_last_write(db: str) -> None:
    """Pins the bug of issue 13 part 3 in one worker: every read of x returns [0, 1, 0]."""
    with SafeClient(db, validator=None) as client:
        col = client.create_collection("repro", embedding_function=None, configuration=CONFIG)
        col.add(ids=["a"], embeddings=[[0, 0, 1]])
        col.update(ids=["x"], embeddings=[X_IGNORED], documents=["update"])
        col.add(ids=["x"], embeddings=[X_ADDED], documents=["add"])
        assert _x(col) == X_ADDED
        col.upsert(ids=["b"], embeddings=[[0.5, 0.5, 0]])
        assert _x(col) == X_ADDED
        # Enough later writes to pass the flush threshold: the persisted index is right too.
        for i in range(120):
            col.upsert(ids=[f"n{i}"], embeddings=[[i, 1.0, 2.0]])
            if i % 40 == 0:
                assert _x(col) == X_ADDED
        assert _x(col) == X_ADDED
    with SafeClient(db, validator=None) as client:  # a fresh worker reads the persisted index
        assert _x(client.get_collection("repro", embedding_function=None)) == X_ADDED


def test_reproducer_across_a_worker_death(db: str) -> None:
    """Pins the bug across a death: the new worker's first call is a write, which is the
    order that makes chromadb re-apply the WAL (each respawned worker is a fresh process)."""
    with SafeClient(db, validator=None) as client:
        col = client.create_collection("repro", embedding_function=None, configuration=CONFIG)
        col.add(ids=["a"], embeddings=[[0, 0, 1]])
        col.update(ids=["x"], embeddings=[X_IGNORED], documents=["update"])
        col.add(ids=["x"], embeddings=[X_ADDED], documents=["add"])
        pid = client.stats().worker_pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        # The new worker's first call is this write, whether the death is seen before it is
        # sent (it goes to the new worker) or only when it is sent to the dead one (a write
        # is not replayed: it raises, and the same write is then the new worker's first call).
        try:
            col.upsert(ids=["b"], embeddings=[[0.5, 0.5, 0]])
        except WorkerCrashedError:
            col.upsert(ids=["b"], embeddings=[[0.5, 0.5, 0]])
        assert client.stats().worker_pid != pid
        assert _x(col) == X_ADDED
        col.upsert(ids=["c"], embeddings=[[0.2, 0.5, 0]])
        assert _x(col) == X_ADDED


WAL_WITH_IGNORED_UPDATE = """
    col = chromadb.PersistentClient(path).create_collection(
        "repro", embedding_function=None, configuration={"hnsw": {"sync_threshold": 100}})
    col.add(ids=["a"], embeddings=[[0, 0, 1]])
    col.update(ids=["x"], embeddings=[[1, 0, 0]], documents=["update"])
    col.add(ids=["x"], embeddings=[[0, 1, 0]], documents=["add"])
"""

WRITE_FIRST_THEN_READ = """
    col = chromadb.PersistentClient(path).get_collection("repro", embedding_function=None)
    col.upsert(ids=["b"], embeddings=[[0.5, 0.5, 0]])
    first = col.get(ids=["x"], include=["embeddings"])["embeddings"][0].tolist()
    col.upsert(ids=["c"], embeddings=[[0.2, 0.5, 0]])
    second = col.get(ids=["x"], include=["embeddings"])["embeddings"][0].tolist()
    print(first, second)
"""


def test_a_wal_written_before_the_guard_is_replayed_right(tmp_path: object) -> None:
    """A directory written by plain chromadb whose WAL holds an update Chroma ignored: the next
    process that writes first gets x swapped under plain chromadb, never under SafeClient."""
    plain, safe = str(tmp_path) + "/plain", str(tmp_path) + "/safe"
    run_plain_chromadb(WAL_WITH_IGNORED_UPDATE, plain)
    run_plain_chromadb(WAL_WITH_IGNORED_UPDATE, safe)
    assert run_plain_chromadb(WRITE_FIRST_THEN_READ, plain) == f"{X_ADDED} {X_IGNORED}"
    with SafeClient(safe, validator=None) as client:
        col = client.get_collection("repro", embedding_function=None)
        col.upsert(ids=["b"], embeddings=[[0.5, 0.5, 0]])
        assert _x(col) == X_ADDED
        col.upsert(ids=["c"], embeddings=[[0.2, 0.5, 0]])
        assert _x(col) == X_ADDED


def _raw_writes(client: object) -> list[float]:
    """Runs in the worker: chromadb's own Collection, writing before any read."""
    col = client.get_collection("raw", embedding_function=None)  # type: ignore[attr-defined]
    col.update(ids=["x"], embeddings=[X_IGNORED], documents=["update"])
    col.add(ids=["x"], embeddings=[X_ADDED], documents=["add"])
    col.upsert(ids=["b"], embeddings=[[0.5, 0.5, 0]])
    col.get(ids=["b"])
    col.upsert(ids=["c"], embeddings=[[0.2, 0.5, 0]])
    return [float(v) for v in col.get(ids=["x"], include=["embeddings"])["embeddings"][0]]


def test_the_guard_covers_run_in_worker(db: str) -> None:
    """Writes made by a run_in_worker function (and so by the recovery's write-back, which
    runs the same way) go through the guard too."""
    with SafeClient(db, validator=None) as client:
        client.create_collection("raw", embedding_function=None, configuration=CONFIG)
        client.run_in_worker(
            lambda c: c.get_collection("raw").add(ids=["a"], embeddings=[[0, 0, 1]])
        )
        # A fresh worker, whose first touch of the collection is the function's writes.
        pid = client.stats().worker_pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while True:
            try:
                assert client.run_in_worker(_raw_writes) == X_ADDED
                break
            except WorkerCrashedError:
                assert time.monotonic() < deadline


def test_errors_stay_chromadbs(db: str) -> None:
    """The guard changes no error: wrong dimensions on absent ids, and a write on a deleted
    collection, raise chromadb's own exceptions and messages; the worker stays."""
    with SafeClient(db, validator=None) as client:
        col = client.create_collection("errs", embedding_function=None)
        col.add(ids=["a"], embeddings=[[0, 0, 1]])
        pid = client.stats().worker_pid
        with pytest.raises(InvalidArgumentError, match="expecting embedding with dimension of 3"):
            col.update(ids=["zz"], embeddings=[[1, 0]])
        with pytest.raises(InvalidArgumentError, match="Inconsistent dimensions"):
            col.update(ids=["zz", "a"], embeddings=[[1, 0], [1, 0, 0]])
        col.update(ids=["zz", "a"], embeddings=[[9, 9, 9], [1, 0, 0]])  # only a takes effect
        got = col.get(include=["embeddings"])
        assert got["ids"] == ["a"] and got["embeddings"][0].tolist() == [1, 0, 0]
        client.delete_collection("errs")
        for write in (
            lambda: col.update(ids=["a"], embeddings=[[1, 0, 0]]),
            lambda: col.upsert(ids=["a"], embeddings=[[1, 0, 0]]),
            lambda: col.delete(ids=["a"]),
        ):
            with pytest.raises(NotFoundError, match="does not exist"):
                write()
        assert client.stats().worker_pid == pid
