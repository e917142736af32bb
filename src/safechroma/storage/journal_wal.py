"""Whether Chroma committed a given write (its WAL rows) or a collection's drop: how the write
journal settles its one uncertain record (:func:`safechroma.storage.journal.settle`).

It reads ``chroma.sqlite3`` read-only with the standard ``sqlite3`` module; it never imports
Chroma, and nothing of safechroma above the storage floor.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Sequence

import numpy as np

from safechroma.storage.layout import _ro
from safechroma.storage.sqlite_pages import is_hot_journal

__all__ = ["CHROMA_OPS", "chroma_dropped", "chroma_logged", "roll_back_if_hot"]

# chromadb's operation codes in ``embeddings_queue`` (its WAL).
CHROMA_OPS = {"add": 0, "update": 1, "upsert": 2, "delete": 3}


def roll_back_if_hot(root: str) -> bool:
    """Play back a hot ``chroma.sqlite3-journal`` (a worker killed inside a transaction), as
    Chroma's next open would, so that a read-only reader can read the file; True if there was
    one. The caller must own the directory. (``safechroma repair`` backs the pair up first:
    :func:`safechroma.storage.recovery.roll_back_hot_journal`.)"""
    db = os.path.join(root, "chroma.sqlite3")
    if not os.path.isfile(db) or not is_hot_journal(db + "-journal"):
        return False
    try:
        con = sqlite3.connect(db, timeout=5.0)
        try:
            con.execute("SELECT count(*) FROM sqlite_master").fetchone()
        finally:
            con.close()
    except sqlite3.Error:
        return False
    return True


def chroma_logged(
    root: str,
    cid: str,
    op: str,
    ids: list[str],
    documents: Sequence[str | None] | None,
    vectors: np.ndarray | None,
) -> bool | None:
    """Whether the newest rows of collection ``cid`` in Chroma's WAL are this write: its ids in
    order, its operation, and its vectors and documents where it has them (None: the WAL could
    not be read). Chroma logs a write as one row per id, in one transaction, after every
    earlier write, so for the last write anyone made this says whether Chroma committed it.
    """
    db = os.path.join(root, "chroma.sqlite3")
    if not os.path.isfile(db):
        return None
    try:
        con = _ro(db)
        try:
            rows = con.execute(
                "SELECT id, operation, vector, encoding, metadata FROM embeddings_queue "
                "WHERE topic LIKE ? ORDER BY seq_id DESC LIMIT ?",
                ("%/" + cid, len(ids)),
            ).fetchall()
        finally:
            con.close()
    except sqlite3.Error:
        return None  # e.g. a hot rollback journal, which the check backs up first
    rows.reverse()
    if [str(r[0]) for r in rows] != ids or any(r[1] != CHROMA_OPS[op] for r in rows):
        return False
    for k, (_i, _op, blob, encoding, meta) in enumerate(rows):
        if vectors is not None and op != "delete":
            if blob is None:
                return False
            if (encoding or "FLOAT32").upper() == "FLOAT32" and not np.array_equal(
                np.frombuffer(blob, dtype="<f4"), np.asarray(vectors[k], dtype="<f4")
            ):
                return False
        if documents is not None and documents[k] is not None:
            try:
                logged = json.loads(meta).get("chroma:document") if meta else None
            except (ValueError, AttributeError):
                logged = None
            if logged != documents[k]:
                return False
    return True


def chroma_dropped(root: str, cid: str | None) -> bool | None:
    """Whether collection ``cid`` is gone from ``chroma.sqlite3``; with ``cid`` None, whether
    every collection is (chromadb's ``reset()``). None: unreadable."""
    db = os.path.join(root, "chroma.sqlite3")
    if not os.path.isfile(db):
        return None
    query, args = (
        ("SELECT 1 FROM collections LIMIT 1", ())
        if cid is None
        else ("SELECT 1 FROM collections WHERE id = ?", (cid,))
    )
    try:
        con = _ro(db)
        try:
            row = con.execute(query, args).fetchone()
        finally:
            con.close()
    except sqlite3.Error:
        return None
    return row is None
