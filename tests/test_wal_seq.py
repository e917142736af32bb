"""WAL compaction must never let SQLite reuse a sequence id (a data-loss regression).

``embeddings_queue.seq_id`` is an ``INTEGER PRIMARY KEY`` without ``AUTOINCREMENT``: SQLite gives
the next row ``max(seq_id) + 1``. When compaction deleted the newest row (a delete of ids that
are gone, say), the next write got a seq_id at or below the segments' ``max_seq_id``, and Chroma
skipped it as already applied: an acknowledged upsert vanished and a later delete was lost,
resurrecting records (found by a kill stress with the compacting WAL, 0 recoveries involved).
Each step runs plain chromadb in a child process, so this process never opens Chroma.
"""

from __future__ import annotations

import sqlite3

import pytest
from conftest import run_plain_chromadb

from safechroma.storage import wal

SETUP = """
    chromadb.PersistentClient(path).create_collection(
        "seqs", embedding_function=None,
        configuration={"hnsw": {"sync_threshold": 10, "batch_size": 10}})
"""

WRITES = """
    col = chromadb.PersistentClient(path).get_collection("seqs", embedding_function=None)
    col.count()
    ids = [f"id{i}" for i in range(10)]
    for round_ in range(12):  # 120 rows for 10 ids: worth compacting
        col.upsert(ids=ids, embeddings=[[float(round_), float(i)] for i in range(10)])
    col.delete(ids=ids)  # the newest row: a delete of ids that are then gone
"""

AFTER = """
    col = chromadb.PersistentClient(path).get_collection("seqs", embedding_function=None)
    col.count()
    col.upsert(ids=["new"], embeddings=[[7.0, 7.0]], documents=["acknowledged"])
    col.upsert(ids=["id3"], embeddings=[[8.0, 8.0]], documents=["back"])
    col.delete(ids=["id3"])
    print(sorted(col.get()["ids"]), col.get(ids=["new"])["documents"])
"""


def _newest_seq(path: str) -> int:
    con = sqlite3.connect(f"file:{path}/chroma.sqlite3?mode=ro", uri=True)
    try:
        (newest,) = con.execute("SELECT max(seq_id) FROM embeddings_queue").fetchone()
        return int(newest or 0)
    finally:
        con.close()


@pytest.mark.slow
def test_compaction_keeps_the_newest_row_so_later_writes_are_applied(db: str) -> None:
    """Pins the seq-id reuse: after compaction, writes are applied and the newest seq_id
    never goes down."""
    run_plain_chromadb(SETUP, db)
    wal.take_over(db)  # before any write: purge off, the collection's WAL is complete
    run_plain_chromadb(WRITES, db)
    newest = _newest_seq(db)
    report = wal.compact_wal(db)
    assert report.rows_after < report.rows_before  # it really compacted
    assert _newest_seq(db) == newest
    out = run_plain_chromadb(AFTER, db)
    assert out == "['new'] ['acknowledged']"
