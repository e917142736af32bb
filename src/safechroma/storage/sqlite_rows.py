"""Read the rows of a damaged ``chroma.sqlite3``: step 2 of the salvage (sqlite_salvage).

The shape of every row of Chroma's tables (:data:`COLUMNS`, and a test per table that tells a
row of it from a row of another table on an unclaimed leaf page), then :func:`_read_all`: the
rows SQLite still reaches by rowid ranges, the leaf pages no intact b-tree claims, and the rows
still missing from the indexes that keep a copy of them (:func:`_from_indexes`).
"""

from __future__ import annotations

import bisect
import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from safechroma.storage.layout import (
    METADATA_SEGMENT_TYPE,
)
from safechroma.storage.reports import SqliteSalvage
from safechroma.storage.sqlite_pages import (
    claimed_pages,
    page_size_of,
    read_both_ends,
    read_ranges,
    read_table,
    scan_leaf_pages,
)

# Column order of the tables read (chromadb 1.5.9 schema; checked by PRAGMA when it works).
COLUMNS: dict[str, tuple[str, ...]] = {
    "collections": (
        "id",
        "name",
        "dimension",
        "database_id",
        "config_json_str",
        "schema_str",
    ),
    "segments": ("id", "type", "scope", "collection"),
    "collection_metadata": (
        "collection_id",
        "key",
        "str_value",
        "int_value",
        "float_value",
        "bool_value",
    ),
    "databases": ("id", "name", "tenant_id"),
    "max_seq_id": ("segment_id", "seq_id"),
    "embeddings": ("id", "segment_id", "embedding_id", "seq_id", "created_at"),
    "embedding_metadata": (
        "id",
        "key",
        "string_value",
        "int_value",
        "float_value",
        "bool_value",
    ),
    "embedding_metadata_array": (
        "id",
        "key",
        "string_value",
        "int_value",
        "float_value",
        "bool_value",
    ),
    # Chroma's full-text index keeps a second copy of every document, keyed by the record's
    # rowid in ``embeddings``: a source for documents whose metadata pages were lost.
    "embedding_fulltext_search_content": ("id", "c0"),
    "embeddings_queue": (
        "seq_id",
        "created_at",
        "operation",
        "topic",
        "id",
        "vector",
        "encoding",
        "metadata",
    ),
}


# Tables whose rows the page scanner may recover (the large ones, whose pages are most likely
# to be hit); each with a test that a decoded record has that table's shape.
_UUID_LEN = 36


def _is_uuid(v: Any) -> bool:
    return isinstance(v, str) and len(v) == _UUID_LEN and v.count("-") == 4


def _opt(v: Any, *types: type) -> bool:
    return v is None or isinstance(v, types)


_SHAPES: dict[str, Callable[[tuple[Any, ...]], bool]] = {
    "embeddings": lambda r: (
        len(r) == 5
        and r[0] is None
        and _is_uuid(r[1])
        and isinstance(r[2], str)
        and isinstance(r[3], (int, bytes))
        and isinstance(r[4], str)
    ),
    "embedding_metadata": lambda r: (
        len(r) == 6
        and isinstance(r[0], int)
        and isinstance(r[1], str)
        and _opt(r[2], str)
        and _opt(r[3], int)
        and _opt(r[4], float, int)
        and _opt(r[5], int)
    ),
    "embeddings_queue": lambda r: (
        len(r) == 8
        and r[0] is None
        and isinstance(r[2], int)
        and 0 <= r[2] <= 3
        and isinstance(r[3], str)
        and "/" in r[3]
        and isinstance(r[4], str)
        and _opt(r[5], bytes)
        and _opt(r[6], str)
        and _opt(r[7], str)
    ),
    "embedding_fulltext_search_content": lambda r: (
        len(r) == 2
        and r[0] is None
        and isinstance(r[1], str)
        and not r[1].startswith('{"automatically_purge"')
    ),
    "collection_metadata": lambda r: (
        len(r) == 6
        and _is_uuid(r[0])
        and isinstance(r[1], str)
        and _opt(r[2], str)
        and _opt(r[3], int)
        and _opt(r[4], float, int)
        and _opt(r[5], int)
    ),
    "collections": lambda r: (
        len(r) == 6
        and _is_uuid(r[0])
        and isinstance(r[1], str)
        and _opt(r[2], int)
        and _is_uuid(r[3])
    ),
    "segments": lambda r: (
        len(r) == 4
        and _is_uuid(r[0])
        and isinstance(r[1], str)
        and r[1].startswith("urn:chroma:segment/")
        and _is_uuid(r[3])
    ),
}


# Rowid-alias tables: the INTEGER PRIMARY KEY is stored as NULL in the record, the rowid is it.
_ALIAS = {"embeddings": 0, "embeddings_queue": 0, "embedding_fulltext_search_content": 0}


def _segment_dirs(root: str) -> list[str]:
    out = []
    for name in sorted(os.listdir(root)):
        if _is_uuid(name) and os.path.isdir(os.path.join(root, name)):
            out.append(name)
    return out


