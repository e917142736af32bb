"""Process-level faults (issue 7): the parent dies, two programs race, the disk fills, the
directory is read-only. Real programs, real signals, real filesystems (tmpfs mounted by the test;
the tests that need ``mount`` skip, saying so, where it is not permitted)."""

from __future__ import annotations

import errno
import fcntl
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import chromadb.errors
import numpy as np
import pytest
from conftest import child_pids, mounted_tmpfs

from safechroma import SafeClient
from safechroma.runtime.worker import IDLE_GRACE

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"
PY = sys.executable


def _chroma_child(db: str, code: str) -> object:
    """Run ``code`` against chromadb.PersistentClient(db) in a child (this process never opens a
    Chroma directory); ``code`` sets ``result``, which comes back pickled."""
    script = (
        textwrap.dedent(f"""
        import pickle, sys, chromadb
        client = chromadb.PersistentClient({db!r})
    """)
        + textwrap.dedent(code)
        + "\nsys.stdout.buffer.write(pickle.dumps(result))\n"
    )
    out = subprocess.run([PY, "-c", script], capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    return pickle.loads(out.stdout)


def _lock_is_free(db: str) -> bool:
    fd = os.open(os.path.join(db, ".safechroma.lock"), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


_WRITER = """
import sys, numpy as np
sys.path.insert(0, {src!r})
from safechroma import SafeClient
c = SafeClient({db!r}, validator=None)
col = c.create_collection("loop", embedding_function=None)
print("worker", c.stats().worker_pid, flush=True)
rng = np.random.default_rng(0)
for i in range(100000):
    col.add(ids=[f"{{i}}-{{j}}" for j in range({batch})],
            embeddings=rng.random(({batch}, 64), dtype=np.float32))
    print("acked", i, flush=True)
"""


def test_parent_killed_mid_call_frees_worker_lock_and_leaves_a_healthy_directory(db: str) -> None:
    """Pins: SIGKILL of the only program using a directory in the middle of a stream of adds:
    its worker exits within ~3 s, the directory lock is free, check_directory calls the
    directory healthy, and chromadb (in a child) sees every acknowledged batch, and whole
    batches only."""
    batch = 300
    prog = subprocess.Popen(
        [PY, "-c", _WRITER.format(src=str(SRC), db=db, batch=batch)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert prog.stdout is not None
    worker = int(prog.stdout.readline().split()[1])
    acked = -1
    while acked < 8:  # let a few batches go through (and the HNSW flush at 1000 records)
        line = prog.stdout.readline()
        assert line, "the writer died on its own"
        acked = int(line.split()[1])
    time.sleep(0.05)  # the loop is always inside add() or between two: a kill lands mid-stream
    os.kill(prog.pid, signal.SIGKILL)
    killed = time.monotonic()
    prog.wait()
    acked = max(
        [acked]
        + [int(x.split()[1]) for x in prog.stdout.read().splitlines() if x.startswith("acked")]
    )
    prog.stdout.close()
    while Path(f"/proc/{worker}").exists() and time.monotonic() - killed < 8:
        time.sleep(0.02)
    gone_after = time.monotonic() - killed
    assert not Path(f"/proc/{worker}").exists(), "the worker outlived its parent"
    # No other process uses it: it goes after the idle grace and the in-flight call's grace.
    assert gone_after < IDLE_GRACE + 2.5, f"worker took {gone_after:.1f} s to go"
    assert _lock_is_free(db)
    from safechroma.storage.validate import check_directory

    report = check_directory(db)
    assert report.healthy, report
    count = _chroma_child(db, 'result = client.get_collection("loop").count()')
    assert isinstance(count, int)
    assert count % batch == 0, f"a batch was applied partially: {count} records"
    assert count >= (acked + 1) * batch, "an acknowledged batch was lost"
    assert count <= (acked + 2) * batch  # at most the one in flight on top


_RACER = """
import sys, time
sys.path.insert(0, {src!r})
from safechroma import SafeClient, DirectoryLockedError
while time.time() < {start}:
    time.sleep(0.001)
try:
    c = SafeClient({db!r}, validator=None, exclusive={exclusive})
except DirectoryLockedError as e:
    print("LOCKED", e.path, flush=True)
    sys.exit(0)
print("WON", c.stats().worker_pid, flush=True)
time.sleep(2.5)
c.close()
"""


def _race(db: str, exclusive: bool) -> list[str]:
    start = time.time() + 1.5  # both interpreters are up and waiting by then
    racers = [
        subprocess.Popen(
            [PY, "-c", _RACER.format(src=str(SRC), db=db, start=start, exclusive=exclusive)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [r.communicate(timeout=120) for r in racers]
    assert all(r.returncode == 0 for r in racers), outs
    return sorted(o[0] if o[0] else f"ERR {o[1][-500:]}" for o in outs)


# A second round of each race runs in the slow lane.
@pytest.mark.parametrize("round_", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_two_exclusive_programs_racing_for_one_directory(db: str, round_: int) -> None:
    """Pins: two programs that open one directory exclusively at the same instant: exactly
    one wins, the other gets DirectoryLockedError naming the directory (never two owners,
    never a hang)."""
    outs = _race(db, exclusive=True)
    assert [o.split()[0] for o in outs] == ["LOCKED", "WON"], outs
    assert os.path.realpath(db) in outs[0]


@pytest.mark.parametrize("round_", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_two_programs_racing_for_one_directory_share_one_worker(db: str, round_: int) -> None:
    """Pins: by default, two programs opening one directory at the same instant are both
    served, by one worker: exactly one of them started it, the other attached."""
    outs = _race(db, exclusive=False)
    assert [o.split()[0] for o in outs] == ["WON", "WON"], outs
    assert outs[0].split()[1] == outs[1].split()[1], outs  # the same worker pid


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 6 MiB tmpfs mounted for the test (root only), unmounted after it."""
    with mounted_tmpfs(
        tmp_path / "mnt",
        "6M",
        "disk-full and read-only cases need a real filesystem that fills or is mounted read-only",
    ) as mnt:
        yield mnt


def test_disk_full_during_writes_is_a_clear_error_and_keeps_acknowledged_data(
    tmpfs: Path,
) -> None:
    """Pins: filling the filesystem with adds gives chromadb's own error type in the caller (not a
    crash, not a hang; the worker survives), and once space is back every acknowledged record is
    there and the failed batch is all-or-nothing.

    Note: chromadb 1.5.9's message for ENOSPC is "Error in compaction: Failed to apply logs to the
    metadata segment", which does not say "disk full"; safechroma passes it through unchanged,
    and while the disk stays full every call (count too) fails the same way."""
    db = str(tmpfs / "db")
    rng = np.random.default_rng(1)
    acked: list[str] = []
    failed: list[str] = []
    with SafeClient(db, validator=None) as client:
        col = client.create_collection("full", embedding_function=None)
        pid = client.stats().worker_pid
        for i in range(200):
            ids = [f"{i}-{j}" for j in range(200)]
            try:
                col.add(
                    ids=ids,
                    embeddings=rng.random((200, 64), dtype=np.float32),
                    documents=["x" * 200] * 200,
                )
            except chromadb.errors.ChromaError as exc:
                failed = ids
                error = exc
                break
            acked += ids
        else:
            pytest.fail("6 MiB never filled up")
        assert isinstance(error, chromadb.errors.InternalError)
        assert "Failed to apply logs" in str(error)
        assert client.stats().worker_pid == pid, "a full disk must not cost the worker"
        assert len(acked) >= 1000
    subprocess.run(["mount", "-o", "remount,size=64M", str(tmpfs)], check=True)
    got = _chroma_child(
        db,
        f"""
        col = client.get_collection("full")
        present = set(col.get(ids={acked + failed!r})["ids"])
        result = (col.count(), present)
    """,
    )
    count, present = got  # type: ignore[misc]
    assert set(acked) <= present, f"{len(set(acked) - present)} acknowledged records lost"
    assert len(present & set(failed)) in (0, len(failed)), "the failed batch is partial"
    assert count == len(present)
    from safechroma.storage.validate import check_directory

    assert check_directory(db).healthy


def test_read_only_directory_is_a_clear_error(tmpfs: Path) -> None:
    """Pins: a directory on a filesystem remounted read-only (root bypasses chmod, so this is the
    honest way) refuses at once with OSError(EROFS) naming the lock file it could not open: no
    worker is started, nothing hangs, nothing is left running."""
    db = tmpfs / "db"
    with SafeClient(db, validator=None) as client:
        client.create_collection("readonly", embedding_function=None).add(
            ids=["a"], embeddings=[[1.0, 2.0]]
        )
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    before = child_pids()
    start = time.monotonic()
    with pytest.raises(OSError) as info:
        SafeClient(db, validator=None)
    assert time.monotonic() - start < 5
    assert info.value.errno == errno.EROFS
    assert ".safechroma.lock" in str(info.value)
    assert child_pids() == before
    with pytest.raises(OSError):  # really read-only, even for root
        (db / "probe").write_text("x")
