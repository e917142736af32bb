"""WAL retention: a second copy of every acknowledged vector, bounded by the live records.

chromadb 1.5.9 purges its WAL (``embeddings_queue``) below the smaller of the two segments'
``max_seq_id`` after each write (FACTS §2), so once the index has flushed a record, the HNSW
files are its vector's only copy: one damaged file loses it (issue 12: 5 of the 35 battery
cases, and the soak's torn flushes). For directories safechroma manages this module takes the
retention over:

* :func:`take_over` (the worker, right after it opens the directory, before any write): Chroma's
  purge off. From then on every write stays in the WAL.
* :func:`compact_wal` (the supervisor, while no worker has the directory open: at a process's
  first worker start and at close, not on a respawn after a crash): rows that Chroma would
  have purged (at or below the purge watermark) are replaced by one row per live id, an
  ``UPSERT`` with its current vector, at the sequence id of the last write the metadata
  segment applied to it. Rows above the watermark (the ones Chroma replays on open) are never
  touched. A rebuild from the WAL (Chroma replays it into an index whose directory is gone)
  then restores every record exactly, and the kept WAL
  is bounded by the live records, not by the write history.

Modes, per directory, in ``<path>/.safechroma/wal.json`` (:func:`set_wal_retention`):
``"compact"`` (the default), ``"full"`` (:func:`safechroma.keep_full_wal`: purge off, nothing
compacted, the whole history kept) and ``"chroma"`` (Chroma's own purge: no second copy).

A collection's WAL is replayed from its start only when it is known complete: safechroma saw
it before its index ever flushed (nothing had been purged). For a collection adopted with a
purged history an ``add`` of an id whose creation was purged would look like a creation, so
there each id is summarised only from its last ``upsert`` or ``delete`` (writes that do not
depend on the state before them); ids without one keep their rows. Records last written
before the adoption have no second copy (their vectors are only in the index files).

This module reads and writes ``chroma.sqlite3`` with the standard ``sqlite3`` module only; it
never imports Chroma.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from safechroma.storage.layout import SQLITE_FILE, _seq
from safechroma.storage.layout import STATE_DIR as STATE_DIR  # rendezvous reads it here

__all__ = [
    "CompactReport",
    "compact_wal",
    "maintain",
    "release",
    "retention_mode",
    "set_wal_retention",
    "take_over",
    "wal_bytes",
]

Mode = Literal["compact", "full", "chroma"]
MODES: tuple[str, ...] = ("compact", "full", "chroma")
STATE_FILE = "wal.json"
_VECTOR = "urn:chroma:segment/vector/hnsw-local-persisted"
_METADATA = "urn:chroma:segment/metadata/sqlite"
# chromadb's operation codes in embeddings_queue.operation.
_ADD, _UPDATE, _UPSERT, _DELETE = 0, 1, 2, 3


@dataclass
class CompactReport:
    """What :func:`compact_wal` did.

    Attributes:
        path: The persist directory.
        mode: The directory's retention mode.
        rows_before: WAL rows before.
        rows_after: WAL rows after.
        bytes_before: Bytes of vectors, ids and metadata held by WAL rows before.
        bytes_after: The same after.
        collections: Per collection id: ``"compacted"``, ``"nothing to do"`` or why not.
        elapsed_s: Wall time.
    """

    path: str
    mode: str = "compact"
    rows_before: int = 0
    rows_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    collections: dict[str, str] = field(default_factory=dict)
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict."""
        return asdict(self)


def _state_path(root: str) -> str:
    return os.path.join(root, STATE_DIR, STATE_FILE)


