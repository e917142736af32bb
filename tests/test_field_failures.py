"""Failures Chroma users report from the field, reproduced for real and survived (issue 13,
part 2, the worker's side; the on-disk ones are in the validator and repair tests).

- chroma-core/chroma#6984: a background thread segfaults with no call running;
- #6852: an abort in Chroma's runtime while the interpreter exits;
- #5843 / claude-mem #3684: native memory that is never given back;
- #7510 / MemPalace #1046: a file that grows without bound;
- #7040, #4038, #4460: hangs (a SQLite lock held by another process; a hang inside open).
"""

from __future__ import annotations

import ctypes
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import mounted_tmpfs

import safechroma
from safechroma import SafeClient, WorkerCrashedError, WorkerStartError, WorkerTimeoutError

# Slow (waits out real start deadlines and hangs): not in the everyday lane, -m "not slow".
pytestmark = pytest.mark.slow

# -- a worker that dies between calls (#6984) -----------------------------------------------


def _segfault_soon(_client: Any, delay: float) -> int:
    """In the worker: a background thread dereferences NULL after ``delay`` seconds."""

    def crash() -> None:
        time.sleep(delay)
        ctypes.string_at(0)

    threading.Thread(target=crash, daemon=True).start()
    return os.getpid()


def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    """Wait until the worker has fully exited, without reaping it: the supervisor must notice by
    itself. (A thread group leader shows as a zombie while its other threads still dump core;
    a pidfd becomes readable only when the whole group has exited. Workers are forked by the
    worker template, so they are not this process's children: waitid() cannot see them.)"""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return  # exited and already reaped by its parent
    try:
        readable, _, _ = select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)
    if not readable:
        raise AssertionError(f"worker {pid} did not die")


def test_a_worker_that_dies_between_calls_is_replaced_silently(db: str) -> None:
    """Nothing was in flight, so no caller gets an error, not even for a write: the death is
    noticed before the next call is sent, counted, and the directory checked first."""
    events: list[safechroma.Event] = []
    with SafeClient(db, on_event=events.append) as client:
        col = client.create_collection("idle", embedding_function=None)
        col.add(ids=["a"], embeddings=[[1.0, 2.0]], documents=["first"])
        pid = client.run_in_worker(_segfault_soon, 0.3)
        _wait_gone(pid)
        col.upsert(ids=["b"], embeddings=[[3.0, 4.0]], documents=["second"])  # no error
        assert client.stats().worker_pid != pid
        assert sorted(col.get()["ids"]) == ["a", "b"]
        assert client.stats().deaths == {"SIGSEGV": 1}
    died = [e for e in events if e.kind == "worker_died"]
    assert len(died) == 1 and died[0].pid == pid
    assert died[0].detail["operation"] == "no call (between calls)"
    kinds = [e.kind for e in events]
    assert kinds.index("validated", kinds.index("worker_died")) > 0  # checked before respawn


# -- an abort while exiting (#6852) ---------------------------------------------------------


def _abort_when_exiting(_client: Any) -> None:
    """In the worker: make its exit abort, as Chroma's runtime did at interpreter exit."""
    os._exit = lambda _code: os.abort()  # type: ignore[assignment]


def test_an_abort_at_exit_is_logged_not_raised_or_counted(db: str) -> None:
    events: list[safechroma.Event] = []
    client = SafeClient(db, on_event=events.append)
    pid = client.stats().worker_pid
    client.run_in_worker(_abort_when_exiting)
    client.close()  # never raises
    abnormal = [e for e in events if e.kind == "worker_exit_abnormal"]
    assert len(abnormal) == 1 and abnormal[0].pid == pid
    assert abnormal[0].detail["signal"] == "SIGABRT"
    assert client.stats().deaths == {} and not client.stats().breaker_open
    assert not any(e.kind == "worker_died" for e in events)


# -- memory that is never given back (#5843) ------------------------------------------------

_HOARD: list[bytes] = []


def _leak(_client: Any, mib: int) -> int:
    """In the worker: keep ``mib`` MiB of touched memory for good, as a leak does."""
    _HOARD.append(os.urandom(1 << 20) * mib)
    return os.getpid()


def test_a_worker_past_its_memory_ceiling_is_replaced_between_calls(db: str) -> None:
    events: list[safechroma.Event] = []
    with SafeClient(db, validator=None, on_event=events.append) as probe:
        rss = probe.stats().worker_rss
    assert rss is not None
    with SafeClient(db, max_worker_rss=rss + (150 << 20), on_event=events.append) as client:
        col = client.create_collection("leaky", embedding_function=None)
        col.add(ids=["a"], embeddings=[[1.0, 2.0]], documents=["kept"])
        pid = client.run_in_worker(_leak, 300)
        stats = client.stats()
        assert stats.worker_rss is not None and stats.worker_rss > rss + (250 << 20)
        time.sleep(1.1)  # the ceiling is read at most once a second
        assert col.get(ids=["a"])["documents"] == ["kept"]  # served by a fresh worker
        stats = client.stats()
        assert stats.worker_pid != pid and stats.deaths == {}
        assert stats.worker_rss is not None and stats.worker_rss < rss + (150 << 20)
    assert any(e.kind == "worker_recycled" and e.pid == pid for e in events)


