"""Salvage a damaged ``chroma.sqlite3``: read what survived, rebuild through Chroma, swap in.

Issue 12: a damaged SQLite file used to end the repair ("restore from a backup"). Order, each
step only after the previous one is on disk, nothing ever deleted:

1. backup: the damaged ``chroma.sqlite3`` (byte copy: the backup API stops at a bad page) and
   every segment directory, into ``<path>/.safechroma/backups/<stamp>/`` (built as
   ``<stamp>.partial``, then renamed);
2. read, from a copy: every table row SQLite still reaches by rowid ranges
   (:func:`~safechroma.storage.sqlite_pages.read_table`), then the leaf pages no intact b-tree
   claims (:func:`~safechroma.storage.sqlite_pages.scan_leaf_pages`), then the rows still
   missing from the indexes that keep a copy of them (:func:`_from_indexes`). Cheap damage is
   undone in the copy first: a destroyed header is rebuilt from the file itself
   (:func:`~safechroma.storage.sqlite_pages.rebuild_header`), a hot journal is played back.
   Indexes are read, not rebuilt: a ``REINDEX`` would throw away the second copy they hold,
   and rows are read by rowid through the table b-trees, which no index affects; the
   freelist lost with a header only leaves pages unused, which no reader minds;
3. assemble each collection: its records (``embeddings`` rows), documents and metadata
   (``embedding_metadata``, ``embedding_metadata_array``), vectors from the HNSW files
   (:func:`~safechroma.storage.hnsw.salvage_vectors`) brought up to date by the WAL
   (``embeddings_queue``, whose rows also carry each write's document and metadata). A row the
   scanner found is kept only if its id has a vector (a stale copy on a free page of a deleted
   record has none);
4. build a new directory beside the old one (``.safechroma/rebuild-<stamp>``) through Chroma
   itself, in a child process (never in the caller: FACTS §4), and check it;
5. swap: the old ``chroma.sqlite3`` and segment directories are renamed into
   ``.safechroma/quarantine/<stamp>``, the new ones renamed into place.

The report says how many records came back and names the rest (issue 21): every record that
is not whole (no vector, or a document or metadata keys known or suspected lost) is listed with
what it lacks in ``incomplete-records.json`` in the backup, and counted in
``incomplete_records``; records with no vector anywhere are not rebuilt and are kept with their
document and metadata in ``sqlite-lost-<collection>.json`` too. What a record had is known
exactly where ``embedding_metadata`` or its key index was read whole over it; elsewhere a
record is named when its rows border rows that were lost (this names a few whole records too,
and misses a record whose later update's rows alone were lost, a case the key index covers).
Collections get new ids (Chroma assigns them); names, metadata, configuration and the recorded
embedding function are kept.
"""

from __future__ import annotations

import bisect
import datetime as _dt
import json
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from safechroma._env import private_env
from safechroma.storage.hnsw import read_header, salvage_vectors
from safechroma.storage.sqlite_pages import (
    claimed_pages,
    page_size_of,
    read_both_ends,
    read_ranges,
    read_table,
    readable_copy,
    scan_leaf_pages,
)

__all__ = ["CollectionSalvage", "SqliteSalvage", "salvage_sqlite"]

STATE_DIR = ".safechroma"
SQLITE_FILE = "chroma.sqlite3"
VECTOR_SEGMENT_TYPE = "urn:chroma:segment/vector/hnsw-local-persisted"
METADATA_SEGMENT_TYPE = "urn:chroma:segment/metadata/sqlite"
Progress = Callable[[str, dict[str, Any]], None]

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


@dataclass
class CollectionSalvage:
    """What came back of one collection.

    Attributes:
        name: Collection name.
        old_id: Its id in the damaged database (the rebuilt one gets a new id from Chroma).
        new_id: Its id in the rebuilt database.
        known: Records known to have existed (from any source).
        recovered: Records rebuilt with their vector.
        partial: Ids rebuilt whose metadata may be incomplete: rows of it were on lost pages
            and the WAL no longer held it (the document may still have come back).
        lost: Ids with no vector anywhere (kept in ``lost_file``).
        spurious: Rows the page scanner found that validation rejected.
        lost_file: JSON file with the lost records' ids, documents and metadata.
        incomplete: Records that did not come back whole: ``{"id", "missing", "missing_keys",
            "rebuilt"}``, ``missing`` naming ``"vector"``, ``"document"``, ``"metadata"``
            (``missing_keys``: the metadata keys known to be lost, when known); ``rebuilt``
            says whether the record is in the rebuilt collection (without a vector it is not).
        name_lost: The collection's row was lost: it was rebuilt as ``recovered-<old id>``
            (its records are listed as missing ``"collection"``).
        configuration_lost: The collection's row was lost: space, HNSW parameters and the
            recorded embedding function are gone, and it was rebuilt with Chroma's defaults
            (listed in the losses file; the records themselves may be whole).
    """

    name: str
    old_id: str
    new_id: str | None = None
    known: int = 0
    recovered: int = 0
    partial: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    spurious: int = 0
    lost_file: str | None = None
    incomplete: list[dict[str, Any]] = field(default_factory=list)
    name_lost: bool = False
    configuration_lost: bool = False


