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

import json
import os
import re
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from safechroma._errors import IncompatibleDirectoryError
from safechroma.storage.hnsw import (
    Finding,
    SegmentReport,
    _check_segment_keep_metadata,
    check_segment,
)
from safechroma.storage.replay import op_name, replay_index, replay_metadata
from safechroma.storage.schema import compare_schema

__all__ = [
    "CollectionReport",
    "DirectoryReport",
    "Finding",
    "check_directory",
    "incompatible_error",
    "IGNORED_ENTRIES",
]

Status = Literal["healthy", "damaged", "unknown", "incompatible"]

SQLITE_FILE = "chroma.sqlite3"
VECTOR_SEGMENT_TYPE = "urn:chroma:segment/vector/hnsw-local-persisted"
METADATA_SEGMENT_TYPE = "urn:chroma:segment/metadata/sqlite"
# Entries safechroma itself keeps in the persist directory (the core's lock file, our backups,
# quarantine and logs); they are not Chroma's and are never inspected.
IGNORED_ENTRIES = frozenset({".safechroma.lock", ".safechroma"})
_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_CORRUPT_MARKERS = ("malformed", "not a database", "corrupt", "disk i/o error")
_BUSY_MARKERS = ("locked", "busy")


@dataclass
class CollectionReport:
    """Verdict for one collection.

    Attributes:
        id: Collection uuid.
        name: Collection name (``None`` when SQLite could not be read).
        status: ``"healthy"``, ``"damaged"`` or ``"unknown"``.
        space: Distance space: ``"l2"``, ``"cosine"`` or ``"ip"``.
        dimension: Dimension recorded in SQLite (``None`` before the first add).
        max_neighbors: HNSW ``M`` from the collection's configuration (default 16).
        segment_id: Vector segment uuid (its directory name).
        segment_path: The vector segment directory, whether or not it exists.
        metadata_segment_id: Metadata segment uuid (records live in SQLite under it).
        records: Records in the metadata segment (``None`` when unknown).
        index_max_seq_id: Last WAL sequence id flushed to the HNSW files (0 if never).
        metadata_max_seq_id: Last sequence id applied to the metadata segment.
        wal_rows: Rows of this collection still in ``embeddings_queue``.
        wal_min_seq_id: Oldest of them, or ``None``.
        wal_uncovered: Live records with no vector in the WAL: what a rebuild from the WAL
            alone would lose (computed when the index is damaged or missing, or on request).
        hnsw: The segment check, or ``None`` when the directory is missing.
        findings: Everything found, errors first.
    """

    id: str
    name: str | None = None
    status: Status = "healthy"
    space: str = "l2"
    dimension: int | None = None
    max_neighbors: int = 16
    segment_id: str | None = None
    segment_path: str | None = None
    metadata_segment_id: str | None = None
    records: int | None = None
    index_max_seq_id: int = 0
    metadata_max_seq_id: int | None = None
    wal_rows: int = 0
    wal_min_seq_id: int | None = None
    wal_uncovered: int | None = None
    hnsw: SegmentReport | None = None
    findings: list[Finding] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        """True when the status is ``"healthy"``."""
        return self.status == "healthy"

    @property
    def wal_covers_all(self) -> bool | None:
        """Whether the WAL alone can rebuild the whole index (``None``: not computed)."""
        return None if self.wal_uncovered is None else self.wal_uncovered == 0

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict."""
        return {
            "id": self.id,
            "name": self.name,
            "status": self.status,
            "space": self.space,
            "dimension": self.dimension,
            "max_neighbors": self.max_neighbors,
            "segment_id": self.segment_id,
            "segment_path": self.segment_path,
            "metadata_segment_id": self.metadata_segment_id,
            "records": self.records,
            "index_max_seq_id": self.index_max_seq_id,
            "metadata_max_seq_id": self.metadata_max_seq_id,
            "wal_rows": self.wal_rows,
            "wal_min_seq_id": self.wal_min_seq_id,
            "wal_uncovered": self.wal_uncovered,
            "wal_covers_all": self.wal_covers_all,
            "hnsw": self.hnsw.to_dict() if self.hnsw else None,
            "findings": [f.to_dict() for f in self.findings],
        }


@dataclass
class DirectoryReport:
    """Verdict for a whole persist directory.

    Attributes:
        path: The persist directory.
        status: ``"healthy"``, ``"damaged"`` or ``"unknown"``.
        collections: One report per collection.
        findings: Directory-level findings (SQLite, orphan segments, ...).
        sqlite_status: ``"ok"``, ``"corrupt"``, ``"busy"``, ``"missing"``, ``"unknown"`` or
            ``"incompatible"`` (written by a newer chromadb; collections not checked).
        wal_purge: Chroma's ``automatically_purge`` setting (``None`` when unreadable).
        elapsed_s: Wall time of the check.
        incompatibility: For ``"incompatible"``: ``installed_chromadb`` (version),
            ``unknown_migrations`` (``"dir version filename"`` each), ``directory_schema`` and
            ``installed_schema`` (highest migration per dir, as far as known).
    """

    path: str
    status: Status = "healthy"
    collections: list[CollectionReport] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    sqlite_status: str = "ok"
    wal_purge: bool | None = None
    elapsed_s: float = 0.0
    incompatibility: dict[str, Any] | None = None

    @property
    def healthy(self) -> bool:
        """True when the status is ``"healthy"``."""
        return self.status == "healthy"

    @property
    def damaged_collections(self) -> list[CollectionReport]:
        """Collections whose status is ``"damaged"``."""
        return [c for c in self.collections if c.status == "damaged"]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict."""
        return {
            "path": self.path,
            "status": self.status,
            "healthy": self.healthy,
            "sqlite_status": self.sqlite_status,
            "wal_purge": self.wal_purge,
            "elapsed_s": round(self.elapsed_s, 6),
            "incompatibility": self.incompatibility,
            "findings": [f.to_dict() for f in self.findings],
            "collections": [c.to_dict() for c in self.collections],
        }