def test_max_requests_recycles_the_worker_with_no_error(db: str) -> None:
    with SafeClient(db, max_requests=20) as client:
        col = client.create_collection("recycled", embedding_function=None)
        pids = set()
        for i in range(50):
            col.upsert(ids=[f"r{i}"], embeddings=[[float(i), 1.0]])
            pids.add(client.stats().worker_pid)
        assert col.count() == 50
        assert len(pids) >= 3 and client.stats().deaths == {}


# -- a file that grows without bound (#7510) ------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 128 MiB tmpfs mounted for the test (root only), unmounted after it."""
    with mounted_tmpfs(
        tmp_path / "disk", "128M", "a runaway write needs a real file system that would fill"
    ) as mnt:
        yield mnt


def _runaway_write(_client: Any, path: str, mib: int) -> int:
    """In the worker: write ``mib`` MiB into one file, as a corrupt index's writer did."""
    chunk = b"\0" * (1 << 20)
    written = 0
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(chunk)
            written += 1
    return written


def test_a_runaway_write_kills_the_worker_not_the_disk(small_disk: Path) -> None:
    """Default options: the worker's RLIMIT_FSIZE (largest file + half the free space) stops a
    write that would fill the disk: the kernel kills the worker with SIGXFSZ (never a silently
    short write), the file system keeps room, and the next call is served by a new worker."""
    db = str(small_disk / "db")
    with SafeClient(db) as client:
        col = client.create_collection("disk", embedding_function=None)
        col.add(ids=["a"], embeddings=[[1.0, 2.0]], documents=["kept"])
        pid = client.stats().worker_pid
        runaway = os.path.join(db, "runaway.bin")
        with pytest.raises(WorkerCrashedError) as info:
            client.run_in_worker(_runaway_write, runaway, 512)
        assert info.value.signal == "SIGXFSZ" and info.value.pid == pid
        st = os.statvfs(db)
        assert st.f_bavail * st.f_frsize > 40 << 20  # the disk still has room
        assert os.path.getsize(runaway) < 100 << 20
        col.upsert(ids=["b"], embeddings=[[3.0, 4.0]], documents=["after"])
        assert sorted(col.get()["ids"]) == ["a", "b"]
        assert client.stats().worker_pid != pid


# -- hangs (#7040, #4038, #4460) ------------------------------------------------------------

HOLD_LOCK = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=0)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(120)
"""


@pytest.fixture
def lock_holder() -> Iterator[Any]:
    procs: list[subprocess.Popen[str]] = []

    def hold(sqlite_path: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLD_LOCK, sqlite_path], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        procs.append(proc)
        return proc

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_a_sqlite_lock_held_by_another_process_is_cut_by_the_deadline(
    db: str, lock_holder: Any
) -> None:
    """Another process holds chroma.sqlite3's write lock: the call hangs in Chroma's busy
    timeout (1000 s) until the per-call deadline kills the worker; once the lock is released,
    the next call is served."""
    with SafeClient(db) as client:
        col = client.create_collection("locked", embedding_function=None)
        col.add(ids=["a"], embeddings=[[1.0, 2.0]])
        holder = lock_holder(os.path.join(db, "chroma.sqlite3"))
        start = time.monotonic()
        with safechroma.call_timeout(3), pytest.raises(WorkerTimeoutError):
            col.upsert(ids=["b"], embeddings=[[3.0, 4.0]])
        assert time.monotonic() - start < 300  # liveness: not Chroma's 1000 s busy timeout
        holder.kill()
        holder.wait()
        col.upsert(ids=["b"], embeddings=[[3.0, 4.0]])
        assert col.count() == 2


def test_a_hang_inside_open_is_cut_by_the_start_deadline(db: str, lock_holder: Any) -> None:
    """A worker whose PersistentClient() hangs on a locked database is killed at
    ``start_timeout`` (3 s here instead of 120 s, to keep the test short): the caller gets
    WorkerStartError saying so, and the directory opens once the lock is gone."""
    with SafeClient(db) as client:
        client.create_collection("opened", embedding_function=None)
    holder = lock_holder(os.path.join(db, "chroma.sqlite3"))
    start = time.monotonic()
    with pytest.raises(WorkerStartError) as info:
        SafeClient(db, start_timeout=3)
    assert info.value.signal == "timeout"
    # Liveness, not speed: bounded, far from the 1000 s of Chroma's busy timeout (the checks
    # before a start also wait, boundedly, for the lock).
    assert time.monotonic() - start < 300
    holder.kill()
    holder.wait()
    with SafeClient(db) as client:
        assert [c.name for c in client.list_collections()] == ["opened"]