@dataclass
class SqliteSalvage:
    """What :func:`salvage_sqlite` did.

    Attributes:
        status: ``"repaired"``, ``"planned"`` (dry run) or ``"not_repairable"``.
        message: One line for a person.
        backup_dir: The backup folder.
        header_rewritten: The copy needed a new 100-byte header to open.
        rows: Per table: ``[rows read through SQLite, rows recovered by the scanner]``.
        collections: One entry per collection.
        steps: Log of the steps done.
        incomplete_records: Records that did not come back whole (see
            :attr:`CollectionSalvage.incomplete`); 0 only when every record known to have
            existed came back with its vector, document and metadata.
        losses_file: ``<backup>/incomplete-records.json``, naming each of them and what it
            lacks, with what did come back (``None`` when nothing is incomplete, or a dry run).
        unidentified: Records known to have existed whose id is lost with their
            ``embeddings`` row, and whose vector was nowhere: ``{"rowid", "document",
            "metadata"}`` (counted in ``incomplete_records``, listed in the losses file).
        record_set_complete: Whether every record that existed is known. False when neither
            the ``embeddings`` table nor its index could be read whole and the index files and
            the WAL do not cover every record: records may then be lost without a trace, and
            the losses file says so even when it names none.
    """

    path: str
    status: str = "not_repairable"
    message: str = ""
    backup_dir: str | None = None
    header_rewritten: bool = False
    rows: dict[str, list[int]] = field(default_factory=dict)
    collections: list[CollectionSalvage] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)
    incomplete_records: int = 0
    losses_file: str | None = None
    unidentified: list[dict[str, Any]] = field(default_factory=list)
    record_set_complete: bool = True

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict."""
        return asdict(self)


def _stamp() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _segment_dirs(root: str) -> list[str]:
    out = []
    for name in sorted(os.listdir(root)):
        if _is_uuid(name) and os.path.isdir(os.path.join(root, name)):
            out.append(name)
    return out


def _seq(v: Any) -> int:
    if v is None:
        return 0
    if isinstance(v, (bytes, bytearray)):
        return int.from_bytes(v, "big")
    return int(v)


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


# ---- assembling -------------------------------------------------------------------------------


def _meta_value(row: tuple[Any, ...]) -> Any:
    _id, _key, s, i, f, b = row
    if s is not None:
        return s
    if b is not None:
        return bool(b)
    if i is not None:
        return int(i)
    # SQLite stores a whole REAL (144.0) as an integer in the record; read through SQLite the
    # column's affinity turns it back, decoded from the page it stays 144 (measured: the page
    # scanner gave a metadata value of 144 for 144.0).
    return float(f) if isinstance(f, int) else f


def _bordering_gaps(rows: dict[int, tuple[Any, ...]]) -> set[int]:
    """Records (``embeddings`` rowids) whose metadata rows border rows that were not recovered.

    A record's metadata rows are inserted together, so their rowids are consecutive; when some
    of them were on a lost page, the record's recovered rows sit next to a gap, or are the
    first or last rows recovered (a truncated file loses the rows above: issue 21 found a
    record that kept its document row and lost the two after it). A deleted record leaves a
    gap too, so this over-reports (only used when the table was damaged and its key index
    could not say).
    """
    ids = sorted(rows)
    out: set[int] = {rows[ids[0]][0], rows[ids[-1]][0]} if ids else set()
    for a, b in zip(ids, ids[1:], strict=False):
        if b - a > 1:
            out.add(rows[a][0])
            out.add(rows[b][0])
    return out


def _hnsw_config(schema_str: Any) -> dict[str, Any]:
    try:
        cfg = json.loads(schema_str)["keys"]["#embedding"]["float_list"]["vector_index"]["config"]
    except (TypeError, ValueError, KeyError):
        return {}
    h = dict(cfg.get("hnsw") or {})
    out = {
        k: h[k]
        for k in (
            "ef_construction",
            "max_neighbors",
            "ef_search",
            "batch_size",
            "sync_threshold",
            "resize_factor",
        )
        if k in h
    }
    if cfg.get("space"):
        out["space"] = cfg["space"]
    return out


def _assemble(
    root: str, tables: dict[str, dict[int, tuple[Any, ...]]], index: _Index
) -> list[dict[str, Any]]:
    complete = {v[0] for v in tables["_complete"].values()}
    scanned_emb = set(tables.get("_scanned_embeddings", {}))
    seqs = {r[0]: _seq(r[1]) for r in tables["max_seq_id"].values()}
    cmeta: dict[str, dict[str, Any]] = {}
    for r in tables["collection_metadata"].values():
        cmeta.setdefault(r[0], {})[r[1]] = _meta_value((None, *r[1:]))
    by_rowid_meta: dict[int, dict[str, Any]] = {}
    # A row read through SQLite is live; a scanned one may be a stale copy on a free page (an
    # updated key's old value): rows read live are applied last and win, newer rowids next.
    scanned_meta = tables.get("_scanned_embedding_metadata", {})
    for _k, r in sorted(
        tables["embedding_metadata"].items(), key=lambda kv: (kv[0] not in scanned_meta, kv[0])
    ):
        by_rowid_meta.setdefault(r[0], {})[r[1]] = _meta_value(r)
    for _k, r in sorted(tables["embedding_metadata_array"].items()):
        d = by_rowid_meta.setdefault(r[0], {})
        cur = d.get(r[1])
        d[r[1]] = ([*cur] if isinstance(cur, list) else []) + [_meta_value(r)]
    queue = sorted(tables["embeddings_queue"].values(), key=lambda r: r[0])
    plans: list[dict[str, Any]] = []
    for cid, name, dim, cfg_json, schema_str, vseg, mseg, renamed, config_lost in _catalog(
        root, tables, index
    ):
        hcfg = _hnsw_config(schema_str)
        space = hcfg.get("space") or cmeta.get(cid, {}).get("hnsw:space") or "l2"
        m = int(hcfg.get("max_neighbors") or cmeta.get(cid, {}).get("hnsw:M") or 16)
        # Records of the metadata segment, by embedding id (lowest rowid wins a duplicate).
        rows: dict[str, tuple[int, bool]] = {}
        for rowid, r in sorted(tables["embeddings"].items()):
            if r[1] == mseg and r[2] not in rows:
                rows[r[2]] = (rowid, rowid in scanned_emb)
        # Vectors: the index as last flushed, then the WAL above its max_seq_id.
        vecs: dict[str, np.ndarray] = {}
        # Whether the index files gave every id they hold (nothing torn, nothing unmapped).
        index_clean = False
        if vseg and os.path.isdir(os.path.join(root, vseg)):
            snap = os.path.join(root, STATE_DIR, "labelmaps", f"{vseg}.pickle")
            s = salvage_vectors(
                os.path.join(root, vseg),
                space=space,
                dim=dim,
                m=m,
                label_map_file=snap if os.path.isfile(snap) else None,
            )
            vecs = dict(zip(s.ids, s.vectors, strict=True))
            try:
                empty = read_header(os.path.join(root, vseg, "header.bin")).cur_element_count == 0
            except (OSError, ValueError, struct.error):
                empty = False
            index_clean = empty or (
                s.unmapped_labels == 0 and all(k == "deleted" for k in s.skipped)
            )
            if dim is None and s.vectors is not None and len(s.vectors):
                dim = int(len(s.vectors[0]))  # the collection's row was lost
        start = seqs.get(vseg or "", 0)
        wal_meta: dict[str, dict[str, Any]] = {}
        deleted_after: set[str] = set()
        for seq, _ts, op, topic, ident, blob, enc, mjson in queue:
            if not str(topic).endswith("/" + cid):
                continue
            vec = None
            if blob is not None and (enc or "FLOAT32").upper() == "FLOAT32" and dim:
                arr = np.frombuffer(blob, dtype="<f4")
                vec = arr.astype(np.float32) if arr.size == dim else None
            try:
                md = json.loads(mjson) if mjson else None
            except ValueError:
                md = None
            if op in (0, 2) and (md is None or isinstance(md, dict)):
                # An add or upsert carries the whole record: from here the WAL holds all of it
                # (no metadata: it had none).
                if op == 2 or ident not in wal_meta:
                    wal_meta[ident] = dict(md or {})
            elif op == 1 and isinstance(md, dict):
                wal_meta.setdefault(ident, {}).update(md)
            if _seq(seq) <= start:
                continue
            if op == 0 and vec is not None and ident not in vecs:
                vecs[ident] = vec
            elif op in (1, 2) and vec is not None and (op == 2 or ident in vecs):
                vecs[ident] = vec
            elif op == 3:
                vecs.pop(ident, None)
                deleted_after.add(ident)
                wal_meta.pop(ident, None)
        meta_complete = "embedding_metadata" in complete
        fts = tables["embedding_fulltext_search_content"]
        fts_complete = "embedding_fulltext_search_content" in complete
        doubtful = set() if meta_complete else _bordering_gaps(tables["embedding_metadata"])
        records: list[dict[str, Any]] = []
        lost: list[dict[str, Any]] = []
        spurious = 0
        # Rows lost with their pages: an id with a vector the metadata segment lacks. Also when
        # SQLite reads the table as complete: a page overwritten with bytes that parse as a
        # valid leaf made the table one row long, and 1999 of 2000 records vanished with
        # exit 0 (issue 21, a fuzz seed). A deletion not yet in the index is in the WAL.
        ids = list(rows) + [i for i in vecs if i not in rows and i not in deleted_after]
        for ident in ids:
            known_row = rows.get(ident)
            rid: int | None = known_row[0] if known_row else None
            scanned = bool(known_row and known_row[1])
            vec = vecs.get(ident)
            if scanned and vec is None and index.embeddings_whole:
                # A stale copy (free page) of a deleted record: the live index lacks it. Without
                # a whole index it may be a record whose only vector was in the WAL's lost pages
                # (a collection never flushed: issue 21), so it is named, not dropped.
                spurious += 1
                continue
            md = dict(by_rowid_meta.get(rid, {})) if rid is not None else {}
            had_rows = bool(md)
            # The keys the record had, when something still says so exactly: the table read
            # whole, or its key index read over this record (issue 21).
            expected: set[str] | None = None
            if rid is not None and meta_complete:
                expected = set(md)
            elif rid is not None and index.keys_known(rid):
                expected = set(index.meta_keys.get(rid, set()))
            in_doubt = expected is None and (rid is None or not had_rows or rid in doubtful)
            if (in_doubt or (expected is not None and expected - set(md))) and ident in wal_meta:
                # What the table still holds is exact; the WAL's copy fills the rest
                # (Chroma's WAL keeps floats at lower precision: 90.33333333333331).
                md = {**wal_meta[ident], **md}
                in_doubt = False
            doc = md.pop("chroma:document", None)
            if doc is None and rid is not None and not meta_complete:
                row = fts.get(rid)
                doc = row[1] if row else None
            have = set(md) | ({"chroma:document"} if isinstance(doc, str) else set())
            missing: list[str] = []
            missing_keys: list[str] = []
            if expected is not None:
                missing_keys = sorted(expected - have)
                if "chroma:document" in missing_keys:
                    missing.append("document")
                if any(k != "chroma:document" for k in missing_keys):
                    missing.append("metadata")
            elif in_doubt:
                # Nothing says what the record had: name it, do not guess it whole.
                if doc is None and not (fts_complete and rid is not None):
                    missing.append("document")
                missing.append("metadata")
            if renamed:
                missing.append("collection")  # back whole, under another collection name
            md = {k: v for k, v in md.items() if not k.startswith("chroma:")}
            rec: dict[str, Any] = {
                "id": ident,
                "document": doc if isinstance(doc, str) else None,
                "metadata": md or None,
                "partial": "metadata" in missing,
                "missing": missing,
                "missing_keys": missing_keys,
                "order": rid if rid is not None else (1 << 62) + len(records),
            }
            if vec is None:
                rec["missing"] = ["vector", *missing]
                lost.append(rec)
            else:
                rec["vector"] = vec
                records.append(rec)
        records.sort(key=lambda r: r["order"])
        metadata = {k: v for k, v in cmeta.get(cid, {}).items() if not k.startswith("hnsw:")}
        hnsw = {k: v for k, v in hcfg.items()}
        hnsw.setdefault("space", space)
        plans.append(
            {
                "old_id": cid,
                "name": name,
                "dimension": dim,
                "metadata": metadata or None,
                "configuration": {"hnsw": hnsw},
                "config_json_str": cfg_json,
                "schema_str": schema_str,
                "vector_segment": vseg,
                "records": records,
                "lost": lost,
                "spurious": spurious,
                "renamed": renamed,
                "config_lost": config_lost,
                "index_clean": index_clean,
            }
        )
    return plans


def _unidentified(
    tables: dict[str, dict[int, tuple[Any, ...]]], index: _Index, plans: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Records that left live rows behind (metadata, full-text copy, key index entries) but
    whose ``embeddings`` row, and so their id, was lost, and that no plan rebuilt.

    Chroma deletes a record's metadata and full-text rows with it (measured on 1.5.9), so a live
    one without its ``embeddings`` row is a lost record, not a deleted one. Found in a
    collection never flushed (its vectors only in the WAL): its ``embeddings`` and WAL rows were
    both on overwritten pages (issue 21).
    """
    emb = tables["embeddings"]
    used = {r["order"] for p in plans for r in (*p["records"], *p["lost"])}
    scanned_meta = tables.get("_scanned_embedding_metadata", {})
    scanned_fts = tables.get("_scanned_embedding_fulltext_search_content", {})
    # Existence only from live evidence (a scanned row may be a stale copy of a deleted
    # record); content from every row found.
    live: set[int] = set(index.meta_keys)
    content: dict[int, dict[str, Any]] = {}
    for k, r in tables["embedding_metadata"].items():
        if isinstance(r[0], int):
            content.setdefault(r[0], {})[r[1]] = _meta_value(r)
            if k not in scanned_meta:
                live.add(r[0])
    for rid, r in tables["embedding_fulltext_search_content"].items():
        content.setdefault(rid, {}).setdefault("chroma:document", r[1])
        if rid not in scanned_fts:
            live.add(rid)

    # Records rebuilt without their row (from the index or the WAL) are these same records
    # when what they hold matches.
    def key(doc: Any, md: Any) -> str:
        return json.dumps([doc, md or None], sort_keys=True, default=str)

    rowless = {
        key(r["document"], r["metadata"])
        for p in plans
        for r in (*p["records"], *p["lost"])
        if r["order"] >= 1 << 62
    }
    out = []
    for rid in sorted(live - set(emb) - used):
        md = dict(content.get(rid, {}))
        doc = md.pop("chroma:document", None)
        md = {k: v for k, v in md.items() if not k.startswith("chroma:")}
        if (doc is not None or md) and key(doc, md) in rowless:
            continue
        out.append({"rowid": rid, "document": doc, "metadata": md or None})
    return out