def _load_state(root: str) -> dict[str, Any]:
    try:
        with open(_state_path(root), "rb") as f:
            state = json.loads(f.read())
        return state if isinstance(state, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_state(root: str, state: dict[str, Any]) -> None:
    dest = _state_path(root)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = dest + ".partial"
    with open(tmp, "w") as f:
        json.dump(state, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, dest)


def retention_mode(path: str | os.PathLike[str]) -> str:
    """The directory's retention mode: ``"compact"`` unless :func:`set_wal_retention` chose."""
    mode = _load_state(os.fspath(path)).get("mode")
    return mode if mode in MODES else "compact"


def _set_purge(db: str, purge: bool) -> None:
    con = sqlite3.connect(db, timeout=10.0)
    try:
        row = con.execute("SELECT config_json_str FROM embeddings_queue_config LIMIT 1").fetchone()
        if row is not None and json.loads(row[0]).get("automatically_purge") is purge:
            return
        with con:
            con.execute(
                "INSERT OR REPLACE INTO embeddings_queue_config (id, config_json_str) VALUES "
                "(1, ?)",
                (
                    json.dumps(
                        {
                            "automatically_purge": purge,
                            "_type": "EmbeddingsQueueConfigurationInternal",
                        }
                    ),
                ),
            )
    finally:
        con.close()


def set_wal_retention(path: str | os.PathLike[str], mode: str) -> dict[str, Any]:
    """Choose how the WAL of ``path`` is kept; call it while no process has it open.

    Args:
        path: The persist directory (``chroma.sqlite3`` is updated when it exists).
        mode: ``"compact"`` (default: a second copy of every live vector, bounded by the live
            records), ``"full"`` (every write kept forever) or ``"chroma"`` (Chroma's purge: the
            index files hold the only copy of flushed vectors).

    Returns:
        ``{"path", "mode", "previous"}``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    root = os.fspath(path)
    previous = retention_mode(root)
    state = _load_state(root)
    state["mode"] = mode
    _save_state(root, state)
    db = os.path.join(root, SQLITE_FILE)
    if os.path.isfile(db):
        _set_purge(db, mode == "chroma")
    return {"path": root, "mode": mode, "previous": previous}


def take_over(path: str | os.PathLike[str]) -> None:
    """Switch Chroma's WAL purge off for a managed directory (a no-op in mode ``"chroma"``).

    Called by the worker right after it opened the directory and before it writes (Chroma
    reads ``embeddings_queue_config`` on every call, FACTS §3). Also notes which collections
    have a complete WAL (never flushed yet, so nothing was purged). Never raises.
    """
    root = os.fspath(path)
    if retention_mode(root) == "chroma":
        return
    db = os.path.join(root, SQLITE_FILE)
    if not os.path.isfile(db):
        return
    try:
        _note_complete(root, db)
        _set_purge(db, False)
    except (OSError, ValueError, sqlite3.Error):
        # Never stop a worker from opening: the check and recovery deal with a bad database,
        # and the next open tries again.
        return


def release(path: str | os.PathLike[str]) -> bool:
    """Hand the WAL back to Chroma's own purge when safechroma stops using ``path``.

    Called by the last safechroma process (or the last worker) when it leaves the directory:
    a directory that plain chromadb uses next then purges its WAL as Chroma always does,
    instead of growing it without bound (measured before this: 4,941 rows for 1,413
    records). The next safechroma worker turns the purge off again before its first call
    (:func:`take_over`). Mode ``"full"`` keeps it off: the user asked for the whole history.
    Never raises. Returns whether the purge is on now.
    """
    root = os.fspath(path)
    if retention_mode(root) == "full":
        return False
    db = os.path.join(root, SQLITE_FILE)
    if not os.path.isfile(db):
        return False
    try:
        _set_purge(db, True)
    except (OSError, ValueError, sqlite3.Error):
        return False
    return True


def _note_complete(root: str, db: str) -> dict[str, Any]:
    """Record collections whose WAL is complete: first seen before any flush, or before any
    purge (purge was off since their creation)."""
    state = _load_state(root)
    known: dict[str, str] = dict(state.get("collections") or {})
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10.0)
    try:
        purge_row = con.execute("SELECT config_json_str FROM embeddings_queue_config").fetchone()
        purge_on = purge_row is None or bool(json.loads(purge_row[0]).get("automatically_purge"))
        flushed = {
            r[0]
            for r in con.execute(
                "SELECT s.collection FROM segments s JOIN max_seq_id m ON m.segment_id = s.id "
                "WHERE s.type = ? AND m.seq_id > 0",
                (_VECTOR,),
            )
        }
        cols = [r[0] for r in con.execute("SELECT id FROM collections")]
    finally:
        con.close()
    changed = False
    for cid in cols:
        if cid in known:
            continue
        # Flushed while Chroma purged: the rows below its watermark are gone.
        known[cid] = "adopted" if (cid in flushed and purge_on) else "complete"
        changed = True
    for cid in list(known):
        if cid not in cols:
            del known[cid]
            changed = True
    if changed:
        state["collections"] = known
        _save_state(root, state)
    return state


def wal_bytes(path: str | os.PathLike[str]) -> tuple[int, int]:
    """``(rows, bytes)`` held by the WAL: vectors, ids and metadata of every row."""
    db = os.path.join(os.fspath(path), SQLITE_FILE)
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10.0)
    try:
        n, b = con.execute(
            "SELECT count(*), coalesce(sum(coalesce(length(vector), 0) + length(id) + "
            "coalesce(length(metadata), 0) + length(topic)), 0) FROM embeddings_queue"
        ).fetchone()
    finally:
        con.close()
    return int(n), int(b)


def compact_wal(path: str | os.PathLike[str], *, vacuum: bool = False) -> CompactReport:
    """Compact the kept WAL of ``path`` to one row per live id below the purge watermark.

    The caller must own the directory (hold its lock; no Chroma process has it open). Per
    collection with a complete WAL: the rows at or below ``min(max_seq_id)`` of its two segments
    (what Chroma would purge) are replayed with Chroma's rules (``add`` of a present id and
    ``update`` of an absent one are ignored, FACTS §3); for every id present at the watermark
    one row is kept, as an ``UPSERT`` carrying its vector, at the sequence id of the last write
    the metadata segment applied to it; the others are deleted, in one transaction. The replay
    must agree with the metadata segment (every live id whose last write is at or below the
    watermark is present in the replay with that last write); otherwise the collection is left
    as it is. A collection adopted with a purged history is summarised per id from its last
    ``upsert`` or ``delete`` only (see the module docstring).

    SQLite keeps the pages the compaction frees and reuses them for later writes, so the file
    stays at its high-water mark (the live rows plus one session's writes).

    Args:
        path: The persist directory.
        vacuum: Then run ``VACUUM`` to give the freed pages back (it rewrites the whole file:
            seconds per GB; not done by :func:`maintain`).

    Returns:
        A :class:`CompactReport`.
    """
    t0 = time.perf_counter()
    root = os.fspath(path)
    out = CompactReport(path=root, mode=retention_mode(root))
    db = os.path.join(root, SQLITE_FILE)
    if not os.path.isfile(db):
        return out
    out.rows_before, out.bytes_before = wal_bytes(root)
    if out.mode != "compact":
        out.rows_after, out.bytes_after = out.rows_before, out.bytes_before
        out.elapsed_s = time.perf_counter() - t0
        return out
    state = _note_complete(root, db)
    status: dict[str, str] = state.get("collections") or {}
    con = sqlite3.connect(db, timeout=10.0, isolation_level=None)
    try:
        segs: dict[str, dict[str, str]] = {}
        for sid, typ, cid in con.execute("SELECT id, type, collection FROM segments"):
            segs.setdefault(cid, {})[typ] = sid
        marks = {r[0]: _seq(r[1]) for r in con.execute("SELECT segment_id, seq_id FROM max_seq_id")}
        for cid, kinds in sorted(segs.items()):
            vseg, mseg = kinds.get(_VECTOR), kinds.get(_METADATA)
            if not vseg or not mseg:
                continue
            mark = min(marks.get(vseg, 0), marks.get(mseg, 0))
            complete = status.get(cid) == "complete"
            out.collections[cid] = _compact_one(con, cid, mseg, mark, complete)
        if vacuum:
            con.execute("VACUUM")
    finally:
        con.close()
    out.rows_after, out.bytes_after = wal_bytes(root)
    out.elapsed_s = time.perf_counter() - t0
    return out


def _compact_one(con: sqlite3.Connection, cid: str, mseg: str, mark: int, complete: bool) -> str:
    """Compact one collection's rows at or below ``mark`` (see :func:`compact_wal`)."""
    if mark <= 0:
        return "nothing to do"
    (n_rows,) = con.execute(
        "SELECT count(*) FROM embeddings_queue WHERE topic LIKE ? AND seq_id <= ?",
        ("%/" + cid, mark),
    ).fetchone()
    (n_live,) = con.execute(
        "SELECT count(*) FROM embeddings WHERE segment_id = ?", (mseg,)
    ).fetchone()
    if n_rows <= n_live + max(64, n_live // 10):
        # Already about one row per live id: a worker start after a crash stays fast.
        return "nothing to do"
    rows = con.execute(
        "SELECT seq_id, operation, id, vector, encoding FROM embeddings_queue "
        "WHERE topic LIKE ? AND seq_id <= ? ORDER BY seq_id",
        ("%/" + cid, mark),
    ).fetchall()
    if not rows:
        return "nothing to do"
    op_of: dict[int, tuple[int, bytes | None, str | None]] = {}
    by_id: dict[str, list[int]] = {}
    for seq, op, ident, vec, enc in rows:
        seq = _seq(seq)
        op_of[seq] = (int(op), vec, enc)
        by_id.setdefault(ident, []).append(seq)
    live = {
        ident: _seq(sq)
        for ident, sq in con.execute(
            "SELECT embedding_id, seq_id FROM embeddings WHERE segment_id = ?", (mseg,)
        )
    }
    keep_as: dict[int, int] = {}  # kept row -> row whose vector it must carry
    drop: list[int] = []
    for ident, seqs in by_id.items():
        start = 0
        if not complete:
            # A purged history: replay only from the last write that does not depend on the
            # state before it (an upsert or a delete); keep everything of ids without one.
            free = [k for k, s in enumerate(seqs) if op_of[s][0] in (_UPSERT, _DELETE)]
            if not free:
                continue
            start = free[-1]
        present = False
        applied: int | None = None
        vec_row: int | None = None
        for s in seqs[start:]:
            op, vec, _enc = op_of[s]
            if op == _ADD:
                if present or vec is None:
                    continue
                present, applied, vec_row = True, s, s
            elif op == _UPSERT:
                if vec is None:
                    continue
                present, applied, vec_row = True, s, s
            elif op == _UPDATE:
                if not present:
                    continue
                applied = s
                if vec is not None:
                    vec_row = s
            elif op == _DELETE:
                present, applied, vec_row = False, s, None
        cur = live.get(ident)
        if cur is not None and cur <= mark and (not present or applied != cur):
            # The replay disagrees with the metadata segment: the model is wrong for this id.
            if complete:
                return f"kept: the WAL replay disagrees with the metadata segment on {ident!r}"
            continue
        for s in seqs:
            # An id that is gone now needs no row: any replay of it ends deleted.
            if present and s == applied and cur is not None:
                assert vec_row is not None
                keep_as[s] = vec_row
            else:
                drop.append(s)
    con.execute("BEGIN IMMEDIATE")
    try:
        # Never delete the table's newest row. ``seq_id`` is an INTEGER PRIMARY KEY without
        # AUTOINCREMENT, so SQLite numbers the next row max(seq_id) + 1: deleting the newest
        # row would hand the next write a seq_id at or below the segments' max_seq_id, which
        # Chroma's apply skips as already seen, silently losing an acknowledged write (and
        # resurrecting what a lost delete should have removed). Every row kept here is at or
        # below the watermark, so Chroma never applies it again.
        (newest,) = con.execute("SELECT max(seq_id) FROM embeddings_queue").fetchone()
        drop = [s for s in drop if s != _seq(newest)]
        for s, v in keep_as.items():
            op, _vec, _enc = op_of[s]
            if op in (_ADD, _UPSERT) and v == s:
                continue
            _op, vec, enc = op_of[v]
            con.execute(
                "UPDATE embeddings_queue SET operation = ?, vector = ?, encoding = ? "
                "WHERE seq_id = ?",
                (_UPSERT, vec, enc, s),
            )
        con.executemany("DELETE FROM embeddings_queue WHERE seq_id = ?", [(s,) for s in drop])
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    return f"compacted: {len(rows)} rows at or below seq {mark} -> {len(rows) - len(drop)}"


def maintain(path: str | os.PathLike[str]) -> CompactReport | None:
    """The supervisor's hook, while no worker has ``path`` open: compact the kept WAL.

    Never raises: retention is a second copy, and failing to compact must not stop a worker
    from starting (the next start tries again).
    """
    from safechroma.storage.schema import written_by_newer

    try:  # issue 21: the write journal is compacted alongside (storage/journal.py)
        from safechroma.storage.journal import compact as compact_journal

        compact_journal(path)
    except Exception:  # noqa: BLE001 - a second copy: the next start tries again
        pass
    try:
        if written_by_newer(path):
            return None  # a newer chromadb's directory is never written (chroma#5909)
        return compact_wal(path)
    except Exception:  # noqa: BLE001 - see the docstring; the WAL is left as it was
        return None
