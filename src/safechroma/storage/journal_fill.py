"""After a repair, write back from the write journal what the repair could not bring back.

:func:`fill` compares the journal's records (:mod:`safechroma.storage.journal`) with what a
repair left in the directory, writes the missing or incomplete records to a salvage file that
:func:`~safechroma.storage.salvage_apply.apply_salvage` applies first, and takes the records the
journal holds off the repair's losses (issue 21).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from safechroma.storage.journal import (
    CollectionState,
    Journal,
    _create_configuration,
    _json_default,
    _segments,
    replay,
    settle,
)
from safechroma.storage.layout import LOSSES_MARKER, STATE_DIR, _fsync_dir, _stamp

__all__ = ["fill"]


# ---- filling a repair's gaps -----------------------------------------------------------------

FILL_PREFIX = "salvage--journal-"  # sorts before the index salvage files: applied first


def _db_collections(db: str) -> dict[str, tuple[str, str | None, set[str]]] | None:
    """Collection id -> (name, metadata segment, its record ids), or None if unreadable."""
    import sqlite3

    if not os.path.isfile(db):
        return None
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    except sqlite3.Error:
        return None
    try:
        out: dict[str, tuple[str, str | None, set[str]]] = {}
        for cid, name in con.execute("SELECT id, name FROM collections"):
            seg = con.execute(
                "SELECT id FROM segments WHERE collection = ? AND scope = 'METADATA'", (cid,)
            ).fetchone()
            ids: set[str] = set()
            if seg is not None:
                ids = {
                    r[0]
                    for r in con.execute(
                        "SELECT embedding_id FROM embeddings WHERE segment_id = ?", (seg[0],)
                    )
                }
            out[str(cid)] = (str(name), None if seg is None else str(seg[0]), ids)
        return out
    except sqlite3.Error:
        return None
    finally:
        con.close()


def _write_fill(
    backup: str,
    col: CollectionState,
    name: str,
    ids: list[str],
    create: bool,
    dead: list[str],
) -> str:
    recs = [col.records[i] for i in ids]
    dim = next((int(r["vector"].shape[0]) for r in recs), col.dimension or 0)
    vecs = np.stack([r["vector"] for r in recs]) if recs else np.zeros((0, dim), np.float32)
    space = None
    if isinstance(col.configuration, dict) and isinstance(col.configuration.get("hnsw"), dict):
        space = col.configuration["hnsw"].get("space")
    base = os.path.join(backup, f"{FILL_PREFIX}{col.id}")
    tmp = base + ".partial.npz"
    np.savez(tmp, vectors=vecs.astype(np.float32))
    os.replace(tmp, base + ".npz")
    side = {
        "collection_id": col.id,
        "name": name,
        "space": space or "l2",
        "dimension": dim,
        "ids": ids,
        "skipped": {},
        "not_recovered": [],
        # Issue 21: whole records from the write journal (apply_salvage upserts them with
        # their documents and metadata, creating the collection first when it is gone).
        "journal": {
            "documents": [r["document"] for r in recs],
            "metadatas": [r["metadata"] for r in recs],
            "delete": dead,
            "create": (
                {
                    "metadata": col.metadata,
                    "configuration": _create_configuration(col.configuration),
                }
                if create
                else None
            ),
        },
    }
    part = base + ".json.partial"
    with open(part, "w") as f:
        json.dump(side, f, default=_json_default)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, base + ".json")
    return base + ".npz"


def fill(root: str, rep: Any, *, sqlite_unusable: bool = False) -> Any:
    """After a repair of ``root`` (a ``RepairReport``), write back from the journal what the
    repair could not bring back, and take those records off the report's losses.

    Which records: after a rebuild of ``chroma.sqlite3`` (collection ids changed, vectors
    possibly stale), every live record the journal holds; otherwise the records the journal
    holds that the directory lacks, or that the repair named incomplete. They go into a
    salvage file that :func:`~safechroma.storage.recovery.apply_salvage` applies with the
    others (first). When ``chroma.sqlite3`` cannot be read at all, it is moved aside with the
    segment directories (after the backup) and every collection is rebuilt from the journal.
    Only the records the journal holds are taken off the losses.
    """
    if rep.dry_run or rep.status in ("planned",) or not _segments(root):
        return rep
    state = {k: v for k, v in replay(root).items() if v.name is not None}
    if not state:
        return rep
    db = os.path.join(root, STATE_DIR_SQLITE)
    found = _db_collections(db)
    rebuilt = any(getattr(c, "action", "") == "sqlite_rebuild" for c in rep.collections)
    whole_loss = sqlite_unusable or found is None or (not found and rep.status != "nothing_to_do")
    if not (rebuilt or whole_loss) and settle(root) == "voided":
        # Undecided until the repair rolled back a killed commit's hot journal: read again.
        state = {k: v for k, v in replay(root).items() if v.name is not None}

    backup = rep.backup_dir
    if backup is None:
        backup = os.path.join(root, STATE_DIR, "backups", _stamp())
    if whole_loss:
        # Nothing of the catalog is readable: the journal rebuilds every collection.
        qdir = os.path.join(root, STATE_DIR, "quarantine", _stamp())
        os.makedirs(qdir, exist_ok=True)
        names = [n for n in os.listdir(root) if n.startswith("chroma.sqlite3")]
        names += [n for n in os.listdir(root) if _is_segment_dir(root, n)]
        if rep.backup_dir is None:
            os.makedirs(backup, exist_ok=True)
            for n in names:
                src = os.path.join(root, n)
                if os.path.isdir(src):
                    import shutil

                    shutil.copytree(src, os.path.join(backup, "segments", n))
                else:
                    import shutil

                    shutil.copyfile(src, os.path.join(backup, n))
        for n in names:
            os.rename(os.path.join(root, n), os.path.join(qdir, n))
        _fsync_dir(root)
        rep.steps.append(f"journal: chroma.sqlite3 missing or unreadable, moved aside to {qdir}")
        found = {}
    assert found is not None
    by_name = {name: cid for cid, (name, _seg, _ids) in found.items()}
    old_to_name = {
        str(c.collection_id): c.name for c in rep.collections if getattr(c, "name", None)
    }
    restored: dict[str, set[str]] = {}  # collection name -> ids written whole
    journal = Journal(root)
    files: list[str] = []
    written = removed = 0
    named = _named_incomplete(rep)
    for col in state.values():
        name = old_to_name.get(col.id) or str(col.name)
        target = col.id if col.id in found else by_name.get(name)
        if target is None and col.name in by_name:
            target = by_name[str(col.name)]
            name = str(col.name)
        create = target is None
        if target is not None:
            name = found[target][0]
        have = found[target][2] if target is not None else set()
        live = [i for i, r in col.records.items() if r["vector"] is not None]
        if rebuilt or create:
            ids = live
        else:
            want = named.get(name, set()) | named.get(col.id, set())
            ids = [i for i in live if i not in have or i in want]
        # Rows the repair brought back of records the journal saw deleted (stale copies).
        dead = sorted(i for i in have if i in col.deleted)
        if not ids and not dead and not create:
            continue
        os.makedirs(backup, exist_ok=True)
        files.append(_write_fill(backup, col, name, ids, create, dead))
        restored[name] = set(ids) | set(dead)  # dead: deleted, so not a loss either
        written += len(ids)
        removed += len(dead)
        if target is not None and target != col.id:
            # The repair gave the collection a new id: its journal history continues there.
            journal.collection(
                target,
                name,
                metadata=col.metadata,
                configuration=col.configuration,
                schema=col.schema,
                dimension=col.dimension,
                tenant=col.tenant,
                database=col.database,
                adopt=col.id,
            )
    journal.close()
    if not files:
        return rep
    rep.backup_dir = rep.backup_dir or backup
    rep.salvage_files = [*files, *rep.salvage_files]
    rep.steps.append(
        f"journal: {written} records to write back, {removed} stale rows of deleted records"
        " to delete again"
    )
    _take_off_losses(root, rep, restored)
    if rep.status in ("nothing_to_do", "not_repairable"):
        rep.status = "repaired"
        rep.message = (
            "chroma.sqlite3 missing or unreadable: every collection rebuilt from the journal"
            if whole_loss
            else "records missing from chroma.sqlite3"
        )
    rep.message += f"; {written} records restored from the journal"
    if removed:
        rep.message += f", {removed} stale rows of deleted records removed"
    return rep


STATE_DIR_SQLITE = "chroma.sqlite3"


def _is_segment_dir(root: str, name: str) -> bool:
    import uuid

    try:
        uuid.UUID(name)
    except ValueError:
        return False
    return os.path.isdir(os.path.join(root, name))


def _named_incomplete(rep: Any) -> dict[str, set[str]]:
    """Collection name (or id) -> ids the repair named incomplete or not recovered."""
    out: dict[str, set[str]] = {}
    for c in rep.collections:
        for i in getattr(c, "not_recovered", []) or []:
            out.setdefault(str(c.name), set()).add(i)
            out.setdefault(str(c.collection_id), set()).add(i)
    if rep.losses_file:
        try:
            with open(rep.losses_file, "rb") as f:
                for r in json.loads(f.read()).get("records", []):
                    out.setdefault(str(r.get("collection")), set()).add(str(r.get("id")))
        except (OSError, ValueError, AttributeError):
            pass
    return out


def _take_off_losses(root: str, rep: Any, restored: dict[str, set[str]]) -> None:
    """Drop the records the journal restores from the report, its losses file and marker."""
    for c in rep.collections:
        got = restored.get(str(c.name), set())
        if got:
            c.not_recovered = [i for i in c.not_recovered if i not in got]
    if not rep.losses_file:
        return
    try:
        with open(rep.losses_file, "rb") as f:
            doc = json.loads(f.read())
    except (OSError, ValueError):
        return
    records = doc.get("records", [])
    left = [
        r for r in records if str(r.get("id")) not in restored.get(str(r.get("collection")), ())
    ]
    for c in rep.collections:
        if hasattr(c, "incomplete_records"):
            c.incomplete_records = sum(1 for r in left if r.get("collection") == c.name)
    if doc.get("collections"):
        left_collections = doc["collections"]
    else:
        left_collections = []
    doc["records"] = left
    doc["count"] = len(left)
    doc["restored_from_journal"] = len(records) - len(left)
    tmp = rep.losses_file + ".partial"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, rep.losses_file)
    rep.incomplete_records = len(left)
    if left or left_collections:
        _marker_count(root, rep.losses_file, len(left))
        return
    _marker_count(root, rep.losses_file, 0)
    rep.losses_file = None


def _marker_count(root: str, losses_file: str, count: int) -> None:
    """Set this repair's entry in ``.safechroma/losses.json``; an empty marker is renamed to
    ``losses-restored-<stamp>.json`` (kept)."""
    marker = os.path.join(root, STATE_DIR, LOSSES_MARKER)
    try:
        with open(marker, "rb") as f:
            doc = json.loads(f.read())
    except (OSError, ValueError):
        return
    repairs = []
    for r in doc.get("repairs", []):
        if r.get("file") == losses_file:
            if count == 0 and not r.get("collections"):
                continue
            r = {**r, "count": count}
        repairs.append(r)
    if not repairs:
        os.rename(marker, os.path.join(root, STATE_DIR, f"losses-restored-{_stamp()}.json"))
        return
    doc["repairs"] = repairs
    doc["count"] = sum(int(r.get("count", 0)) for r in repairs)
    doc["files"] = [r["file"] for r in repairs]
    tmp = marker + ".partial"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, marker)