class _SqliteUnavailable(Exception):
    def __init__(self, status: str, finding: Finding) -> None:
        super().__init__(finding.message)
        self.status = status
        self.finding = finding


def _classify(e: sqlite3.Error, db: str) -> _SqliteUnavailable:
    """Tell a lock apart from corruption (issue 4: a lock is never corruption)."""
    msg = str(e).lower()
    if any(m in msg for m in _CORRUPT_MARKERS):
        return _SqliteUnavailable("corrupt", Finding("sqlite_corrupt", f"SQLite reports: {e}", db))
    if any(m in msg for m in _BUSY_MARKERS):
        return _SqliteUnavailable(
            "busy",
            Finding(
                "sqlite_busy",
                f"chroma.sqlite3 is locked by another process ({e}); not corruption, try again "
                "when it is idle",
                db,
                "warning",
            ),
        )
    from safechroma.storage.sqlite_pages import is_hot_journal

    if "readonly" in msg and is_hot_journal(db + "-journal"):
        # A writer killed inside a transaction: SQLite undoes it on the next read-write open
        # (Chroma's, or repair's after a backup); a read-only check cannot (issue 21).
        return _SqliteUnavailable(
            "unknown",
            Finding(
                "sqlite_hot_journal",
                "chroma.sqlite3-journal holds a transaction that never finished (a writer was "
                "killed); a read-only check cannot undo it. `safechroma repair` backs both "
                "files up and rolls it back, as Chroma would on its next open",
                db,
                "warning",
            ),
        )
    return _SqliteUnavailable(
        "unknown",
        Finding("sqlite_unavailable", f"chroma.sqlite3 cannot be read: {e}", db, "warning"),
    )


def _connect_ro(db: str, busy_timeout: float) -> sqlite3.Connection:
    # mode=ro: never create, never write (a missing file must not become an empty database).
    uri = "file:" + _uri_path(db) + "?mode=ro"
    return sqlite3.connect(uri, uri=True, timeout=busy_timeout, isolation_level=None)


def _uri_path(p: str) -> str:
    from urllib.parse import quote

    return quote(os.path.abspath(p))


def _seq(v: Any) -> int:
    """Sequence ids are integers since metadb migration 00005; older ones were big-endian blobs."""
    if v is None:
        return 0
    if isinstance(v, (bytes, bytearray)):
        return int.from_bytes(v, "big")
    return int(v)


def _parse_config(row: dict[str, Any], meta: dict[str, Any]) -> tuple[str, int]:
    """Space and M from schema_str (1.x), config_json_str, then legacy ``hnsw:*`` metadata."""
    space: Any = None
    m: Any = None
    for key in ("schema_str", "config_json_str"):
        raw = row.get(key)
        if not raw:
            continue
        try:
            cfg = json.loads(raw)
        except ValueError:
            continue
        if key == "schema_str":
            vi = (
                cfg.get("keys", {})
                .get("#embedding", {})
                .get("float_list", {})
                .get("vector_index", {})
                .get("config", {})
            )
            space = space or vi.get("space")
            m = m or (vi.get("hnsw") or {}).get("max_neighbors")
        else:
            # chromadb 1.0-1.2 (no schema_str) nest it: {"vector_index": {"hnsw": {...}}}.
            h = (
                cfg.get("hnsw")
                or cfg.get("hnsw_configuration")
                or (cfg.get("vector_index") or {}).get("hnsw")
                or {}
            )
            if isinstance(h, dict):
                space = space or h.get("space")
                m = m or h.get("max_neighbors") or h.get("M")
    space = space or meta.get("hnsw:space") or "l2"
    m = m or meta.get("hnsw:M") or 16
    try:
        m_int = int(m)
    except (TypeError, ValueError):
        m_int = 16
    return str(space), m_int


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