# ---- reading --------------------------------------------------------------------------------


def _read_all(
    copy: str, out: SqliteSalvage
) -> tuple[dict[str, dict[int, tuple[Any, ...]]], _Index]:
    """Every table of :data:`COLUMNS`, as ``{rowid: row}``, from SQLite, the page scanner and
    the indexes (:func:`_from_indexes`)."""
    tables: dict[str, dict[int, tuple[Any, ...]]] = {t: {} for t in COLUMNS}
    complete: dict[str, bool] = {t: False for t in COLUMNS}
    con = sqlite3.connect(f"file:{os.path.abspath(copy)}?mode=ro", uri=True, timeout=1.0)
    con.text_factory = lambda b: b.decode("utf-8", "replace")
    claimed: set[int] = set()
    try:
        for t, cols in COLUMNS.items():
            try:
                real = tuple(r[1] for r in con.execute(f'PRAGMA table_info("{t}")'))
            except sqlite3.DatabaseError:
                real = ()
            if real and real[: len(cols)] != cols:
                continue  # not the schema this module knows: leave it to the scanner
            try:
                rows, complete[t] = read_table(con, t)
            except sqlite3.DatabaseError:
                rows, complete[t] = {}, False
            tables[t] = {k: v[: len(cols)] for k, v in rows.items()}
        try:
            claimed, failed = claimed_pages(con, exclude={t for t in COLUMNS if not complete[t]})
        except sqlite3.DatabaseError:
            claimed, failed = set(), set(COLUMNS)
        for t in failed & set(COLUMNS):
            complete[t] = False
        out.rows = {t: [len(tables[t]), 0] for t in COLUMNS}
        _scan(copy, tables, complete, claimed, out)
        index = _from_indexes(con, tables, complete, out)
    finally:
        con.close()
    tables["_complete"] = {i: (t,) for i, t in enumerate(t for t in COLUMNS if complete[t])}
    return tables, index


def _scan(
    copy: str,
    tables: dict[str, dict[int, tuple[Any, ...]]],
    complete: dict[str, bool],
    claimed: set[int],
    out: SqliteSalvage,
) -> None:
    """Rows of incomplete tables from the leaf pages no readable b-tree claims."""
    want = [t for t in _SHAPES if not complete[t]]
    if want:
        for _page, rowid, rec in scan_leaf_pages(copy, page_size_of(copy), skip=claimed):
            for t in want:
                if not _SHAPES[t](rec):
                    continue
                if rowid in tables[t]:
                    break
                row = list(rec)
                if t in _ALIAS:
                    row[_ALIAS[t]] = rowid
                tables[t][rowid] = tuple(row)
                tables.setdefault("_scanned_" + t, {})[rowid] = ()
                out.rows[t][1] += 1
                break


@dataclass
class _Index:
    """What Chroma's own indexes say about rows whose table pages were lost.

    ``meta_keys``: ``embeddings`` rowid -> the metadata keys it has (the primary-key index of
    ``embedding_metadata``, ``(id, key, rowid)``); ``keys_failed``: the rowid ranges of it
    that could not be read (there, what a record had is unknown); ``keys_complete``: the
    index was read whole. ``collection_names``: collection id -> name, from the two unique
    indexes of ``collections`` joined on the rowid (read when rows of it are missing).
    ``embeddings_whole``: every record of ``embeddings`` is known live (the table, or its
    unique index, was read whole).
    """

    meta_keys: dict[int, set[str]] = field(default_factory=dict)
    keys_failed: list[tuple[int, int]] = field(default_factory=list)
    keys_complete: bool = False
    collection_names: dict[str, str] = field(default_factory=dict)
    embeddings_whole: bool = False

    def keys_known(self, rowid: int) -> bool:
        """Whether the index was read for this record."""
        if self.keys_complete:
            return True
        i = bisect.bisect_right(self.keys_failed, (rowid, 1 << 62)) - 1
        return not (i >= 0 and self.keys_failed[i][0] <= rowid <= self.keys_failed[i][1])


# Chroma's indexes over embedding_metadata values (schema of chromadb 1.5.9); bool_value has none.
_VALUE_INDEXES = (
    ("embedding_metadata_string_value", "string_value", 2),
    ("embedding_metadata_int_value", "int_value", 3),
    ("embedding_metadata_float_value", "float_value", 4),
)