def _catalog(
    root: str, tables: dict[str, dict[int, tuple[Any, ...]]], index: _Index
) -> list[tuple[str, str, int | None, Any, Any, str | None, str | None, bool, bool]]:
    """Each collection with its vector and metadata segments, the lost catalog rows filled in.

    ``(id, name, dimension, config_json_str, schema_str, vector segment, metadata segment,
    renamed, configuration_lost)``. A collection whose ``collections`` row was lost (its id
    still named by a segment or by the WAL's topics) takes its name from the table's indexes
    or, failing them, is rebuilt as ``recovered-<id>`` (``renamed``); its configuration (space,
    HNSW parameters, recorded embedding function) is gone either way and rebuilt from
    Chroma's defaults (``configuration_lost``). A collection whose ``segments`` rows were lost
    gets the segment directory and the ``embeddings`` segment id nobody else claims, when
    exactly one of each is left for it
    (issue 21: one overwritten page emptied ``segments``, and all 2000 records but the one
    in the WAL were left out of the rebuild).
    """
    segs = list(tables["segments"].values())
    cols: dict[str, list[Any]] = {}
    for cid, name, dim, _db, cfg_json, schema_str in tables["collections"].values():
        cols.setdefault(cid, [name, dim, cfg_json, schema_str, False, False])
    named = {str(r[3]) for r in segs}
    named |= {str(r[3]).rsplit("/", 1)[-1] for r in tables["embeddings_queue"].values()}
    named |= set(index.collection_names)
    for cid in sorted(c for c in named - set(cols) if _is_uuid(c)):
        if cid in index.collection_names:
            cols[cid] = [index.collection_names[cid], None, "{}", None, False, True]
        else:
            cols[cid] = [f"recovered-{cid}", None, "{}", None, True, True]
    vsegs: dict[str, str | None] = {}
    msegs: dict[str, str | None] = {}
    for cid in cols:
        vsegs[cid] = next((s[0] for s in segs if s[3] == cid and s[1] == VECTOR_SEGMENT_TYPE), None)
        msegs[cid] = next(
            (s[0] for s in segs if s[3] == cid and s[1] == METADATA_SEGMENT_TYPE), None
        )
    claimed = {str(s[0]) for s in segs}
    free_v = [d for d in _segment_dirs(root) if d not in claimed]
    free_m = sorted({str(r[1]) for r in tables["embeddings"].values() if _is_uuid(r[1])} - claimed)
    for segments, free in ((vsegs, free_v), (msegs, free_m)):
        need = [c for c, v in segments.items() if v is None]
        if len(need) == 1 and len(free) == 1:
            segments[need[0]] = free[0]
    return [
        (cid, name, dim, cfg_json, schema_str, vsegs[cid], msegs[cid], renamed, lost)
        for cid, (name, dim, cfg_json, schema_str, renamed, lost) in cols.items()
    ]


