"""Read a Chroma ``chroma.sqlite3`` for a check: read-only, and never mistaking a lock for damage.

:func:`_connect_ro` opens the file read-only (a missing file must not become an empty database);
:func:`_classify` turns a ``sqlite3`` error into a status a check can report (issue 4: a lock is
never corruption; issue 21: a hot journal is a killed writer, not damage);
:func:`_read_catalog` and :func:`_parse_config` read the collections and their segments.
"""

from __future__ import annotations

import json
import os
import sqlite3
from typing import Any

from safechroma.storage.hnsw import (
    Finding,
)
from safechroma.storage.layout import METADATA_SEGMENT_TYPE, VECTOR_SEGMENT_TYPE, _seq

_CORRUPT_MARKERS = ("malformed", "not a database", "corrupt", "disk i/o error")


_BUSY_MARKERS = ("locked", "busy")


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
