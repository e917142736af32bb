"""A write whose worker died in it stays all-or-nothing through a repair (the write journal).

The chaos soak in portable mode once saw an upsert of unknown outcome come back applied to six
of its seven ids after a repair. The journal disagreed with Chroma about that one write, and the
repair's fill (:func:`safechroma.storage.journal_fill.fill`) took the journal for the truth:

- Chroma ahead: the record was written beside Chroma's commit, by the journal's own thread, so
  a worker killed between the two left a write Chroma had and the journal lacked; an id that
  write re-created after a delete was then deleted again as a "stale row".
- Journal ahead: a worker killed after the record but before Chroma's commit left a write
  Chroma never had; the fill wrote back only the ids the directory lacked.

Now the record is written before Chroma is asked, and the one record that may be ahead (the
last of a dead worker's segment) is settled against Chroma's WAL before anything else writes
(:func:`safechroma.storage.journal.settle`). Each test kills a real worker at the instant that
matters, from inside it, runs ``safechroma repair`` (the fill runs on every repair) and reads
the directory back with plain chromadb in a child process. A collection's drop and chromadb's
``reset()``, journaled after Chroma's the same way, had the same window.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import safechroma
from safechroma.storage import journal as jr

ENV = {**os.environ, "ANONYMIZED_TELEMETRY": "False", "NO_COLOR": "1"}
DIM = 4

_READ = """
import json, sys
import chromadb
client = chromadb.PersistentClient(sys.argv[1])
col = client.get_collection("unknown", embedding_function=None)
g = col.get(include=["documents", "embeddings"])
print("RESULT " + json.dumps(
    {i: [d, [float(x) for x in e]] for i, d, e in zip(g["ids"], g["documents"], g["embeddings"])}
), flush=True)
"""


def _vec(k: float) -> np.ndarray:
    return np.full((1, DIM), k, dtype=np.float32)


def _read(root: str) -> dict[str, Any]:
    p = subprocess.run(
        [sys.executable, "-c", _READ, root], capture_output=True, text=True, env=ENV, timeout=300
    )
    assert p.returncode == 0, p.stderr[-3000:]
    (line,) = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    got: dict[str, Any] = json.loads(line[7:])
    return got


_NAMES = """
import json, sys
import chromadb
names = sorted(c.name for c in chromadb.PersistentClient(sys.argv[1]).list_collections())
print("RESULT " + json.dumps(names), flush=True)
"""


def _names(root: str) -> list[str]:
    p = subprocess.run(
        [sys.executable, "-c", _NAMES, root], capture_output=True, text=True, env=ENV, timeout=300
    )
    assert p.returncode == 0, p.stderr[-3000:]
    (line,) = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    names: list[str] = json.loads(line[7:])
    return names


def _repair(root: str) -> None:
    p = subprocess.run(
        [sys.executable, "-m", "safechroma", "repair", root],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout + p.stderr


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)


# -- run inside the worker (cloudpickled by run_in_worker) -------------------------------------


def _upsert_while_the_journal_file_is_held(client: Any) -> None:
    """Hold the journal's file lock, start the upsert, give Chroma time to commit it, die.

    The record cannot be written while the lock is held: with the record written first,
    Chroma is never asked; with the record written beside Chroma's commit (the defect),
    Chroma commits and the journal never gets the record."""
    journal = client._server._safechroma_journal
    col = client.get_collection("unknown", embedding_function=None)
    journal._lock.acquire()

    def upsert() -> None:
        col.upsert(
            ids=["a", "t"], embeddings=np.vstack([_vec(1.0), _vec(2.0)]), documents=["a1", "t1"]
        )

    threading.Thread(target=upsert, daemon=True).start()
    time.sleep(2.0)
    os.kill(os.getpid(), signal.SIGKILL)


def _die_after_the_record(client: Any, what: str = "upsert") -> None:
    """Upsert (or drop the collection), with the worker killed the instant its record is in the
    journal (before Chroma is asked)."""
    journal = client._server._safechroma_journal
    put = journal._put

    def put_then_die(data: bytes, **kwargs: Any) -> None:
        put(data, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)

    journal._put = put_then_die
    if what == "drop":
        client.delete_collection("unknown")
    if what == "reset":
        client.reset()
    col = client.get_collection("unknown", embedding_function=None)
    col.upsert(ids=["a", "n"], embeddings=np.vstack([_vec(1.0), _vec(3.0)]), documents=["a1", "n1"])


def _die_in_a_transaction_after_the_record(client: Any) -> None:
    """Upsert, with the worker killed the instant its record is in the journal, inside a
    SQLite transaction on ``chroma.sqlite3`` that has already spilled pages to the file: a
    hot rollback journal is left, as when a worker dies inside Chroma's own commit."""
    import sqlite3

    journal = client._server._safechroma_journal
    put = journal._put
    db = os.path.join(journal.path, "chroma.sqlite3")

    def put_then_die(data: bytes, **kwargs: Any) -> None:
        put(data, **kwargs)
        con = sqlite3.connect(db, isolation_level=None)
        con.execute("PRAGMA cache_size=2")
        con.execute("BEGIN IMMEDIATE")
        con.execute("CREATE TABLE scratch (x BLOB)")
        for _ in range(64):
            con.execute("INSERT INTO scratch VALUES (randomblob(4000))")
        os.kill(os.getpid(), signal.SIGKILL)

    journal._put = put_then_die
    col = client.get_collection("unknown", embedding_function=None)
    col.upsert(ids=["a", "n"], embeddings=np.vstack([_vec(1.0), _vec(3.0)]), documents=["a1", "n1"])


