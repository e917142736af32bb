"""Step 2 of a repair: write salvaged vectors and journal fills back through Chroma.

:func:`apply_salvage` runs inside a process that owns the directory, after a fresh open, with a
live collection handle passed in (storage never imports Chroma or the API): it upserts the
salvaged embeddings and makes the collection consistent (issue 7). :func:`pending_salvage_files`
finds the files a crash left unapplied.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from safechroma.storage.embedding import check_embedding_function
from safechroma.storage.layout import (
    _write_atomic,
    backup_files,
)


def pending_salvage_files(path: str | os.PathLike[str]) -> list[str]:
    """Salvage files under ``<path>/.safechroma/backups`` not yet applied (oldest first)."""
    return [
        f
        for f in backup_files(path)
        if os.path.basename(f).startswith("salvage-")
        and f.endswith(".npz")
        and not os.path.exists(f + ".applied")
    ]


def apply_salvage(
    client: Any,
    salvage_file: str,
    *,
    reembed: Callable[[list[str]], Sequence[Sequence[float]]] | None = None,
    batch_size: int = 1000,
) -> dict[str, Any]:
    """Write salvaged embeddings back through a live ``chromadb.PersistentClient``.

    Run it in the process that owns the directory, right after a fresh open of the repaired
    directory (Chroma has then rebuilt the index from the WAL tail: FACTS §2). Only ids that
    the metadata segment still has are written, with ``upsert(ids, embeddings)``: documents
    and metadata are left as they are (FACTS §3 "Recovery paths").

    Args:
        client: A live ``chromadb.PersistentClient`` on the repaired directory.
        salvage_file: A ``salvage-<collection>.npz`` from :func:`repair_directory`.
        reembed: Optional ``documents -> embeddings`` (the collection's embedding function);
            when given, records whose vector could not be salvaged are re-embedded from their
            documents. Without it they are saved and removed (see Returns).
        batch_size: Records per upsert.

    Returns:
        JSON-able summary: ``collection``, ``recovered``, ``reembedded``, ``not_recovered``
        (list of ``{"id", "document", "metadata"}``: records whose vector exists nowhere, also
        saved in ``<salvage_file>.removed.json``), ``removed`` (their ids, deleted from the
        collection so that Chroma can serve every remaining id), ``gone`` (ids deleted
        meanwhile).
    """
    with open(salvage_file[: -len(".npz")] + ".json", "rb") as f:
        side = json.loads(f.read())
    with np.load(salvage_file, allow_pickle=False) as z:
        vecs = np.asarray(z["vectors"], dtype=np.float32)
    ids: list[str] = list(side["ids"])
    if side.get("journal") is not None:  # issue 21: whole records from the write journal
        return _apply_journal(client, salvage_file, side, vecs, batch_size)
    col = client.get_collection(side["name"])
    try:
        batch_size = min(batch_size, int(client.get_max_batch_size()))
    except Exception:  # noqa: BLE001 - older clients have no such call; keep the default
        pass
    recovered = 0
    gone: list[str] = []
    removed: list[str] = []
    for s in range(0, len(ids), batch_size):
        chunk = ids[s : s + batch_size]
        alive = set(col.get(ids=chunk, include=[])["ids"])
        rows = [i for i, x in enumerate(chunk) if x in alive]
        gone.extend(x for x in chunk if x not in alive)
        if rows:
            col.upsert(ids=[chunk[i] for i in rows], embeddings=vecs[s : s + batch_size][rows])
            recovered += len(rows)
    # Consistency: the ids Chroma still cannot find a vector for, whatever the cause (named in
    # the salvage file, or left behind by an earlier repair), found by asking Chroma itself.
    not_recovered = _records(col, _unfindable_ids(col, batch_size), batch_size)
    reembedded = 0
    reembed_rejected: str | None = None
    if reembed is not None and not_recovered:
        # Only a function that reproduces the vectors that survived may fill in the others.
        reembed_rejected = check_embedding_function(
            col,
            reembed,
            space=side.get("space") or "l2",
            exclude=[r["id"] for r in not_recovered],
        )
    if reembed is not None and not_recovered and reembed_rejected is None:
        todo = [r for r in not_recovered if r.get("document") is not None]
        for s in range(0, len(todo), batch_size):
            batch = todo[s : s + batch_size]
            embs = reembed([r["document"] for r in batch])
            col.upsert(ids=[r["id"] for r in batch], embeddings=np.asarray(embs, dtype=np.float32))
            reembedded += len(batch)
        done = {r["id"] for r in todo}
        not_recovered = [r for r in not_recovered if r["id"] not in done]
    saved = salvage_file + ".removed.json"
    if os.path.exists(saved):
        # A previous attempt was cut short after deleting some: they are no longer live, so
        # keep its list (its records were saved before they were deleted).
        with open(saved, "rb") as f:
            earlier = [r for r in json.loads(f.read()) if isinstance(r, dict) and "id" in r]
        now = {r["id"] for r in not_recovered}
        not_recovered = [r for r in earlier if r["id"] not in now] + not_recovered
    if not_recovered:
        # No vector anywhere: save document and metadata beside the salvage file first, then
        # delete through Chroma so that the collection is consistent (a get no longer fails on
        # them and the next check is clean). These are exactly the records to re-add.
        _write_atomic(saved, json.dumps(not_recovered).encode())
        removed = [r["id"] for r in not_recovered]
        for s in range(0, len(removed), batch_size):
            col.delete(ids=removed[s : s + batch_size])
    summary = {
        "collection": side["name"],
        "salvage_file": salvage_file,
        "recovered": recovered,
        "reembedded": reembedded,
        "reembed_rejected": reembed_rejected,
        "not_recovered": not_recovered,
        "removed": removed,
        "gone": gone,
    }
    _write_atomic(salvage_file + ".applied", json.dumps(summary).encode())
    return summary


def _apply_journal(
    client: Any, salvage_file: str, side: dict[str, Any], vecs: np.ndarray, batch_size: int
) -> dict[str, Any]:
    """Upsert records from the write journal whole (vector, document, metadata), creating
    their collection first when the repair could not bring it back (issue 21)."""
    j = side["journal"]
    create = j.get("create")
    if create is not None:
        col = client.get_or_create_collection(
            side["name"],
            metadata=create.get("metadata") or None,
            configuration=create.get("configuration"),
            embedding_function=None,
        )
    else:
        col = client.get_collection(side["name"])
    ids: list[str] = list(side["ids"])
    docs = j["documents"]
    # chromadb's upsert merges metadata into a record that exists: keys the repair brought
    # back from an older write (a key a later update deleted, its row past the damage) must
    # be deleted explicitly (None), or the record keeps them.
    metas = _exact_metadata(col, ids, j["metadatas"], batch_size)
    groups: dict[tuple[bool, bool], list[int]] = {}
    for k in range(len(ids)):
        groups.setdefault((docs[k] is None, metas[k] is None), []).append(k)
    for (no_doc, no_meta), ks in groups.items():
        for s in range(0, len(ks), batch_size):
            part = ks[s : s + batch_size]
            col.upsert(
                ids=[ids[k] for k in part],
                embeddings=vecs[part],
                documents=None if no_doc else [docs[k] for k in part],
                metadatas=None if no_meta else [metas[k] for k in part],
            )
    dead: list[str] = list(j.get("delete") or [])
    for s in range(0, len(dead), batch_size):
        col.delete(ids=dead[s : s + batch_size])  # stale rows of records deleted before
    summary = {
        "collection": side["name"],
        "salvage_file": salvage_file,
        "recovered": len(ids),
        "deleted_again": len(dead),
        "reembedded": 0,
        "reembed_rejected": None,
        "not_recovered": [],
        "removed": [],
        "gone": [],
        "from_journal": True,
    }
    _write_atomic(salvage_file + ".applied", json.dumps(summary).encode())
    return summary


def _exact_metadata(
    col: Any, ids: list[str], wanted: list[dict[str, Any] | None], batch_size: int
) -> list[dict[str, Any] | None]:
    """For each record, an upsert's metadata that leaves exactly ``wanted`` in place."""
    have: dict[str, dict[str, Any]] = {}
    for s in range(0, len(ids), batch_size):
        got = col.get(ids=ids[s : s + batch_size], include=["metadatas"])
        for i, m in zip(got["ids"], got["metadatas"] or [], strict=False):
            have[i] = dict(m or {})
    out: list[dict[str, Any] | None] = []
    for i, want in zip(ids, wanted, strict=True):
        keep = dict(want or {})
        payload = {**{key: None for key in have.get(i, {}) if key not in keep}, **keep}
        out.append(payload or None)
    return out


def _unfindable(col: Any, ids: list[str]) -> list[str]:
    """The ids of ``ids`` whose vector Chroma cannot find (bisects a failing batch)."""
    if not ids:
        return []
    try:
        col.get(ids=ids, include=["embeddings"])
        return []
    except Exception as exc:
        # chromadb 1.5.9: LocalHnswSegmentReaderError::IdNotFound, raised as InternalError.
        if "Error finding id" not in str(exc):
            raise
    if len(ids) == 1:
        return list(ids)
    mid = len(ids) // 2
    return _unfindable(col, ids[:mid]) + _unfindable(col, ids[mid:])


def _unfindable_ids(col: Any, batch_size: int) -> list[str]:
    """Every live id of ``col`` on which a ``get`` with embeddings fails."""
    out: list[str] = []
    offset = 0
    while True:
        page = list(col.get(include=[], limit=batch_size, offset=offset)["ids"])
        if not page:
            return out
        out.extend(_unfindable(col, page))
        offset += len(page)


def _records(col: Any, ids: list[str], batch_size: int) -> list[dict[str, Any]]:
    """Documents and metadata of ``ids`` (Chroma reads them from SQLite: no vector needed)."""
    out: list[dict[str, Any]] = []
    for s in range(0, len(ids), batch_size):
        got = col.get(ids=ids[s : s + batch_size], include=["documents", "metadatas"])
        docs = got["documents"] or [None] * len(got["ids"])
        metas = got["metadatas"] or [None] * len(got["ids"])
        out += [
            {"id": r, "document": d, "metadata": m}
            for r, d, m in zip(got["ids"], docs, metas, strict=True)
        ]
    return out