# ---- building ---------------------------------------------------------------------------------

# Runs in a child: the only code of this module that imports chromadb.
_BUILD = r"""
import json, os, sys
import numpy as np
import chromadb

man = json.load(open(sys.argv[1]))
client = chromadb.PersistentClient(sys.argv[2])
out = {}
for c in man["collections"]:
    col = client.create_collection(
        c["name"], metadata=c["metadata"], configuration=c["configuration"],
        embedding_function=None,
    )
    col.count()
    vecs = np.load(c["vectors"]) if c["ids"] else None
    groups = {}
    for k, (i, d, m) in enumerate(zip(c["ids"], c["documents"], c["metadatas"])):
        groups.setdefault((d is None, m is None), []).append(k)
    batch = max(1, min(1000, client.get_max_batch_size()))
    for (no_doc, no_meta), ks in groups.items():
        for s in range(0, len(ks), batch):
            part = ks[s : s + batch]
            col.add(
                ids=[c["ids"][k] for k in part],
                embeddings=vecs[part],
                documents=None if no_doc else [c["documents"][k] for k in part],
                metadatas=None if no_meta else [c["metadatas"][k] for k in part],
            )
    out[c["name"]] = {"id": str(col.id), "count": col.count()}
print("RESULT " + json.dumps(out), flush=True)
sys.stdout.flush()
os._exit(0)
"""