def _reset_then_die(client: Any) -> None:
    """chromadb's ``reset()``, with the worker killed the instant Chroma has reset (before
    anything after Chroma's call runs)."""
    server = client._server

    class Bindings:
        def __init__(self, inner: Any) -> None:
            self._inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self._inner, name)

        def reset(self) -> Any:
            self._inner.reset()
            os.kill(os.getpid(), signal.SIGKILL)

    server.bindings = Bindings(server.bindings)
    client.reset()


def _drop_while_the_journal_file_is_held(client: Any) -> None:
    """The same for a collection's drop."""
    journal = client._server._safechroma_journal
    journal._lock.acquire()
    threading.Thread(target=lambda: client.delete_collection("unknown"), daemon=True).start()
    time.sleep(2.0)
    os.kill(os.getpid(), signal.SIGKILL)


# -- the tests ----------------------------------------------------------------------------------


def _start(d: str, **settings: Any) -> tuple[safechroma.SafeClient, Any]:
    from chromadb.config import Settings

    client = safechroma.SafeClient(d, standby=False, keep_warm=0, settings=Settings(**settings))
    col = client.create_collection("unknown", embedding_function=None)
    col.add(ids=["a", "t"], embeddings=np.vstack([_vec(0.0), _vec(0.5)]), documents=["a0", "t0"])
    col.delete(ids=["t"])  # "t" is a tombstone in the journal
    return client, col


def _kill_from_inside(client: safechroma.SafeClient, fn: Any, *args: Any) -> None:
    pid = client.stats().worker_pid
    assert pid is not None
    with pytest.raises(safechroma.WorkerError) as info:
        client.run_in_worker(fn, *args)
    assert info.value.signal == "SIGKILL"
    _wait_gone(pid)


def test_a_write_chroma_committed_is_never_missing_from_the_journal(tmp_path: Path) -> None:
    """Pins: a worker killed in a write leaves no write in Chroma that the journal lacks, so a
    repair never deletes again an id the write re-created (the soak's upsert applied to six of
    seven ids): the upsert of ``a`` and the tombstoned ``t`` is there whole or not at all."""
    d = str(tmp_path / "d")
    client, _col = _start(d)
    try:
        _kill_from_inside(client, _upsert_while_the_journal_file_is_held)
    finally:
        client.close()
    _repair(d)
    got = _read(d)
    states = {k: got[k][0] if k in got else None for k in ("a", "t")}
    assert states in ({"a": "a0", "t": None}, {"a": "a1", "t": "t1"}), states


def test_a_journaled_write_chroma_never_committed_is_voided(tmp_path: Path) -> None:
    """Pins: the record of a write the worker died in before Chroma committed it is voided
    (an ``abort`` after it) before anything else writes, so a repair does not write it back to
    the ids the directory lacks (``n`` without ``a``)."""
    d = str(tmp_path / "d")
    client, col = _start(d)
    try:
        _kill_from_inside(client, _die_after_the_record)
        assert col.count() == 1  # the next worker: the hook runner settled the record first
        # Before the close compacts the journal: the record is there, voided.
        ops = [(h["op"], h.get("ids")) for h, _ in jr.read_records(d)]
        assert ops[-2:] == [("upsert", ["a", "n"]), ("abort", None)], ops
    finally:
        client.close()
    _repair(d)
    got = _read(d)
    assert sorted(got) == ["a"] and got["a"][0] == "a0", got