def _read_catalog(con: sqlite3.Connection) -> list[dict[str, Any]]:
    cols = [dict(r) for r in con.execute("SELECT * FROM collections ORDER BY name")]
    segs = [dict(r) for r in con.execute("SELECT id, type, scope, collection FROM segments")]
    seqs = {r[0]: _seq(r[1]) for r in con.execute("SELECT segment_id, seq_id FROM max_seq_id")}
    meta: dict[str, dict[str, Any]] = {}
    for r in con.execute(
        "SELECT collection_id, key, str_value, int_value, float_value FROM collection_metadata"
    ):
        v = r[2] if r[2] is not None else (r[3] if r[3] is not None else r[4])
        meta.setdefault(r[0], {})[r[1]] = v
    # WAL topics look like "persistent://default/default/<collection id>" in 1.5.9, not the
    # tenant/database names of the sysdb, so match them by the trailing collection id.
    wal: dict[str, tuple[str, int, int | None]] = {}
    for r in con.execute(
        "SELECT topic, count(*), min(seq_id) FROM embeddings_queue GROUP BY topic"
    ):
        wal[str(r[0]).rsplit("/", 1)[-1]] = (
            str(r[0]),
            int(r[1]),
            None if r[2] is None else int(r[2]),
        )
    for c in cols:
        cid = c["id"]
        c["_vector"] = next(
            (s["id"] for s in segs if s["collection"] == cid and s["type"] == VECTOR_SEGMENT_TYPE),
            None,
        )
        c["_metadata"] = next(
            (
                s["id"]
                for s in segs
                if s["collection"] == cid and s["type"] == METADATA_SEGMENT_TYPE
            ),
            None,
        )
        c["_seqs"] = seqs
        c["_meta"] = meta.get(cid, {})
        c["_wal"] = wal.get(cid, (f"persistent://default/default/{cid}", 0, None))
    return cols


def _read_purge(con: sqlite3.Connection) -> bool | None:
    row = con.execute("SELECT config_json_str FROM embeddings_queue_config LIMIT 1").fetchone()
    if row is None:
        return None
    v = json.loads(row[0]).get("automatically_purge")
    return bool(v) if v is not None else None


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


def _check_replay(
    c: CollectionReport, con: sqlite3.Connection, topic: str, meta: dict[str, Any] | None
) -> None:
    """Replay the WAL as Chroma's next open will (:mod:`safechroma.storage.replay`).

    Two findings (issue 13): the index cannot catch up with the WAL (the first call of every
    process fails, chroma#7678), and ids the two segments will disagree on afterwards
    (chroma#7032). Runs when the index files were walked in full (the deep check) and the
    pickle parsed; it needs the live labels of that walk, which it then drops from the report.
    """
    seg = c.hnsw
    assert seg is not None and c.metadata_segment_id is not None
    live = seg._live_labels
    seg._live_labels = None
    if live is None or seg.header is None:
        return
    cur = seg.header.cur_element_count
    i2l: Any = None
    total = 0
    start = c.index_max_seq_id
    if seg.has_pickle:
        if meta is None or not isinstance(meta.get("id_to_label"), dict):
            return
        i2l = meta["id_to_label"]
        total = meta.get("total_elements_added") or 0
        if not isinstance(total, int):
            return
        legacy = meta.get("max_seq_id")
        if start == 0 and isinstance(legacy, int):
            start = legacy  # 1.5.9 moves a legacy pickle's max_seq_id into SQLite on open
    elif cur > 0:
        return  # pickle_missing: Chroma starts the index over; reported already
    if not i2l:
        i2l, total, start = None, 0, 0  # Chroma takes the segment for new (local_hnsw.rs)
    mt_start = c.metadata_max_seq_id or 0
    rows = [
        (int(r[0]), str(r[1]), int(r[2]), bool(r[3]))
        for r in con.execute(
            "SELECT seq_id, id, operation, vector IS NOT NULL FROM embeddings_queue "
            "WHERE topic = ? AND seq_id > ? ORDER BY seq_id",
            (topic, min(start, mt_start)),
        )
    ]
    if not rows:
        # Nothing to replay (the common case): the index holds the pickle's ids, the metadata
        # segment its rows; compare them without building either set.
        _compare_without_replay(c, con, i2l or {})
        return
    # The files' labels are 1..cur (FACTS §1): the deleted ones are the rest. If the live
    # labels say otherwise (reported by check_segment), deletes are not checked.
    deleted: set[int] | None = None
    n_live = int(live.size)
    if n_live <= cur and (n_live == 0 or (int(live.min()) >= 1 and int(live.max()) <= cur)):
        on = np.zeros(cur + 1, dtype=bool)
        on[live.astype(np.int64)] = True
        if int(on.sum()) == n_live:
            deleted = {int(x) for x in np.flatnonzero(~on[1:]) + 1}
    index = replay_index(
        i2l,
        total,
        [r for r in rows if r[0] > start],
        element_count=cur if deleted is not None else None,
        deleted_labels=deleted,
    )
    add = c.findings.append
    if index.failure is not None and index.failure_row is not None:
        seq, ident, op, _v = index.failure_row
        waiting = sum(1 for r in rows if r[0] > start)
        add(
            Finding(
                "wal_replay_fails",
                "the index cannot catch up with the WAL: the first call of every process fails "
                f'("Failed to apply logs to the hnsw segment writer") on {index.failure} (WAL '
                f"seq {seq}, "
                f"{op_name(op)} of {ident!r}); {waiting} WAL rows wait above the index's seq "
                f"{start}",
                c.segment_path,
            )
        )
        return
    meta_ids = replay_metadata(
        (
            str(r[0])
            for r in con.execute(
                "SELECT embedding_id FROM embeddings WHERE segment_id = ?",
                (c.metadata_segment_id,),
            )
        ),
        (r for r in rows if r[0] > mt_start),
    )
    _report_disagreement(c, meta_ids - index.ids, index.ids - meta_ids)