def _without_deleted_keys(metadata: dict[str, Any] | None) -> dict[str, Any] | None:
    """A record's metadata as Chroma holds it: a WAL ``update`` carries ``None`` for a key it
    deleted, which Chroma refuses in an ``add`` ("Cannot convert Python object to
    MetadataValue") and which the record no longer has. Empty metadata is no metadata."""
    if not metadata:
        return None
    kept = {k: v for k, v in metadata.items() if v is not None}
    return kept or None


def _build(plans: list[dict[str, Any]], work: str, new_dir: str, python: str) -> dict[str, Any]:
    manifest: dict[str, Any] = {"collections": []}
    for n, p in enumerate(plans):
        recs = p["records"]
        vf = os.path.join(work, f"vectors-{n}.npy")
        if recs:
            np.save(vf, np.stack([r["vector"] for r in recs]).astype(np.float32))
        manifest["collections"].append(
            {
                "name": p["name"],
                "metadata": p["metadata"],
                "configuration": p["configuration"],
                "ids": [r["id"] for r in recs],
                "documents": [r["document"] for r in recs],
                "metadatas": [_without_deleted_keys(r["metadata"]) for r in recs],
                "vectors": vf,
            }
        )
    mf = os.path.join(work, "manifest.json")
    with open(mf, "w") as f:
        json.dump(manifest, f)
    # Never the launcher's trigger: this child opens the new directory with chromadb itself.
    env = {**private_env(), "ANONYMIZED_TELEMETRY": "False"}
    proc = subprocess.run(
        [python, "-c", _BUILD, mf, new_dir], capture_output=True, text=True, env=env
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"rebuild through chromadb failed (rc={proc.returncode}): {proc.stderr[-2000:]}"
        )
    built: dict[str, Any] = json.loads(lines[-1][7:])
    # Keep the collections' recorded configuration and embedding function: the rebuild used
    # the same settings, so the old record stays true (issue 12 re-embedding reads it).
    con = sqlite3.connect(os.path.join(new_dir, SQLITE_FILE))
    try:
        with con:
            for p in plans:
                for col, val in (
                    ("schema_str", p["schema_str"]),
                    ("config_json_str", p["config_json_str"]),
                ):
                    try:
                        json.loads(val)
                    except (TypeError, ValueError):
                        continue
                    con.execute(
                        f"UPDATE collections SET {col} = ? WHERE name = ?", (val, p["name"])
                    )
    finally:
        con.close()
    return built


