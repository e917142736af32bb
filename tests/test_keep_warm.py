"""Short commands join a warm worker; leaving hands the directory back to Chroma (issue 20).

Real programs in child processes that end without closing their clients, as CLI commands do.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time

from conftest import lock_is_free, run_plain_chromadb

from safechroma import SafeClient

SHORT = """
import json, os, sys
from safechroma import SafeClient
client = SafeClient(sys.argv[1], **json.loads(sys.argv[2]))  # never closed: the program ends
col = client.get_or_create_collection("cli", embedding_function=None)
if not col.count():
    col.add(ids=[str(i) for i in range(50)], embeddings=[[float(i), 1.0] for i in range(50)])
print(json.dumps({"worker": client.stats().worker_pid, "count": col.count()}))
"""


def _short(db: str, **options: object) -> dict:  # type: ignore[type-arg]
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SHORT), db, json.dumps(options)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def _purge_on(db: str) -> bool:
    con = sqlite3.connect(os.path.join(db, "chroma.sqlite3"))
    try:
        row = con.execute("SELECT config_json_str FROM embeddings_queue_config").fetchone()
    finally:
        con.close()
    return bool(json.loads(row[0])["automatically_purge"])


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_the_second_short_command_joins_the_warm_worker(db: str) -> None:
    first = _short(db)
    second = _short(db)
    assert second == {"worker": first["worker"], "count": 50}
    assert not lock_is_free(db)  # kept warm by default
    out = subprocess.run(
        [sys.executable, "-m", "safechroma", "release", db], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "purge is on again" in out.stdout
    assert lock_is_free(db)
    assert not _alive(first["worker"])
    assert _purge_on(db)


def test_a_warm_worker_leaves_by_itself_and_restores_chromas_purge(db: str) -> None:
    got = _short(db, keep_warm=3.0)  # this test is about the expiry: a short one
    assert _alive(got["worker"])  # still warm after the program ended
    give_up = time.monotonic() + 20  # 3 s, and a loaded machine's slack
    while _alive(got["worker"]) and time.monotonic() < give_up:
        time.sleep(0.05)
    assert not _alive(got["worker"])
    # The kernel drops a dying process's flock as its files are released, which can trail the
    # moment /proc shows it gone: seen free a few ms later, once in 20 runs at load 5, with no
    # process holding the file in between.
    while not lock_is_free(db) and time.monotonic() < give_up:
        time.sleep(0.01)
    assert lock_is_free(db)
    assert _purge_on(db)


def test_an_exclusive_client_and_a_repair_ask_an_idle_worker_to_leave(db: str) -> None:
    got = _short(db)
    start = time.monotonic()
    with SafeClient(db, exclusive=True, validator=None) as client:
        assert client.get_collection("cli").count() == 50
        assert client.stats().worker_pid != got["worker"]
    assert time.monotonic() - start < 5  # not the 10 s of keep_warm
    again = _short(db)
    out = subprocess.run(
        [sys.executable, "-m", "safechroma", "repair", db], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert not _alive(again["worker"])
    assert lock_is_free(db)


def test_a_worker_in_use_is_not_asked_away(db: str) -> None:
    with SafeClient(db, validator=None) as client:
        client.heartbeat()
        out = subprocess.run(
            [sys.executable, "-m", "safechroma", "release", db], capture_output=True, text=True
        )
        assert out.returncode == 2
        assert "in use by a running program" in out.stderr
        assert client.heartbeat() > 0


def test_plain_chromadb_after_safechroma_keeps_its_wal_bounded(db: str) -> None:
    """Pins issue 20: a directory safechroma had opened kept Chroma's purge off, and plain
    chromadb then grew its WAL without bound (4,941 rows for 1,413 records)."""
    with SafeClient(db, validator=None) as client:
        col = client.create_collection("wal", embedding_function=None)
        col.add(ids=[f"s{i}" for i in range(200)], embeddings=[[float(i), 0.5] for i in range(200)])
    rows = run_plain_chromadb(
        """
        import sqlite3
        col = chromadb.PersistentClient(path).get_collection("wal", embedding_function=None)
        for batch in range(6):
            col.upsert(ids=[f"s{i}" for i in range(200)],
                       embeddings=[[float(i + batch), 0.5] for i in range(200)])
            col.add(ids=[f"p{batch}-{i}" for i in range(300)],
                    embeddings=[[float(i), float(batch)] for i in range(300)])
        print(col.count())
        con = sqlite3.connect(path + "/chroma.sqlite3")
        print(con.execute("SELECT count(*) FROM embeddings_queue").fetchone()[0])
        """,
        db,
    ).split()
    count, wal_rows = int(rows[0]), int(rows[1])
    assert count == 2000
    # 3,400 writes went through the WAL; Chroma's own purge keeps what its index has not
    # flushed (under its sync threshold of 1,000), not the whole history.
    assert wal_rows < 1200, wal_rows
