"""Non-destructive repair of a damaged Chroma persist directory.

Two steps, because the second needs Chroma and the first must not (FACTS §4: one process owns
a directory, and a fresh process is the clean reset):

1. :func:`repair_directory` (no Chroma; the caller holds the directory lock): back up, salvage,
   quarantine. Order, each step only after the previous one is on disk:

   a. backup ``<path>/.safechroma/backups/<UTC stamp>/``: a consistent copy of
      ``chroma.sqlite3`` (sqlite3 backup API) and of every damaged segment directory, built
      under ``<stamp>.partial`` and renamed into place;
   b. salvage: every structurally intact vector of the damaged ``data_level0.bin`` that the
      WAL will not replay, written to ``salvage-<collection>.npz`` + ``.json`` in the backup;
   c. quarantine: the damaged segment directory is *renamed* to
      ``<path>/.safechroma/quarantine/<stamp>/<segment uuid>``, never deleted.

   A crash before (c) leaves the old state plus a backup; after (c), the new state (Chroma
   rebuilds the index from the WAL on the next open: FACTS §2) plus the backup and the salvage
   file, which :func:`pending_salvage_files` finds again.

2. :func:`apply_salvage` (inside a process that owns the directory, after a fresh open): upsert
   the salvaged embeddings, embeddings only, so documents and metadata stay as they are; then
   make the collection consistent: every live id whose vector exists nowhere (Chroma raises
   "Error finding id" for it on every ``get`` that includes embeddings) is re-embedded when an
   embedding function is given, otherwise its document and metadata are saved beside the
   salvage file and it is deleted through Chroma. Left in place, such ids made every later
   check report ``index_missing_ids`` while each repair found nothing to salvage: the soak saw
   22 validate+repair cycles in a row, ending with a directory chromadb could not read
   (issue 7).

This module holds step 1 for the vector indexes and the WAL retention switch; the other parts
live beside it and are re-exported here, where callers import them: the reports and the losses
marker (:mod:`~safechroma.storage.reports`), label maps (:mod:`~safechroma.storage.label_map`),
step 2 (:mod:`~safechroma.storage.salvage_apply`), re-embedding
(:mod:`~safechroma.storage.embedding`), the ``chroma.sqlite3`` salvage
(:mod:`~safechroma.storage.sqlite_salvage`) and the journal's fill
(:mod:`~safechroma.storage.journal_fill`).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from collections.abc import Sequence
from typing import Any

import numpy as np

from safechroma.storage.embedding import EmbedFn as EmbedFn
from safechroma.storage.embedding import (
    check_embedding_function,
    recorded_embedding_function,
    restore_saved_records,
    saved_records,
)
from safechroma.storage.hnsw import (
    PICKLE_FILE,
    read_label_map,
    read_live_elements,
    salvage_vectors,
)
from safechroma.storage.journal import has_journal, settle
from safechroma.storage.journal_fill import fill
from safechroma.storage.label_map import (
    LabelMapRebuild,
    _label_map_path,
    rebuild_label_map,
    snapshot_label_maps,
)
from safechroma.storage.layout import (
    LOSSES_MARKER,
    SQLITE_FILE,
    STATE_DIR,
    Progress,
    _fsync_dir,
    _ro,
    _seq,
    _stamp,
    _write_atomic,
)
from safechroma.storage.reports import (
    CollectionRepair,
    RepairReport,
    acknowledge_losses,
    record_losses,
    unacknowledged_losses,
)
from safechroma.storage.salvage_apply import apply_salvage, pending_salvage_files
from safechroma.storage.sqlite_pages import is_hot_journal
from safechroma.storage.sqlite_salvage import repair_sqlite
from safechroma.storage.validate import CollectionReport, DirectoryReport, check_directory
from safechroma.storage.wal import set_wal_retention

__all__ = [
    "LOSSES_MARKER",
    "CollectionRepair",
    "LabelMapRebuild",
    "RepairReport",
    "acknowledge_losses",
    "apply_salvage",
    "check_embedding_function",
    "keep_full_wal",
    "pending_salvage_files",
    "rebuild_label_map",
    "recorded_embedding_function",
    "record_losses",
    "repair_directory",
    "restore_saved_records",
    "roll_back_hot_journal",
    "saved_records",
    "snapshot_label_maps",
    "unacknowledged_losses",
    "wal_purge_enabled",
]


def roll_back_hot_journal(path: str | os.PathLike[str]) -> str | None:
    """Play back a hot ``chroma.sqlite3-journal`` after backing both files up.

    A writer killed inside a transaction leaves its changes half in ``chroma.sqlite3`` and the
    pages as they were in the journal; SQLite undoes it on the next read-write open (Chroma
    does so on its first call), but a read-only check cannot ("attempt to write a readonly
    database") and so cannot judge the file (issue 21). The caller must own the directory.

    Returns:
        The backup folder, or ``None`` when there was no hot journal.
    """
    root = os.fspath(path)
    db = os.path.join(root, SQLITE_FILE)
    journal = db + "-journal"
    if not os.path.isfile(db) or not is_hot_journal(journal):
        return None
    backups = os.path.join(root, STATE_DIR, "backups")
    os.makedirs(backups, exist_ok=True)
    final = os.path.join(backups, _stamp() + "-journal")
    partial = final + ".partial"
    os.makedirs(partial)
    for src in (db, journal):
        shutil.copyfile(src, os.path.join(partial, os.path.basename(src)))
    _fsync_dir(partial)
    os.rename(partial, final)
    _fsync_dir(backups)
    con = sqlite3.connect(db, timeout=5.0)
    try:
        con.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError:
        pass  # a damaged file: the salvage reads the backup's pair the same way
    finally:
        con.close()
    return final


def _wal_vectors(
    con: sqlite3.Connection, cid: str, live: dict[str, int]
) -> tuple[set[str], dict[str, np.ndarray]]:
    """Ids the WAL replay rebuilds exactly, and the WAL's vector of the current version of others.

    The metadata segment records, per live id, the sequence id of the last write it applied
    (``embeddings.seq_id``). Only that row says which version is current. An ADD row is no proof:
    Chroma ignores an ADD of an existing id (FACTS §3) in the metadata segment, but replayed into
    a rebuilt index that lacks the id it is applied, and the record comes back with the ignored
    write's vector under the current document and metadata (issue 7: the soak's "wrong vector";
    reproduced by hand with a flushed, purged id, an ignored ADD and any index damage). So:

    * covered: the current write is an ADD/UPSERT with a vector still in the WAL: the replay
      ends with exactly that vector (an earlier ignored ADD is overwritten or deleted before it);
    * the rest must be written back after the replay; when the current write is an UPDATE with
      a vector still in the WAL, that vector is the current one (newer than the index's copy).

    Topics end in the collection id (see _validate._read_catalog); operation codes are
    chromadb's (ADD 0, UPDATE 1, UPSERT 2, DELETE 3).
    """
    covered: set[str] = set()
    current: dict[str, np.ndarray] = {}
    for seq, ident, op, blob, enc in con.execute(
        "SELECT seq_id, id, operation, vector, encoding FROM embeddings_queue "
        "WHERE topic LIKE ? AND vector IS NOT NULL ORDER BY seq_id",
        ("%/" + cid,),
    ):
        if live.get(ident) != _seq(seq):
            continue
        if op in (0, 2):
            covered.add(ident)
        elif op == 1 and (enc or "FLOAT32").upper() == "FLOAT32":
            current[ident] = np.frombuffer(blob, dtype="<f4").astype(np.float32)
    return covered, current


def _live_seq(con: sqlite3.Connection, metadata_segment: str) -> dict[str, int]:
    """Live id -> sequence id of the last write the metadata segment applied to it."""
    return {
        r[0]: _seq(r[1])
        for r in con.execute(
            "SELECT embedding_id, seq_id FROM embeddings WHERE segment_id = ?", (metadata_segment,)
        )
    }


def _live_ids(con: sqlite3.Connection, metadata_segment: str) -> list[str]:
    return [
        r[0]
        for r in con.execute(
            "SELECT embedding_id FROM embeddings WHERE segment_id = ? ORDER BY id",
            (metadata_segment,),
        )
    ]


def _documents(
    con: sqlite3.Connection, metadata_segment: str, ids: Sequence[str]
) -> dict[str, str | None]:
    out: dict[str, str | None] = {i: None for i in ids}
    wanted = set(ids)
    for eid, doc in con.execute(
        "SELECT e.embedding_id, m.string_value FROM embeddings e JOIN embedding_metadata m "
        "ON m.id = e.id AND m.key = 'chroma:document' WHERE e.segment_id = ?",
        (metadata_segment,),
    ):
        if eid in wanted:
            out[eid] = doc
    return out


def repair_directory(
    path: str | os.PathLike[str],
    report: DirectoryReport | None = None,
    *,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> RepairReport:
    """Repair ``path`` (see :func:`_repair_files`), then fill from the write journal what the
    repair could not bring back (issue 21: :func:`safechroma.storage.journal.fill`)."""
    if not dry_run:
        # The write a dead worker left undecided, decided against Chroma's WAL as it was
        # before the repair touches chroma.sqlite3 (a rebuild writes a new one).
        settle(path)
    try:
        out = _repair_files(path, report, dry_run=dry_run, progress=progress)
    except Exception as exc:
        if dry_run or not has_journal(path):
            raise
        # The file salvage failed; the journal alone rebuilds a managed directory.
        out = RepairReport(path=os.fspath(path), status="not_repairable", message=repr(exc))
        out.steps.append(f"salvage of chroma.sqlite3 failed: {exc!r}")
        filled_all: RepairReport = fill(os.fspath(path), out, sqlite_unusable=True)
        return filled_all
    filled: RepairReport = fill(os.fspath(path), out)
    return filled


def _repair_files(
    path: str | os.PathLike[str],
    report: DirectoryReport | None = None,
    *,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> RepairReport:
    """Back up, salvage and quarantine every damaged vector index of ``path``.

    The caller must own the directory (hold ``<path>/.safechroma.lock``; no Chroma process may
    have it open). Nothing is deleted: damaged segment directories are renamed into
    ``.safechroma/quarantine``. Write the salvage back afterwards with :func:`apply_salvage`
    from a process that opens the directory fresh.

    Args:
        path: The persist directory.
        report: A fresh :func:`check_directory` result; checked again when omitted.
        dry_run: Only plan: report what would be done, change nothing.
        progress: Called as ``progress(step, details)`` after each step (the CLI shows it;
            tests use it to check that no step runs before its backup exists).

    Returns:
        A :class:`RepairReport`.
    """
    root = os.fspath(path)
    note = progress or (lambda step, details: None)
    if report is None:
        report = check_directory(root, wal_coverage=True)
    out = RepairReport(path=root, dry_run=dry_run)
    if report.sqlite_status == "corrupt":
        # Issue 12: salvage a damaged chroma.sqlite3 (back up, read past the damage, rebuild
        # through Chroma beside, swap in): safechroma.storage.sqlite_salvage.
        result: RepairReport = repair_sqlite(root, dry_run=dry_run, progress=progress)
        return result
    if report.sqlite_status != "ok":
        out.status = "not_repairable"
        out.message = (
            f"SQLite is {report.sqlite_status}: safechroma repairs vector indexes only; "
            "restore chroma.sqlite3 from a backup (nothing was changed)"
            if report.sqlite_status == "corrupt"
            else f"SQLite is {report.sqlite_status}: cannot check, nothing was changed"
        )
        return out
    damaged = [c for c in report.collections if c.status == "damaged"]
    if not damaged:
        out.status = "nothing_to_do"
        out.message = "no damaged collection"
        return out

    db = os.path.join(root, SQLITE_FILE)
    con = _ro(db)
    try:
        plans = [_plan(con, c) for c in damaged]
        out.collections = [p[2] for p in plans]
        if dry_run:
            out.status = "planned"
            out.message = f"would back up and quarantine {len(damaged)} damaged index(es)"
            return out

        stamp = _stamp()
        state = os.path.join(root, STATE_DIR)
        backups = os.path.join(state, "backups")
        os.makedirs(backups, exist_ok=True)
        final = os.path.join(backups, stamp)
        partial = final + ".partial"
        os.makedirs(partial)
        # (a) backup: a consistent SQLite copy even if someone read it meanwhile.
        dst = sqlite3.connect(os.path.join(partial, SQLITE_FILE))
        try:
            con.backup(dst)
        finally:
            dst.close()
        for rep, _need, _cr in plans:
            if rep.segment_id and os.path.isdir(os.path.join(root, rep.segment_id)):
                shutil.copytree(
                    os.path.join(root, rep.segment_id),
                    os.path.join(partial, "segments", rep.segment_id),
                )
        _write_atomic(
            os.path.join(partial, "check.json"), json.dumps(report.to_dict(), indent=1).encode()
        )
        _fsync_dir(partial)
        os.rename(partial, final)
        _fsync_dir(backups)
        out.backup_dir = final
        out.steps.append(f"backup {final}")
        note("backup", {"backup_dir": final})

        # (b) salvage, from the original files (still in place).
        for rep, need, cr in plans:
            if need is None or rep.segment_id is None:
                continue
            _salvage_one(root, final, con, rep, need, cr)
            out.steps.append(
                f"salvage {cr.name}: {cr.salvaged} vectors, {len(cr.not_recovered)} not recoverable"
            )
            if cr.salvage_file:
                out.salvage_files.append(cr.salvage_file)
            note("salvage", {"collection": cr.name, "salvaged": cr.salvaged})
    finally:
        con.close()

    # (c) quarantine: rename, the one step that changes Chroma's view of the directory.
    qdir = os.path.join(root, STATE_DIR, "quarantine", stamp)
    for rep, _need, cr in plans:
        src = os.path.join(root, rep.segment_id) if rep.segment_id else None
        if src and os.path.isdir(src):
            os.makedirs(qdir, exist_ok=True)
            dest = os.path.join(qdir, rep.segment_id or "")
            os.rename(src, dest)
            _fsync_dir(root)
            cr.action = "quarantine"
            cr.quarantined_to = dest
            out.steps.append(f"quarantine {src} -> {dest}")
            note("quarantine", {"collection": cr.name, "to": dest})
        snap = _label_map_path(root, rep.segment_id or "")
        if rep.segment_id and os.path.isfile(snap):
            # Chroma starts the index over in the same segment directory, with labels from 1
            # again: the old snapshot would map them to the wrong ids. It goes with the old
            # index.
            os.makedirs(qdir, exist_ok=True)
            os.rename(snap, os.path.join(qdir, rep.segment_id + ".labelmap.pickle"))
    _write_atomic(os.path.join(final, "repair.json"), json.dumps(out.to_dict(), indent=1).encode())
    out.status = "repaired"
    lost = len(out.not_recovered)
    out.message = (
        f"{len(damaged)} damaged index(es) quarantined; backup in {final}; "
        f"{sum(c.salvaged for c in out.collections)} vectors salvaged"
        + (f"; {lost} records need re-embedding" if lost else "")
    )
    return out


def _plan(
    con: sqlite3.Connection, c: CollectionReport
) -> tuple[CollectionReport, list[str] | None, CollectionRepair]:
    """Which live ids the WAL will not rebuild (``None``: all covered)."""
    cr = CollectionRepair(
        collection_id=c.id,
        name=c.name,
        segment_id=c.segment_id,
        reasons=sorted({f.code for f in c.findings if f.severity == "error"}),
        records=c.records,
        action="quarantine",
    )
    need: list[str] | None = None
    if c.metadata_segment_id:
        live = _live_seq(con, c.metadata_segment_id)
        in_wal, _ = _wal_vectors(con, c.id, live)
        need = [i for i in _live_ids(con, c.metadata_segment_id) if i not in in_wal]
    cr.wal_covers_all = not need
    return c, (need or None), cr


def _salvage_one(
    root: str,
    backup: str,
    con: sqlite3.Connection,
    c: CollectionReport,
    need: list[str],
    cr: CollectionRepair,
) -> None:
    seg = os.path.join(root, c.segment_id or "")
    ids: list[str] = []
    vecs = np.zeros((0, c.dimension or 0), np.float32)
    skipped: dict[str, int] = {}
    if os.path.isdir(seg):
        el = read_live_elements(seg, space=c.space, dim=c.dimension, m=c.max_neighbors)
        mapping: dict[int, str] | None = read_label_map(os.path.join(seg, PICKLE_FILE))
        live_labels = set(el.labels.tolist()) if el is not None else set()
        if el is not None and (mapping is None or not live_labels <= mapping.keys()):
            # The label map is lost, torn or incomplete (issue 12: a deleted, garbled or
            # truncated pickle; issue 13: a kill during a flush tore it and the recovery then
            # removed every record flushed after the last snapshot). Rebuild it from the
            # metadata segment and use only what is proven.
            rb = rebuild_label_map(root, con, c, el)
            cr.label_map = rb.to_dict()
            mapping = rb.label_to_id
        if el is not None and mapping is not None:
            s = salvage_vectors(
                seg,
                space=c.space,
                dim=c.dimension,
                m=c.max_neighbors,
                label_to_id=mapping,
                elements=el,
            )
            skipped = s.skipped
            wanted = set(need)
            keep = [i for i, x in enumerate(s.ids) if x in wanted]
            ids = [s.ids[i] for i in keep]
            vecs = (
                s.vectors[keep]
                if keep
                else np.zeros((0, s.vectors.shape[1] if s.vectors.ndim == 2 else 0), np.float32)
            )
    # A newer vector from a WAL UPDATE beats the index's copy of the same id.
    _, updated = _wal_vectors(con, c.id, _live_seq(con, c.metadata_segment_id or ""))
    fresh = [
        i for i in need if i in updated and (c.dimension is None or updated[i].size == c.dimension)
    ]
    if fresh:
        fset = set(fresh)
        keep_rows = [k for k, x in enumerate(ids) if x not in fset]
        dim = int(updated[fresh[0]].size)
        base_vecs = vecs[keep_rows] if len(keep_rows) else np.zeros((0, dim), np.float32)
        ids = [ids[k] for k in keep_rows] + fresh
        vecs = np.concatenate(
            [base_vecs.reshape(-1, dim), np.stack([updated[i] for i in fresh])]
        ).astype(np.float32)
    got = set(ids)
    lost = [i for i in need if i not in got]
    docs = _documents(con, c.metadata_segment_id or "", lost) if lost else {}
    cr.salvaged = len(ids)
    cr.not_recovered = lost
    base = os.path.join(backup, f"salvage-{c.id}")
    tmp = base + ".partial.npz"
    np.savez(tmp, vectors=vecs)
    os.replace(tmp, base + ".npz")
    side = {
        "collection_id": c.id,
        "name": c.name,
        "space": c.space,
        "dimension": c.dimension,
        "ids": ids,
        "skipped": skipped,
        "not_recovered": [{"id": i, "document": docs.get(i)} for i in lost],
    }
    _write_atomic(base + ".json", json.dumps(side).encode())
    cr.salvage_file = base + ".npz"


def wal_purge_enabled(path: str | os.PathLike[str]) -> bool | None:
    """Chroma's ``automatically_purge`` for ``path`` (``None``: no setting stored yet)."""
    con = _ro(os.path.join(os.fspath(path), SQLITE_FILE))
    try:
        row = con.execute("SELECT config_json_str FROM embeddings_queue_config LIMIT 1").fetchone()
    finally:
        con.close()
    if row is None:
        return None
    v = json.loads(row[0]).get("automatically_purge")
    return None if v is None else bool(v)


def keep_full_wal(path: str | os.PathLike[str], enable: bool = True) -> dict[str, Any]:
    """Opt-in durability: stop Chroma from purging its WAL, so recovery is exact.

    Chroma 1.5.9 reads ``automatically_purge`` from the ``embeddings_queue_config`` row of
    ``chroma.sqlite3`` (the Rust core runs ``SELECT * FROM embeddings_queue_config``; there is
    no Python setting for a local client). With it false, every write stays in
    ``embeddings_queue`` and deleting a broken index makes Chroma rebuild it exactly (FACTS §2,
    verified 3000/3000). Enable it before the first write: rows purged earlier are gone.

    Without it, directories that safechroma manages already keep a second copy of every live
    vector (:mod:`safechroma.storage.wal`: the WAL compacted to one row per live id); this keeps
    the whole write history instead.

    Disk cost: every ``add``/``update``/``upsert``/``delete`` keeps one WAL row forever:
    ``4 * dim`` bytes of vector plus the id, the metadata JSON (document included) and ~40
    bytes of row overhead. 1M records of 384 dims with 200-byte documents is about 2 GB more
    than with purging, and it grows with every update. ``chroma vacuum`` (which purges) undoes
    it. Call this only while no process has the directory open (hold the directory lock).

    Args:
        path: The persist directory (``chroma.sqlite3`` must exist: open it once with Chroma).
        enable: ``True`` keeps the full WAL; ``False`` restores Chroma's default purge.

    Returns:
        ``{"path", "automatically_purge", "previous"}``.
    """
    db = os.path.join(os.fspath(path), SQLITE_FILE)
    if not os.path.isfile(db):
        raise FileNotFoundError(f"{db} does not exist; open the directory with Chroma once first")
    previous = wal_purge_enabled(path)
    # The directory's retention mode, so that safechroma's compaction keeps the whole history
    # (storage/wal.py); False goes back to Chroma's own purge.
    set_wal_retention(path, "full" if enable else "chroma")
    return {"path": os.fspath(path), "automatically_purge": not enable, "previous": previous}