# ---- the whole repair -------------------------------------------------------------------------


def salvage_sqlite(
    path: str | os.PathLike[str],
    *,
    dry_run: bool = False,
    progress: Progress | None = None,
    python: str | None = None,
) -> SqliteSalvage:
    """Back up, read past the damage, rebuild through Chroma beside, swap in.

    The caller must own the directory (hold ``<path>/.safechroma.lock``; no Chroma process may
    have it open).

    Args:
        path: The persist directory whose ``chroma.sqlite3`` is damaged.
        dry_run: Read and plan only: nothing is written outside a temporary folder.
        progress: Called as ``progress(step, details)`` after each step.
        python: Interpreter for the rebuild child (default: this one).

    Returns:
        A :class:`SqliteSalvage`.
    """
    root = os.fspath(path)
    note = progress or (lambda step, details: None)
    out = SqliteSalvage(path=root)
    db = os.path.join(root, SQLITE_FILE)
    if not os.path.isfile(db) or os.path.getsize(db) == 0:
        out.message = f"{db} is missing or empty: nothing to salvage"
        return out
    stamp = _stamp()
    state = os.path.join(root, STATE_DIR)
    # Scratch space: beside the directory (same file system, for the renames of the swap),
    # or outside it for a dry run, which writes nothing into the directory.
    work = tempfile.mkdtemp(prefix="safechroma-salvage-")
    if not dry_run:
        shutil.rmtree(work)
        work = os.path.join(state, f"rebuild-{stamp}")
        os.makedirs(work)
    try:
        return _salvage(root, db, stamp, state, work, out, note, dry_run, python)
    finally:
        if dry_run or out.status == "repaired":
            # Our own scratch copies (the damaged file's copy, the vectors): the backup keeps
            # the original, the swapped-in directory the result.
            shutil.rmtree(work, ignore_errors=True)