def _from_indexes(
    con: sqlite3.Connection,
    tables: dict[str, dict[int, tuple[Any, ...]]],
    complete: dict[str, bool],
    out: SqliteSalvage,
) -> _Index:
    """Fill rows lost with their table pages from the indexes that hold a copy of them.

    An index b-tree lives on other pages than its table, so damage often spares one of the
    two (issue 21). ``embeddings`` has a unique index on ``(segment_id, embedding_id)`` with
    the rowid: every record's id and rowid. ``embedding_metadata`` has its primary key
    ``(id, key)`` with the rowid, and one index per value column ``(key, value)`` with the
    rowid: joined on the rowid they give back the row itself, except for booleans (no index).
    The key index also says exactly which keys each record had, so what could not be brought
    back is known per record rather than guessed.
    """
    index = _Index()
    found = {"embeddings": 0, "embedding_metadata": 0}
    if not complete["collections"]:
        q1 = (
            "SELECT rowid, id FROM collections INDEXED BY sqlite_autoindex_collections_1 "
            "ORDER BY id"
        )
        q2 = (
            "SELECT rowid, name FROM collections INDEXED BY sqlite_autoindex_collections_2 "
            "ORDER BY name, database_id"
        )
        try:
            ids, _whole = read_both_ends(con, q1, q1 + " DESC")
            names, _whole = read_both_ends(
                con, q2, q2.replace("name, database_id", "name DESC, database_id DESC")
            )
        except sqlite3.DatabaseError:
            ids, names = [], []
        by_rowid = {r: n for r, n in names if isinstance(n, str)}
        index.collection_names = {c: by_rowid[r] for r, c in ids if _is_uuid(c) and r in by_rowid}
    index.embeddings_whole = complete["embeddings"]
    if not complete["embeddings"]:
        emb = tables["embeddings"]
        segs = {r[0] for r in tables["segments"].values() if r[1] == METADATA_SEGMENT_TYPE}
        segs |= {r[1] for r in emb.values() if _is_uuid(r[1])}
        index.embeddings_whole = bool(segs)
        for seg in sorted(segs):
            q = (
                "SELECT rowid, embedding_id FROM embeddings INDEXED BY "
                "sqlite_autoindex_embeddings_1 WHERE segment_id = ? ORDER BY embedding_id"
            )
            try:
                rows, whole = read_both_ends(con, q, q + " DESC", (seg,))
            except sqlite3.DatabaseError:
                rows, whole = [], False
            index.embeddings_whole &= whole
            scanned = tables.get("_scanned_embeddings", {})
            for rowid, eid in rows:
                if not (isinstance(rowid, int) and isinstance(eid, str)):
                    continue
                if rowid not in emb:
                    emb[rowid] = (rowid, seg, eid, None, None)
                    found["embeddings"] += 1
                elif emb[rowid][1:3] == (seg, eid):
                    scanned.pop(rowid, None)  # the live index confirms the scanned row
    if complete["embedding_metadata"]:
        index.keys_complete = True
    else:
        q = (
            "SELECT id, key, rowid FROM embedding_metadata INDEXED BY "
            "sqlite_autoindex_embedding_metadata_1 WHERE id BETWEEN ? AND ? ORDER BY id"
        )
        try:
            lo, hi = con.execute(
                "SELECT min(id), max(id) FROM embedding_metadata INDEXED BY "
                "sqlite_autoindex_embedding_metadata_1"
            ).fetchone()
            lo, hi = (int(lo), int(hi)) if lo is not None else (1, 0)
        except (sqlite3.DatabaseError, TypeError, ValueError):
            lo, hi = 0, 1 << 40
        try:
            rows, index.keys_failed = read_ranges(con, q, lo, hi, unique=False)
        except sqlite3.DatabaseError:
            rows, index.keys_failed = [], [(0, 1 << 62)]
        index.keys_complete = not index.keys_failed
        meta = tables["embedding_metadata"]
        lost: dict[int, tuple[int, str]] = {}
        live: dict[tuple[int, str], int] = {}
        for eid, key, rowid in rows:
            if not (isinstance(eid, int) and isinstance(key, str) and isinstance(rowid, int)):
                continue
            index.meta_keys.setdefault(eid, set()).add(key)
            live[(eid, key)] = rowid
        # A scanned row whose (record, key) the live index puts at another rowid is a stale
        # copy (an older value on a free page).
        for rowid in list(tables.get("_scanned_embedding_metadata", {})):
            r = meta.get(rowid)
            if r is not None and live.get((r[0], r[1]), rowid) != rowid:
                del meta[rowid]
                tables["_scanned_embedding_metadata"].pop(rowid)
                out.rows["embedding_metadata"][1] -= 1
        for (eid, key), rowid in live.items():
            if rowid not in meta:
                lost[rowid] = (eid, key)
        for name, col, pos in _VALUE_INDEXES if lost else ():
            for key in sorted({k for _e, k in lost.values()}):
                q = (
                    f"SELECT rowid, {col} FROM embedding_metadata INDEXED BY {name} "
                    f"WHERE key = ? AND {col} IS NOT NULL ORDER BY {col}"
                )
                try:
                    vals, _whole = read_both_ends(con, q, q + " DESC", (key,))
                except sqlite3.DatabaseError:
                    continue
                for rowid, value in vals:
                    if rowid in lost and rowid not in meta and lost[rowid][1] == key:
                        row: list[Any] = [lost[rowid][0], key, None, None, None, None]
                        row[pos] = value
                        meta[rowid] = tuple(row)
                        found["embedding_metadata"] += 1
    for t, n in found.items():
        if n:
            out.rows[t][1] += n
            out.steps.append(f"{t}: {n} rows from its indexes")
    return index