def test_a_committed_write_of_a_killed_worker_is_kept(tmp_path: Path) -> None:
    """Pins the other side of the settle: the last write of a worker killed from outside after
    it replied is in Chroma's WAL, so its record is kept (marked ``settled``), and the repair
    leaves it as Chroma has it."""
    d = str(tmp_path / "d")
    client, col = _start(d)
    try:
        col.upsert(
            ids=["a", "n"], embeddings=np.vstack([_vec(1.0), _vec(3.0)]), documents=["a1", "n1"]
        )
        pid = client.stats().worker_pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        _wait_gone(pid)
        assert col.count() == 2
    finally:
        client.close()
    _repair(d)
    assert jr.settle(d) is None  # decided once
    (state,) = [c for c in jr.replay(d).values() if c.name == "unknown"]
    assert sorted(state.records) == ["a", "n"] and state.records["n"]["document"] == "n1"
    got = _read(d)
    assert {k: v[0] for k, v in got.items()} == {"a": "a1", "n": "n1"}
    assert got["n"][1] == [3.0] * DIM


def test_a_collection_chroma_dropped_stays_dropped_through_a_repair(tmp_path: Path) -> None:
    """Pins the same for a collection's drop: what the next call sees after the worker died in
    ``delete_collection`` (dropped or not) is what a repair leaves; a drop Chroma made and the
    journal lacked made the repair create the collection again, with its records."""
    d = str(tmp_path / "d")
    client, _col = _start(d)
    try:
        _kill_from_inside(client, _drop_while_the_journal_file_is_held)
        seen = sorted(getattr(c, "name", c) for c in client.list_collections())
    finally:
        client.close()
    _repair(d)
    assert _names(d) == seen


def test_a_journaled_drop_chroma_never_made_is_voided(tmp_path: Path) -> None:
    """Pins: a drop recorded in the journal that Chroma never made (the worker died between) is
    voided, so a repair keeps the collection and its records."""
    d = str(tmp_path / "d")
    client, col = _start(d)
    try:
        _kill_from_inside(client, _die_after_the_record, "drop")
        assert col.count() == 1  # Chroma was never asked
        ops = [h["op"] for h, _ in jr.read_records(d)]
        assert ops[-2:] == ["drop_collection", "abort"], ops
    finally:
        client.close()
    _repair(d)
    got = _read(d)
    assert sorted(got) == ["a"] and got["a"][0] == "a0", got


def test_a_reset_chroma_made_stays_made_through_a_repair(tmp_path: Path) -> None:
    """Pins: chromadb's ``reset()`` whose worker died right after Chroma reset is not undone by
    a repair: it was journaled before Chroma was asked (it used to be after, so a worker killed
    in between left every collection alive in the journal)."""
    d = str(tmp_path / "d")
    client, _col = _start(d, allow_reset=True)
    try:
        _kill_from_inside(client, _reset_then_die)
        seen = sorted(getattr(c, "name", c) for c in client.list_collections())
        ops = [h["op"] for h, _ in jr.read_records(d)]
    finally:
        client.close()
    assert seen == [] and ops[-2:] == ["reset", "settled"], ops
    _repair(d)
    assert _names(d) == []


def test_a_journaled_reset_chroma_never_made_is_voided(tmp_path: Path) -> None:
    """Pins: a ``reset()`` recorded in the journal that Chroma never made (the worker died
    between) is voided, so a repair keeps every collection and its records."""
    d = str(tmp_path / "d")
    client, col = _start(d, allow_reset=True)
    try:
        _kill_from_inside(client, _die_after_the_record, "reset")
        assert col.count() == 1  # Chroma was never asked
        ops = [h["op"] for h, _ in jr.read_records(d)]
        assert ops[-2:] == ["reset", "abort"], ops
    finally:
        client.close()
    _repair(d)
    got = _read(d)
    assert sorted(got) == ["a"] and got["a"][0] == "a0", got


def test_a_record_is_settled_past_a_hot_sqlite_journal(tmp_path: Path) -> None:
    """Pins: when the worker died inside a SQLite transaction (a hot ``chroma.sqlite3-journal``,
    which a read-only reader cannot get past), the record of its write is still settled before
    the next worker writes: the hot journal is played back first, as Chroma's open would."""
    d = str(tmp_path / "d")
    client, col = _start(d)
    try:
        _kill_from_inside(client, _die_in_a_transaction_after_the_record)
        from safechroma.storage.sqlite_pages import is_hot_journal

        assert is_hot_journal(os.path.join(d, "chroma.sqlite3-journal"))
        assert col.count() == 1
        ops = [(h["op"], h.get("ids")) for h, _ in jr.read_records(d)]
        assert ops[-2:] == [("upsert", ["a", "n"]), ("abort", None)], ops
    finally:
        client.close()
    _repair(d)
    got = _read(d)
    assert sorted(got) == ["a"] and got["a"][0] == "a0", got