def _salvage(
    root: str,
    db: str,
    stamp: str,
    state: str,
    work: str,
    out: SqliteSalvage,
    note: Progress,
    dry_run: bool,
    python: str | None,
) -> SqliteSalvage:
    if not dry_run:
        backups = os.path.join(state, "backups")
        os.makedirs(backups, exist_ok=True)
        final = os.path.join(backups, stamp)
        partial = final + ".partial"
        os.makedirs(partial)
        for name in (SQLITE_FILE, SQLITE_FILE + "-journal", SQLITE_FILE + "-wal"):
            if os.path.exists(os.path.join(root, name)):
                shutil.copyfile(os.path.join(root, name), os.path.join(partial, name))
        for seg in _segment_dirs(root):
            shutil.copytree(os.path.join(root, seg), os.path.join(partial, "segments", seg))
        _fsync_dir(partial)
        os.rename(partial, final)
        _fsync_dir(backups)
        out.backup_dir = final
        out.steps.append(f"backup {final}")
        note("backup", {"backup_dir": final})

    copy, out.header_rewritten = readable_copy(db, os.path.join(work, "damaged-copy.sqlite3"))
    tables, index = _read_all(copy, out)
    out.steps.append("read " + ", ".join(f"{t} {a}+{b}" for t, (a, b) in out.rows.items()))
    note("read", {"rows": out.rows})
    plans = _assemble(root, tables, index)
    if not plans:
        out.message = "no collection could be read from chroma.sqlite3; nothing was changed"
        return out
    for p in plans:
        if p["renamed"]:
            out.steps.append(f"collection {p['old_id']}: its name was lost; rebuilt as {p['name']}")
    for p in plans:
        cs = CollectionSalvage(
            name=p["name"],
            old_id=p["old_id"],
            known=len(p["records"]) + len(p["lost"]),
            recovered=len(p["records"]),
            partial=[r["id"] for r in p["records"] if r["partial"]],
            lost=[r["id"] for r in p["lost"]],
            spurious=p["spurious"],
            name_lost=p["renamed"],
            configuration_lost=p["config_lost"],
            incomplete=[
                {
                    "id": r["id"],
                    "missing": r["missing"],
                    "missing_keys": r["missing_keys"],
                    "rebuilt": "vector" not in r["missing"],
                }
                for r in (*p["records"], *p["lost"])
                if r["missing"]
            ],
        )
        out.collections.append(cs)
    out.unidentified = _unidentified(tables, index, plans)
    out.incomplete_records = sum(len(c.incomplete) for c in out.collections)
    # Every record is known when the record table (or its index) was read whole, or when the
    # index files and a whole WAL cover them. Otherwise a record whose every trace was on the
    # lost pages (a collection never flushed keeps its vectors only in the WAL) cannot be
    # named, and the report must not read as complete (issue 21).
    wal_whole = ("embeddings_queue",) in tables["_complete"].values()
    out.record_set_complete = index.embeddings_whole or (
        wal_whole and all(p["index_clean"] for p in plans)
    )
    if not out.record_set_complete:
        # Rows whose record id was lost may then be records named nowhere else. When every
        # record is known, they belong to records already counted (rebuilt without their row):
        # the 2000-record file cut in half listed 274 such rows for 1229 incomplete records.
        out.incomplete_records += len(out.unidentified)
    if dry_run:
        out.status = "planned"
        out.message = _summary(out, "would rebuild")
        return out
    assert out.backup_dir is not None
    if (
        out.incomplete_records
        or not out.record_set_complete
        or any(c.configuration_lost for c in out.collections)
    ):
        out.losses_file = _write_losses(out, plans)
        out.steps.append(f"{out.incomplete_records} incomplete records listed in {out.losses_file}")
    for p, cs in zip(plans, out.collections, strict=True):
        if p["lost"]:
            cs.lost_file = os.path.join(out.backup_dir, f"sqlite-lost-{p['old_id']}.json")
            with open(cs.lost_file, "w") as f:
                json.dump([{k: r[k] for k in ("id", "document", "metadata")} for r in p["lost"]], f)

    new_dir = os.path.join(work, "new")
    os.makedirs(new_dir)
    built = _build(plans, work, new_dir, python or sys.executable)
    for cs in out.collections:
        got = built.get(cs.name, {})
        cs.new_id = got.get("id")
        if got.get("count") != cs.recovered:
            raise RuntimeError(
                f"rebuilt {cs.name} holds {got.get('count')} records, expected {cs.recovered}"
            )
    out.steps.append(f"rebuilt {new_dir}")
    note("rebuild", {"dir": new_dir})

    # Swap: old files aside (renamed, never deleted), new ones in. A crash in between leaves
    # both sets on disk, named in swap.json.
    qdir = os.path.join(state, "quarantine", stamp)
    os.makedirs(qdir, exist_ok=True)
    old = [
        n
        for n in (SQLITE_FILE, SQLITE_FILE + "-journal", SQLITE_FILE + "-wal")
        if os.path.exists(os.path.join(root, n))
    ]
    old += [
        p["vector_segment"]
        for p in plans
        if p["vector_segment"] and os.path.isdir(os.path.join(root, p["vector_segment"]))
    ]
    new = sorted(os.listdir(new_dir))
    with open(os.path.join(out.backup_dir, "swap.json"), "w") as f:
        json.dump({"quarantine": qdir, "old": old, "new_dir": new_dir, "new": new}, f)
    for n in old:
        os.rename(os.path.join(root, n), os.path.join(qdir, n))
    for n in new:
        os.rename(os.path.join(new_dir, n), os.path.join(root, n))
    _fsync_dir(root)
    out.steps.append(f"swap: {len(old)} entries to {qdir}, {len(new)} in")
    note("swap", {"quarantine": qdir})
    out.status = "repaired"
    out.message = _summary(out, "rebuilt")
    with open(os.path.join(out.backup_dir, "sqlite-salvage.json"), "w") as f:
        json.dump(out.to_dict(), f, indent=1)
    return out