def _compare_without_replay(c: CollectionReport, con: sqlite3.Connection, i2l: Any) -> None:
    """:func:`_check_replay` when the WAL holds nothing to replay: one pass over the rows."""
    n = 0
    only_meta: set[str] = set()
    for (ident,) in con.execute(
        "SELECT embedding_id FROM embeddings WHERE segment_id = ?", (c.metadata_segment_id,)
    ):
        n += 1
        if ident not in i2l:
            only_meta.add(str(ident))
    only_index: set[str] = set()
    if len(i2l) != n - len(only_meta):
        meta_ids = {
            str(r[0])
            for r in con.execute(
                "SELECT embedding_id FROM embeddings WHERE segment_id = ?",
                (c.metadata_segment_id,),
            )
        }
        only_index = set(i2l) - meta_ids
    _report_disagreement(c, only_meta, only_index)


def _report_disagreement(c: CollectionReport, only_meta: set[str], only_index: set[str]) -> None:
    add = c.findings.append
    if only_meta or only_index:
        parts = []
        if only_meta:
            parts.append(
                f"{len(only_meta)} ids only in the metadata segment (e.g. {min(only_meta)!r}): "
                'get and filtered queries raise "Error finding id"'
            )
        if only_index:
            parts.append(
                f"{len(only_index)} ids only in the vector index (e.g. {min(only_index)!r}): "
                "query returns ids that get does not know"
            )
        add(
            Finding(
                "segments_disagree",
                "after Chroma replays the WAL, the metadata segment and the vector index "
                "disagree: " + "; ".join(parts),
                c.segment_path,
            )
        )


def _wal_uncovered(con: sqlite3.Connection, metadata_segment: str, topic: str) -> int:
    """Live records the WAL cannot rebuild (the WAL is a suffix: FACTS §2).

    A record is covered only when the write that made its current version (the row whose
    sequence id the metadata segment stored, ``embeddings.seq_id``) is an ADD (0) or UPSERT (2)
    with a vector still in the WAL. Replaying an UPDATE (1) onto an index that lacks the id is a
    no-op (measured: updated ids whose ADD was purged were not rebuilt), and an ADD row of an id
    that already existed was ignored by the metadata segment but is applied by a rebuild: the
    record would come back with that ignored write's vector (issue 7).
    """
    return int(
        con.execute(
            "SELECT count(*) FROM embeddings e WHERE e.segment_id = ? AND NOT EXISTS "
            "(SELECT 1 FROM embeddings_queue q WHERE q.seq_id = e.seq_id AND q.topic = ? "
            "AND q.id = e.embedding_id AND q.operation IN (0, 2) AND q.vector IS NOT NULL)",
            (metadata_segment, topic),
        ).fetchone()[0]
    )
