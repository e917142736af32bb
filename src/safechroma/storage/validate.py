"""Check a Chroma persist directory without importing or opening Chroma.

The files are untrusted: a validator that crashed on them would defeat its purpose, so this
module reads SQLite through the standard ``sqlite3`` module in read-only mode and the HNSW files
through :mod:`safechroma.storage.hnsw` (pure Python). It never writes.

Verdicts:

* ``"healthy"``: nothing that makes Chroma crash or lose data.
* ``"damaged"``: at least one finding of severity ``"error"``; each says what and where.
* ``"unknown"``: the check could not finish (missing database, SQLite locked or busy, time
  limit). A lock is never corruption (issue 4): a busy database is ``"unknown"``.
* ``"incompatible"``: written by a newer chromadb (its schema has migrations the installed
  chromadb does not know, issue 13 / chroma#5909). Not damage: nothing may repair it, and the
  installed chromadb must not open it (1.5.9 opens it without a word and writes into a schema
  it does not know). :attr:`DirectoryReport.incompatibility` names both versions.

Zero false positives is the design rule: every healthy shape of FACTS §1 passes, and the
verdict can trigger recovery.
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
from collections.abc import Callable
from typing import Any

from safechroma._errors import IncompatibleDirectoryError
from safechroma.storage.check_report import CollectionReport, DirectoryReport
from safechroma.storage.hnsw import Finding, check_segment
from safechroma.storage.hnsw.check import _check_segment_keep_metadata
from safechroma.storage.layout import SQLITE_FILE
from safechroma.storage.schema import compare_schema
from safechroma.storage.sqlite_catalog import (
    _classify,
    _connect_ro,
    _parse_config,
    _read_catalog,
    _read_purge,
    _SqliteUnavailable,
)
from safechroma.storage.validate_replay import _check_replay, _wal_uncovered

__all__ = [
    "CollectionReport",
    "DirectoryReport",
    "Finding",
    "check_directory",
    "incompatible_error",
    "IGNORED_ENTRIES",
]


# Entries safechroma itself keeps in the persist directory (the core's lock file, our backups,
# quarantine and logs); they are not Chroma's and are never inspected.
IGNORED_ENTRIES = frozenset({".safechroma.lock", ".safechroma"})
_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def check_directory(
    path: str | os.PathLike[str],
    *,
    deep: bool = True,
    wal_coverage: bool = False,
    busy_timeout: float = 2.0,
    sqlite_time_limit: float = 60.0,
    progress: Callable[[str, dict[str, Any]], None] | None = None,
) -> DirectoryReport:
    """Check a Chroma persist directory; never raises for bad contents, never writes.

    Args:
        path: The persist directory (what ``chromadb.PersistentClient(path)`` was given).
        deep: Walk every HNSW file fully, run ``PRAGMA quick_check`` and compare the index
            with SQLite. Without it: headers, sizes, pickles and the SQLite schema only.
        wal_coverage: Also count, for every collection, the live records the WAL could not
            rebuild. Always done for a damaged or missing index.
        busy_timeout: Seconds to wait for a SQLite lock before reporting "busy".
        sqlite_time_limit: Upper bound on ``quick_check``; past it the SQLite verdict is
            "unknown" (a slow disk is not corruption).
        progress: Called as ``progress(step, details)``: ``("sqlite", {})`` before the
            SQLite check, ``("collections", {"total": n})`` once the catalog is read, then
            ``("collection", {"name", "records", "done", "total"})`` after each one.

    Returns:
        A :class:`DirectoryReport`.
    """
    t0 = time.perf_counter()
    root = os.fspath(path)
    rep = DirectoryReport(path=root)
    if not os.path.isdir(root):
        rep.findings.append(Finding("no_directory", f"{root} is not a directory", root, "warning"))
        rep.sqlite_status = "missing"
        rep.status = "unknown"
        return rep
    db = os.path.join(root, SQLITE_FILE)
    if not os.path.isfile(db):
        rep.findings.append(
            Finding("no_sqlite", f"{SQLITE_FILE} not found: not a Chroma directory", db, "warning")
        )
        rep.sqlite_status = "missing"
        rep.status = "unknown"
        return rep

    try:
        _check_with_sqlite(rep, db, deep, wal_coverage, busy_timeout, sqlite_time_limit, progress)
    except _SqliteUnavailable as e:
        rep.sqlite_status = e.status
        rep.findings.append(e.finding)
        rep.collections = []
        _check_orphan_segments(rep, root, known=set(), deep=deep)
    _finish(rep)
    rep.elapsed_s = time.perf_counter() - t0
    return rep


def _finish(rep: DirectoryReport) -> None:
    if rep.sqlite_status == "incompatible":
        rep.status = "incompatible"
        return
    for c in rep.collections:
        c.findings.sort(key=lambda f: {"error": 0, "warning": 1, "info": 2}[f.severity])
        if any(f.severity == "error" for f in c.findings):
            c.status = "damaged"
    errors = any(f.severity == "error" for f in rep.findings) or any(
        c.status == "damaged" for c in rep.collections
    )
    if errors:
        rep.status = "damaged"
    elif rep.sqlite_status != "ok" or any(c.status == "unknown" for c in rep.collections):
        rep.status = "unknown"
    else:
        rep.status = "healthy"


def _check_orphan_segments(rep: DirectoryReport, root: str, known: set[str], deep: bool) -> None:
    """Segment-shaped directories that SQLite does not list (or SQLite is unreadable)."""
    try:
        entries = sorted(os.listdir(root))
    except OSError:
        return
    for name in entries:
        if name in IGNORED_ENTRIES or name in known or not _UUID_RE.match(name):
            continue
        full = os.path.join(root, name)
        if not os.path.isdir(full):
            continue
        if rep.sqlite_status == "ok":
            # Chroma leaves a deleted collection's directory behind; it is never loaded.
            rep.findings.append(
                Finding(
                    "orphan_segment",
                    f"{name} is not a segment of any collection; Chroma ignores it",
                    full,
                    "info",
                )
            )
            continue
        seg = check_segment(full, deep=deep)
        c = CollectionReport(id="?", segment_id=name, segment_path=full, hnsw=seg, status="unknown")
        c.findings.extend(seg.findings)
        rep.collections.append(c)


def _check_with_sqlite(
    rep: DirectoryReport,
    db: str,
    deep: bool,
    wal_coverage: bool,
    busy_timeout: float,
    time_limit: float,
    progress: Callable[[str, dict[str, Any]], None] | None = None,
) -> None:
    root = rep.path
    note = progress or (lambda step, details: None)
    try:
        con = _connect_ro(db, busy_timeout)
    except sqlite3.Error as e:
        raise _classify(e, db) from None
    try:
        con.row_factory = sqlite3.Row
        try:
            if _check_schema_version(rep, con, db):
                return
            rows = _read_catalog(con)
        except sqlite3.Error as e:
            raise _classify(e, db) from None
        if deep:
            note("sqlite", {})
            _quick_check(rep, con, db, time_limit)
        try:
            rep.wal_purge = _read_purge(con)
        except sqlite3.Error:
            rep.wal_purge = None
        known: set[str] = set()
        note("collections", {"total": len(rows)})
        for row in rows:
            c = _collection_report(root, row)
            if c.segment_id:
                known.add(c.segment_id)
            try:
                _check_collection(c, con, deep, wal_coverage)
            except sqlite3.Error as e:
                u = _classify(e, db)
                c.findings.append(u.finding)
                if u.status != "corrupt":
                    c.status = "unknown"
            except Exception as e:  # noqa: BLE001 - a validator bug is not damage: say "unknown"
                c.findings.append(
                    Finding(
                        "check_error",
                        f"validator failed: {type(e).__name__}: {e}",
                        c.segment_path,
                        "warning",
                    )
                )
                c.status = "unknown"
            rep.collections.append(c)
            note(
                "collection",
                {
                    "name": c.name,
                    "records": c.records,
                    "done": len(rep.collections),
                    "total": len(rows),
                },
            )
        _check_orphan_segments(rep, root, known, deep)
    finally:
        con.close()


def _check_schema_version(rep: DirectoryReport, con: sqlite3.Connection, db: str) -> bool:
    """Stop the check (``True``) when a newer chromadb wrote the directory (issue 13, #5909).

    The catalog of a newer schema may not mean what this module expects, so nothing else is
    read: the verdict is ``"incompatible"``, which is not damage (no repair may run).
    """
    try:
        sv = compare_schema(con)
    except sqlite3.Error as e:
        raise _classify(e, db) from None
    if sv is None:
        return False
    if not sv.checked:
        rep.findings.append(
            Finding(
                "schema_unchecked",
                "the installed chromadb's migrations could not be read; schema version not "
                "compared",
                db,
                "info",
            )
        )
        return False
    if not sv.newer:
        return False
    rep.sqlite_status = "incompatible"
    rep.incompatibility = {"path": rep.path, **sv.to_dict()}
    rep.findings.append(Finding("schema_newer", f"{rep.path} was {sv.describe()}", db, "warning"))
    return True


def incompatible_error(report: Any) -> IncompatibleDirectoryError:
    """The :class:`~safechroma.IncompatibleDirectoryError` for an ``"incompatible"`` report."""
    info = dict(getattr(report, "incompatibility", None) or {})
    path = str(getattr(report, "path", info.get("path", "?")))
    msg = next(
        (f.message for f in getattr(report, "findings", []) if f.code == "schema_newer"),
        f"{path} was written by a newer chromadb",
    )
    return IncompatibleDirectoryError(
        msg,
        path=path,
        installed_version=info.get("installed_chromadb"),
        directory_schema=info.get("directory_schema", {}),
        unknown_migrations=info.get("unknown_migrations", []),
    )


def _quick_check(rep: DirectoryReport, con: sqlite3.Connection, db: str, limit: float) -> None:
    deadline = time.monotonic() + limit
    con.set_progress_handler(lambda: int(time.monotonic() > deadline), 10000)
    try:
        res = [r[0] for r in con.execute("PRAGMA quick_check(20)")]
    except sqlite3.OperationalError as e:
        if "interrupted" in str(e).lower():
            rep.sqlite_status = "unknown"
            rep.findings.append(
                Finding(
                    "sqlite_check_timeout",
                    f"quick_check did not finish in {limit:.0f} s; SQLite integrity unknown",
                    db,
                    "warning",
                )
            )
            return
        raise
    except sqlite3.DatabaseError as e:
        res = [str(e)]
    finally:
        con.set_progress_handler(None, 0)
    if res != ["ok"]:
        rep.sqlite_status = "corrupt"
        rep.findings.append(Finding("sqlite_corrupt", "quick_check: " + "; ".join(res[:5]), db))


def _collection_report(root: str, row: dict[str, Any]) -> CollectionReport:
    space, m = _parse_config(row, row["_meta"])
    seg = row["_vector"]
    c = CollectionReport(
        id=row["id"],
        name=row["name"],
        space=space,
        dimension=row.get("dimension"),
        max_neighbors=m,
        segment_id=seg,
        segment_path=os.path.join(root, seg) if seg else None,
        metadata_segment_id=row["_metadata"],
        index_max_seq_id=row["_seqs"].get(seg, 0),
        metadata_max_seq_id=row["_seqs"].get(row["_metadata"]),
    )
    c.__dict__["_topic"], c.wal_rows, c.wal_min_seq_id = row["_wal"]
    return c


def _check_collection(
    c: CollectionReport, con: sqlite3.Connection, deep: bool, wal_coverage: bool
) -> None:
    topic: str = c.__dict__.pop("_topic")
    add = c.findings.append
    if c.segment_id is None or c.segment_path is None:
        add(
            Finding("no_vector_segment", "SQLite lists no vector segment for this collection", None)
        )
        return
    if c.metadata_segment_id:
        c.records = int(
            con.execute(
                "SELECT count(*) FROM embeddings WHERE segment_id = ?", (c.metadata_segment_id,)
            ).fetchone()[0]
        )

    present = os.path.isdir(c.segment_path)
    meta: dict[str, Any] | None = None
    if present:
        c.hnsw, meta = _check_segment_keep_metadata(
            c.segment_path, deep=deep, expected_dim=c.dimension
        )
        c.findings.extend(c.hnsw.findings)
    need_coverage = wal_coverage or not present or (c.hnsw is not None and not c.hnsw.healthy)
    if need_coverage and c.metadata_segment_id:
        c.wal_uncovered = _wal_uncovered(con, c.metadata_segment_id, topic)
    if not present:
        # FACTS §2/§3: with the directory gone Chroma replays the whole WAL into a new index.
        # That is exact when the WAL still holds a vector for every live record, and silently
        # loses the rest otherwise ("query returns almost nothing").
        if c.wal_uncovered:
            add(
                Finding(
                    "segment_missing",
                    "vector segment directory is missing and the WAL lacks the vectors of "
                    f"{c.wal_uncovered} records",
                    c.segment_path,
                )
            )
        else:
            add(
                Finding(
                    "segment_missing_rebuildable",
                    "vector segment directory is missing; Chroma will rebuild it from the WAL, "
                    "which covers every record",
                    c.segment_path,
                    "info",
                )
            )
        return
    if deep and c.metadata_segment_id is not None and c.hnsw is not None:
        _check_replay(c, con, topic, meta)
    if not deep or c.metadata_segment_id is None or c.hnsw is None or not c.hnsw.healthy:
        return
    # FACTS §2: records newer than the last flush exist only in the WAL; if one is missing
    # there, its vector exists nowhere.
    gap = int(
        con.execute(
            "SELECT count(*) FROM embeddings e WHERE e.segment_id = ? AND e.seq_id > ? "
            "AND NOT EXISTS (SELECT 1 FROM embeddings_queue q WHERE q.seq_id = e.seq_id)",
            (c.metadata_segment_id, c.index_max_seq_id),
        ).fetchone()[0]
    )
    if gap:
        add(
            Finding(
                "wal_gap",
                f"{gap} records written after the last index flush are missing from the WAL: "
                "their vectors are lost",
                None,
            )
        )
    # Records at or below the flushed sequence id must be in the flushed index (its pickle),
    # unless the WAL still holds their vector (it is replayed on open).
    # No pickle (never flushed, or re-initialised after the directory was removed) means the
    # index holds nothing flushed: records <= index_max_seq_id must then all come from the WAL.
    if c.index_max_seq_id > 0:
        # The pickle check_segment parsed (a healthy segment with a pickle has an id_to_label
        # dict): parsing it again cost ~0.6 s per million ids.
        ids: Any = set()
        if c.hnsw.has_pickle:
            if meta is None or not isinstance(meta.get("id_to_label"), dict):
                return  # already reported by check_segment
            ids = meta["id_to_label"]
        missing = [
            row[0]
            for row in con.execute(
                "SELECT embedding_id FROM embeddings WHERE segment_id = ? AND seq_id <= ?",
                (c.metadata_segment_id, c.index_max_seq_id),
            )
            if row[0] not in ids
        ]
        if missing:
            in_wal = {
                row[0]
                for row in con.execute(
                    "SELECT DISTINCT id FROM embeddings_queue WHERE topic = ? AND operation IN "
                    "(0, 2) AND vector IS NOT NULL",
                    (topic,),
                )
            }
            lost = [i for i in missing if i not in in_wal]
            if lost:
                add(
                    Finding(
                        "index_missing_ids",
                        f"{len(lost)} records flushed before seq {c.index_max_seq_id} are absent "
                        f"from the index and the WAL (e.g. {lost[0]!r})",
                        c.segment_path,
                    )
                )
