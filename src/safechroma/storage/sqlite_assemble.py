"""Assemble each collection from the rows a ``chroma.sqlite3`` salvage read: step 3 of
:mod:`~safechroma.storage.sqlite_salvage`.

Records (``embeddings`` rows), documents and metadata, vectors from the HNSW files brought up to
date by the WAL, and the collection catalog (names, metadata, configuration, segments). A row
the scanner found is kept only if its id has a vector; a record whose rows border rows that were
lost is named incomplete (issue 21).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import numpy as np

from safechroma.storage.hnsw import read_header, salvage_vectors
from safechroma.storage.layout import (
    METADATA_SEGMENT_TYPE,
    STATE_DIR,
    VECTOR_SEGMENT_TYPE,
    _seq,
)
from safechroma.storage.sqlite_rows import _Index, _is_uuid, _segment_dirs

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