LOSSES_FILE = "incomplete-records.json"


def _write_losses(out: SqliteSalvage, plans: list[dict[str, Any]]) -> str:
    """``<backup>/incomplete-records.json``: every record that did not come back whole, what it
    lacks, and what of it did come back (to put it back by hand)."""
    assert out.backup_dir is not None
    records = []
    for p in plans:
        for r in (*p["records"], *p["lost"]):
            if r["missing"]:
                records.append(
                    {
                        "collection": p["name"],
                        "id": r["id"],
                        "missing": r["missing"],
                        "missing_keys": r["missing_keys"],
                        "rebuilt": "vector" not in r["missing"],
                        "document": r["document"],
                        "metadata": r["metadata"],
                    }
                )
    path = os.path.join(out.backup_dir, LOSSES_FILE)
    doc = {
        "path": out.path,
        "backup_dir": out.backup_dir,
        "count": out.incomplete_records,
        "record_set_complete": out.record_set_complete,
        "unidentified": out.unidentified,
        "collections": [
            {
                "name": c.name,
                "old_id": c.old_id,
                "lost": ["name"] * c.name_lost + ["configuration"] * c.configuration_lost,
            }
            for c in out.collections
            if c.name_lost or c.configuration_lost
        ],
    }
    tmp = path + ".partial"
    with open(tmp, "w") as f:
        json.dump({**doc, "records": records}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def _summary(out: SqliteSalvage, verb: str) -> str:
    rec = sum(c.recovered for c in out.collections)
    known = sum(c.known for c in out.collections)
    lost = sum(len(c.lost) for c in out.collections)
    s = (
        f"chroma.sqlite3 salvaged: {verb} {len(out.collections)} collection(s), "
        f"{rec} of {known} records with their vectors"
    )
    if out.incomplete_records:
        s += f"; {out.incomplete_records} records incomplete"
    if out.losses_file:
        s += f", listed in {out.losses_file}"
    if out.unidentified:
        s += (
            f"; {len(out.unidentified)} rows whose record id was lost are listed with their "
            "document and metadata"
            + (
                " (counted: some may be records named nowhere else)"
                if not out.record_set_complete
                else " (they belong to records listed as missing their document or metadata)"
            )
        )
    if not out.record_set_complete:
        s += (
            "; more records may be lost without a trace (neither the embeddings table nor "
            "its index could be read whole)"
        )
    if lost:
        s += f" ({lost} with no vector anywhere, not rebuilt)"
    renamed = [c.name for c in out.collections if c.name_lost]
    if renamed:
        s += f"; names lost, rebuilt as {', '.join(renamed)}"
    unconfigured = [c.name for c in out.collections if c.configuration_lost]
    if unconfigured:
        s += (
            f"; configuration lost (rebuilt with Chroma's defaults: check space and HNSW "
            f"settings) for {', '.join(unconfigured)}"
        )
    if out.backup_dir:
        s += f"; backup in {out.backup_dir}"
    return s


def repair_sqlite(
    path: str | os.PathLike[str], *, dry_run: bool = False, progress: Progress | None = None
) -> Any:
    """:func:`salvage_sqlite` as a :class:`~safechroma.storage.recovery.RepairReport`.

    What :func:`~safechroma.storage.recovery.repair_directory` returns for a damaged
    ``chroma.sqlite3``: each collection's ``salvaged`` counts the records rebuilt with their
    vector, ``not_recovered`` names the records with no vector anywhere;
    ``incomplete_records`` and ``losses_file`` count and list every record that did not come
    back whole; a repair that left any behind records that in ``.safechroma/losses.json``
    (:func:`~safechroma.storage.recovery.record_losses`).
    """
    from safechroma.storage.recovery import CollectionRepair, RepairReport, record_losses

    s = salvage_sqlite(path, dry_run=dry_run, progress=progress)
    rep = RepairReport(path=s.path, status=s.status, message=s.message, dry_run=dry_run)
    rep.backup_dir = s.backup_dir
    rep.steps = list(s.steps)
    rep.incomplete_records = s.incomplete_records
    rep.losses_file = s.losses_file
    if s.status == "repaired" and s.losses_file:
        marker = record_losses(
            s.path,
            s.losses_file,
            s.incomplete_records,
            collections=[c.name for c in s.collections if c.configuration_lost or c.name_lost],
        )
        rep.steps.append(f"losses recorded in {marker}")
    for c in s.collections:
        rep.collections.append(
            CollectionRepair(
                collection_id=c.old_id,
                name=c.name,
                segment_id=None,
                reasons=["sqlite_corrupt"],
                action="sqlite_rebuild",
                records=c.known,
                salvaged=c.recovered,
                not_recovered=list(c.lost),
                incomplete_records=len(c.incomplete),
            )
        )
    return rep
