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
"""

from __future__ import annotations

import bisect
import datetime as _dt
import json
import os
import shutil
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import numpy as np

from safechroma.storage.hnsw import (
    PICKLE_FILE,
    LiveElements,
    read_index_metadata,
    read_label_map,
    read_live_elements,
    salvage_vectors,
)
from safechroma.storage.validate import (
    SQLITE_FILE,
    CollectionReport,
    DirectoryReport,
    _seq,
    check_directory,
)
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

STATE_DIR = ".safechroma"
Progress = Callable[[str, dict[str, Any]], None]


@dataclass
class CollectionRepair:
    """What repair did for one damaged collection.

    Attributes:
        collection_id: Collection uuid.
        name: Collection name.
        segment_id: The damaged vector segment.
        reasons: Codes of the error findings that made it damaged.
        action: ``"quarantine"`` (index moved aside, Chroma rebuilds it), ``"none"``.
        wal_covers_all: The WAL alone rebuilds every record (no salvage needed).
        records: Live records in SQLite.
        salvaged: Vectors written to the salvage file.
        not_recovered: Ids whose vector exists nowhere (re-embed from their documents).
        salvage_file: The ``.npz`` file, or ``None`` when nothing needed salvaging.
        quarantined_to: Where the damaged directory went.
        label_map: How the labels of the damaged index were mapped to ids (see
            :class:`LabelMapRebuild`), or ``None`` when the segment's own pickle did it.
        incomplete_records: Records of this collection that did not come back whole (see
            :attr:`RepairReport.incomplete_records`).
    """

    collection_id: str
    name: str | None
    segment_id: str | None
    reasons: list[str]
    action: str = "none"
    wal_covers_all: bool | None = None
    records: int | None = None
    salvaged: int = 0
    not_recovered: list[str] = field(default_factory=list)
    salvage_file: str | None = None
    quarantined_to: str | None = None
    label_map: dict[str, Any] | None = None
    incomplete_records: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict."""
        return asdict(self)


@dataclass
class RepairReport:
    """What :func:`repair_directory` found and did.

    Attributes:
        path: The persist directory.
        status: ``"nothing_to_do"``, ``"planned"`` (dry run), ``"repaired"`` (files moved,
            salvage pending), or ``"not_repairable"`` (see ``message``).
        message: One line for a person.
        dry_run: Nothing was changed.
        backup_dir: The backup folder (``None`` when nothing was backed up).
        collections: One entry per damaged collection.
        salvage_files: Files :func:`apply_salvage` must still apply.
        steps: Log of the steps done, in order.
        incomplete_records: Records that did not come back whole (without their vector,
            document or metadata, or not at all); 0 means every record known to have existed
            came back whole. Counted by the ``chroma.sqlite3`` salvage (issue 21).
        losses_file: The JSON file beside the backup that names each of them and what it
            lacks (``None`` when nothing is incomplete); also recorded in
            ``<path>/.safechroma/losses.json`` until acknowledged (:func:`unacknowledged_losses`,
            :func:`acknowledge_losses`).
    """

    path: str
    status: str = "nothing_to_do"
    message: str = ""
    dry_run: bool = False
    backup_dir: str | None = None
    collections: list[CollectionRepair] = field(default_factory=list)
    salvage_files: list[str] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)
    incomplete_records: int = 0
    losses_file: str | None = None

    @property
    def not_recovered(self) -> list[str]:
        """All ids whose vectors could not be salvaged."""
        return [i for c in self.collections for i in c.not_recovered]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict."""
        d = asdict(self)
        d["not_recovered_count"] = len(self.not_recovered)
        return d


def _stamp() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: str, data: bytes) -> None:
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# Issue 21: a repair that could not bring every record back whole says so until a person
# acknowledges it, so `safechroma check` after it is not "healthy" and the backup holding what
# is left of those records is not cleaned up by someone who believed a plain "repaired".
LOSSES_MARKER = "losses.json"


def record_losses(
    path: str | os.PathLike[str],
    losses_file: str,
    count: int,
    *,
    collections: Sequence[str] = (),
) -> str:
    """Record in ``<path>/.safechroma/losses.json`` that a repair left ``count`` records
    incomplete (and ``collections`` without their name or configuration), listed in
    ``losses_file``; earlier unacknowledged entries are kept.

    Returns:
        The marker's path.
    """
    root = os.fspath(path)
    marker = os.path.join(root, STATE_DIR, LOSSES_MARKER)
    prior = unacknowledged_losses(root) or {}
    entry = {"at": _stamp(), "count": count, "file": losses_file, "collections": list(collections)}
    repairs = [*prior.get("repairs", []), entry]
    doc = {
        "count": sum(int(r.get("count", 0)) for r in repairs),
        "collections": sorted({c for r in repairs for c in r.get("collections", [])}),
        "files": [r["file"] for r in repairs],
        "repairs": repairs,
        "acknowledge": f"safechroma check {root} --ack-losses",
    }
    os.makedirs(os.path.dirname(marker), exist_ok=True)
    _write_atomic(marker, json.dumps(doc, indent=1).encode())
    return marker


def unacknowledged_losses(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The losses marker of ``path`` (``count``, ``files``, ``repairs``), or ``None``.

    A marker that cannot be read still counts: ``{"count": None, "error": ...}``.
    """
    marker = os.path.join(os.fspath(path), STATE_DIR, LOSSES_MARKER)
    if not os.path.exists(marker):
        return None
    try:
        with open(marker, "rb") as f:
            doc = json.loads(f.read())
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        return {"count": None, "files": [], "repairs": [], "error": f"{marker}: {e}"}
    doc["marker"] = marker
    return doc


def acknowledge_losses(path: str | os.PathLike[str]) -> str | None:
    """Acknowledge the recorded losses: the marker is renamed (kept, never deleted) to
    ``losses-acknowledged-<stamp>.json``.

    Returns:
        The renamed marker, or ``None`` when there was none.
    """
    state = os.path.join(os.fspath(path), STATE_DIR)
    marker = os.path.join(state, LOSSES_MARKER)
    if not os.path.exists(marker):
        return None
    dest = os.path.join(state, f"losses-acknowledged-{_stamp()}.json")
    os.rename(marker, dest)
    _fsync_dir(state)
    return dest


def roll_back_hot_journal(path: str | os.PathLike[str]) -> str | None:
    """Play back a hot ``chroma.sqlite3-journal`` after backing both files up.

    A writer killed inside a transaction leaves its changes half in ``chroma.sqlite3`` and the
    pages as they were in the journal; SQLite undoes it on the next read-write open (Chroma
    does so on its first call), but a read-only check cannot ("attempt to write a readonly
    database") and so cannot judge the file (issue 21). The caller must own the directory.

    Returns:
        The backup folder, or ``None`` when there was no hot journal.
    """
    from safechroma.storage.sqlite_pages import is_hot_journal

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


def _ro(db: str) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{os.path.abspath(db)}?mode=ro", uri=True, timeout=5.0)


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
    from safechroma.storage.journal import fill, has_journal

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
        from safechroma.storage.sqlite_salvage import repair_sqlite

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


@dataclass
class LabelMapRebuild:
    """A label map rebuilt from the metadata segment, with what proves it.

    Attributes:
        label_to_id: Every proven ``label -> id`` of a live element (known maps included).
        proven: Every live label on disk is mapped.
        live_labels: Live, intact elements on disk.
        known: Labels taken from a map that survived (the pickle's readable part, the
            snapshot safechroma keeps).
        paired: Labels mapped by pairing the collection's ``embeddings`` rows (by rowid)
            with the live labels (ascending).
        checked_against_wal: Pairs whose vector the WAL confirmed exactly.
        unproven: Why the labels that stay unmapped could not be proven.
    """

    label_to_id: dict[int, str]
    proven: bool = False
    live_labels: int = 0
    known: int = 0
    paired: int = 0
    checked_against_wal: int = 0
    unproven: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict (the map itself is left out: it can be large)."""
        d = asdict(self)
        del d["label_to_id"]
        d["mapped"] = len(self.label_to_id)
        return d


def _same_vector(stored: np.ndarray, wal: np.ndarray, space: str) -> bool:
    """Whether an index element holds exactly the vector a WAL row wrote."""
    if stored.shape != wal.shape:
        return False
    if space == "cosine":
        n = float(np.linalg.norm(wal))
        if not n > 0:
            return False
        wal = wal / n
    return bool(np.allclose(stored, wal, rtol=1e-5, atol=1e-6))


def _matches_wal(
    stored: np.ndarray,
    ops: list[tuple[int, int, np.ndarray | None]],
    cur_seq: int,
    v_seq: int,
    space: str,
) -> bool | None:
    """Whether an element holds the last vector a live id's WAL writes after V left it with.

    Whether the id existed at V is unknown, so both cases are replayed with Chroma's rules
    (an ``add`` of a present id is ignored, an ``update`` of an absent one too); a case counts
    only if the last write it applies is the one the metadata segment recorded
    (``embeddings.seq_id``). Returns ``None`` when some consistent case applies no vector after
    V (the element then holds an older vector nothing can check), else whether it matches.
    """
    verdicts: list[bool] = []
    for present in (True, False):
        last_seq: int | None = None
        last_vec: np.ndarray | None = None
        for seq, op, vec in ops:
            applied = op == 2 or (op == 0 and not present) or (op in (1, 3) and present)
            if not applied:
                continue
            last_seq = seq
            if op == 3:
                present, last_vec = False, None
            else:
                present = True
                if vec is not None:
                    last_vec = vec
        if not present:
            continue
        if (last_seq if last_seq is not None else -1) != cur_seq and not (
            last_seq is None and cur_seq <= v_seq
        ):
            continue
        if last_vec is None:
            return None
        verdicts.append(_same_vector(stored, last_vec, space))
    if not verdicts:
        return False
    return any(verdicts)


def rebuild_label_map(
    path: str | os.PathLike[str],
    con: sqlite3.Connection,
    c: CollectionReport,
    elements: LiveElements,
) -> LabelMapRebuild:
    """Rebuild ``label -> id`` of a damaged index from SQLite, and map only what is proven.

    The facts (chromadb 1.5.9, ``rust/segment/src/local_hnsw.rs`` ``apply_log_chunk``; FACTS
    §3 "Labels"): each newly created id takes the next label (``total_elements_added + 1``),
    in log order; update and upsert keep it; a delete flags the element and the label is never
    given again; a re-added id gets a new one. The metadata segment creates the collection's
    ``embeddings`` row in the same order, so the rowid order of the live rows is the label order
    of the ids they name. The flushed index is the state at some sequence id ``T`` at or past
    the vector segment's recorded ``max_seq_id`` ``V``; every write after ``V`` is still in the
    WAL (Chroma purges below ``V`` only).

    Proof, segment by segment between labels whose id is known for certain (from the readable
    part of the pickle, or the snapshot :func:`snapshot_label_maps` keeps: labels are never
    reassigned, so an older map is right for every live label it has):

    * between two known labels (and before the first), the live rows and the live labels must
      be equally many: every such row existed at ``T`` (it is older than a known element), so
      the only possible difference is an id the index still has and SQLite deleted after
      ``T``, which makes the counts differ;
    * after the last known label, rows created after ``T`` follow the rest. The labels pair
      with the first rows; the rows left over must each have been created by a WAL write after
      ``V``. If an id with an unknown label was deleted after ``V``, its label might still be
      live (deleted after ``T``) and shift the pairing, so then every pair whose id has a vector
      written after ``V`` must hold that vector (a shifted pair holds another record's);
    * everywhere, a pair whose current write is a WAL row at or below ``V`` must hold exactly
      that row's vector.

    A segment that fails stays unmapped (its records are named, never guessed).

    Args:
        path: The persist directory (for the label-map snapshot).
        con: A read-only connection to its ``chroma.sqlite3``.
        c: The collection's report (segment ids, space, ``index_max_seq_id``).
        elements: The live elements of the damaged index (:func:`read_live_elements`).

    Returns:
        A :class:`LabelMapRebuild`.
    """
    root = os.fspath(path)
    labels = [int(x) for x in elements.labels.tolist()]
    pos = {lab: i for i, lab in enumerate(labels)}
    out = LabelMapRebuild(label_to_id={}, live_labels=len(labels))
    if not labels:
        out.proven = True
        return out
    meta_seg = c.metadata_segment_id or ""
    v_seq = int(c.index_max_seq_id or 0)
    rows: list[tuple[int, str, int]] = [
        (int(r[0]), str(r[1]), _seq(r[2]))
        for r in con.execute(
            "SELECT id, embedding_id, seq_id FROM embeddings WHERE segment_id = ? ORDER BY id",
            (meta_seg,),
        )
    ]
    row_of = {ident: k for k, (_rid, ident, _s) in enumerate(rows)}
    # The WAL after V, per id: (seq, op, vector or None).
    wal: dict[str, list[tuple[int, int, np.ndarray | None]]] = {}
    current: dict[str, np.ndarray] = {}
    cur_seq = {ident: sq for _r, ident, sq in rows}
    for seq, ident, op, blob, enc in con.execute(
        "SELECT seq_id, id, operation, vector, encoding FROM embeddings_queue WHERE topic LIKE ? "
        "ORDER BY seq_id",
        ("%/" + c.id,),
    ):
        seq = _seq(seq)
        vec = None
        if blob is not None and (enc or "FLOAT32").upper() == "FLOAT32":
            vec = np.frombuffer(blob, dtype="<f4").astype(np.float32)
        if cur_seq.get(ident) == seq and vec is not None and op in (0, 1, 2) and seq <= v_seq:
            current[ident] = vec
        if seq > v_seq:
            wal.setdefault(ident, []).append((seq, int(op), vec))
    deleted_after = {i for i, ops in wal.items() if any(op == 3 for _s, op, _v in ops)}

    # Known labels: the readable part of the pickle, then the snapshot.
    known: dict[int, str] = {}
    conflict: set[int] = set()
    for src in (
        os.path.join(c.segment_path or "", PICKLE_FILE),
        _label_map_path(root, c.segment_id or ""),
    ):
        m = read_label_map(src) if os.path.isfile(src) else None
        for lab, ident in (m or {}).items():
            if lab in known and known[lab] != ident:
                conflict.add(lab)
            known.setdefault(lab, ident)
    for lab in conflict:
        known.pop(lab, None)
    anchors: list[tuple[int, int]] = []  # (label, row index), ascending label
    dead: set[int] = set()  # live labels whose id SQLite deleted after T
    for lab in sorted(known):
        if lab not in pos:
            continue  # deleted on disk, or beyond what survived
        ident = known[lab]
        if ident in row_of and ident not in deleted_after:
            anchors.append((lab, row_of[ident]))
        elif ident in deleted_after:
            dead.add(lab)  # live at T, deleted after: its current row (if any) is newer
        else:
            out.unproven.append(
                f"label {lab} maps to {ident!r}, which SQLite lacks without a later delete"
            )
            return out
    if any(b[1] <= a[1] for a, b in zip(anchors, anchors[1:], strict=False)):
        out.unproven.append("known labels are not in the order of their rows")
        return out
    mapped: dict[int, str] = {lab: rows[k][1] for lab, k in anchors}
    out.known = len(mapped)
    known_ids = set(known.values())
    anchor_rows = {k for _lab, k in anchors}
    dead_rows = {row_of[known[lab]] for lab in dead if known[lab] in row_of}

    def checked(lab: int, ident: str) -> bool | None:
        """The pair's vector against its current WAL row at or below V (None: no row)."""
        vec = current.get(ident)
        if vec is None:
            return None
        return _same_vector(elements.stored_of(pos[lab]), vec, c.space)

    bounds = anchors + [(labels[-1] + 1, len(rows))]
    prev_lab, prev_row = 0, -1
    for gi, (lab_b, row_b) in enumerate(bounds):
        tail = gi == len(bounds) - 1
        # labels is ascending: slice the gap instead of scanning it (many known labels make
        # many small gaps).
        lo, hi = bisect.bisect_right(labels, prev_lab), bisect.bisect_left(labels, lab_b)
        g_labels = [x for x in labels[lo:hi] if x not in dead and x not in mapped]
        g_rows = [
            k for k in range(prev_row + 1, row_b) if k not in anchor_rows and k not in dead_rows
        ]
        if not tail:
            ok = len(g_labels) == len(g_rows)
            if not ok:
                out.unproven.append(
                    f"labels {prev_lab}..{lab_b}: {len(g_labels)} live labels, {len(g_rows)} rows"
                )
        else:
            g_rows_all = g_rows + sorted(dead_rows)
            ok = len(g_labels) <= len(g_rows_all)
            if not ok:
                out.unproven.append(
                    f"labels after {prev_lab}: {len(g_labels)} live labels, only "
                    f"{len(g_rows_all)} rows (records deleted after the last flush)"
                )
            else:
                extra = g_rows_all[len(g_labels) :]
                created = [
                    k
                    for k in extra
                    if any(op in (0, 2) and v is not None for _s, op, v in wal.get(rows[k][1], []))
                ]
                if len(created) != len(extra):
                    ok = False
                    out.unproven.append(
                        f"labels after {prev_lab}: {len(extra) - len(created)} rows left over "
                        "that no WAL write after the last flush created"
                    )
                g_rows = g_rows_all[: len(g_labels)]
            if ok and (deleted_after - known_ids):
                # An id with an unknown label was deleted after V: if after T, its label is
                # still live and shifts the pairs. A shifted pair holds another record's vector.
                for lab, k in zip(g_labels, g_rows, strict=True):
                    ident = rows[k][1]
                    verdict = _matches_wal(
                        elements.stored_of(pos[lab]),
                        wal.get(ident, []),
                        cur_seq[ident],
                        v_seq,
                        c.space,
                    )
                    if verdict is None:
                        continue
                    if verdict:
                        out.checked_against_wal += 1
                        continue
                    ok = False
                    out.unproven.append(
                        f"labels after {prev_lab}: ids deleted after the last flush and the "
                        f"vector at label {lab} is not {ident!r}'s last write"
                    )
                    break
        if ok:
            pairs = list(zip(g_labels, g_rows, strict=True))
            for lab, k in pairs:
                verdict = checked(lab, rows[k][1])
                if verdict is False:
                    out.unproven.append(
                        f"label {lab}: the vector is not {rows[k][1]!r}'s current WAL row"
                    )
                    ok = False
                    break
                if verdict:
                    out.checked_against_wal += 1
            if ok:
                for lab, k in pairs:
                    mapped[lab] = rows[k][1]
                out.paired += len(pairs)
        prev_lab, prev_row = lab_b, row_b
    out.label_to_id = mapped
    out.proven = all(x in mapped for x in labels if x not in dead)
    return out


def _label_map_path(root: str, segment_id: str) -> str:
    return os.path.join(root, STATE_DIR, "labelmaps", f"{segment_id}.pickle")


def snapshot_label_maps(
    path: str | os.PathLike[str], report: DirectoryReport | None = None
) -> list[str]:
    """Keep a copy of each healthy index's label map (``index_metadata.pickle``).

    chromadb 1.5.9 rewrites the pickle in place (truncate, write, no fsync): a kill in between
    leaves it empty, and with the WAL purged every flushed record then has a vector on disk that
    nothing maps to its id (issue 7 soak: one torn pickle, 664 of 1000 records lost). Repair
    falls back to this copy (:func:`safechroma.storage.hnsw.salvage_vectors`): labels are never
    reassigned, so an older map is right for every label it has. Call it after a healthy check
    with the directory owned (the supervisor does, before a worker starts). Writes only under
    ``<path>/.safechroma/labelmaps``; a copy is refreshed only when the pickle changed.

    Returns:
        The copies written.
    """
    root = os.fspath(path)
    if report is None:
        report = check_directory(root, deep=False)
    written: list[str] = []
    for c in report.collections:
        if c.status != "healthy" or not c.segment_path or not c.segment_id:
            continue
        src = os.path.join(c.segment_path, PICKLE_FILE)
        dest = _label_map_path(root, c.segment_id)
        if not os.path.exists(src) and os.path.exists(dest):
            # A healthy index without a pickle is a fresh one (nothing flushed: FACTS §1), or
            # Chroma is about to start one: its labels restart at 1, so an older copy belongs
            # to an index that is gone and would map them to the wrong ids.
            os.remove(dest)
            continue
        try:
            st = os.stat(src)
            old = os.stat(dest) if os.path.exists(dest) else None
            if old is not None and (old.st_size, old.st_mtime_ns) == (st.st_size, st.st_mtime_ns):
                continue
            with open(src, "rb") as f:
                data = f.read()
            read_index_metadata(src)  # never keep a copy that does not parse
        except Exception:  # noqa: BLE001 - no pickle yet, or unreadable: keep the last good copy
            continue
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        _write_atomic(dest, data)
        os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns))
        written.append(dest)
    return written


def pending_salvage_files(path: str | os.PathLike[str]) -> list[str]:
    """Salvage files under ``<path>/.safechroma/backups`` not yet applied (oldest first)."""
    backups = os.path.join(os.fspath(path), STATE_DIR, "backups")
    out: list[str] = []
    if not os.path.isdir(backups):
        return out
    for stamp in sorted(os.listdir(backups)):
        d = os.path.join(backups, stamp)
        if stamp.endswith(".partial") or not os.path.isdir(d):
            continue
        for name in sorted(os.listdir(d)):
            f = os.path.join(d, name)
            if (
                name.startswith("salvage-")
                and name.endswith(".npz")
                and not os.path.exists(f + ".applied")
            ):
                out.append(f)
    return out


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


# -- records whose vectors exist nowhere: put them back with an embedding function ----------

EmbedFn = Callable[[list[str]], Sequence[Sequence[float]]]
# Relative error allowed between a stored vector and the same document embedded again
# (float32 round trips and thread-count-dependent sums differ in the last bits).
_REEMBED_RTOL = 1e-4


def _or_empty(x: Any) -> Any:
    """``x``, or ``[]`` for ``None`` (chromadb returns embeddings as a numpy array)."""
    return [] if x is None else x


def check_embedding_function(
    col: Any,
    embed: EmbedFn,
    *,
    space: str = "l2",
    sample: int = 16,
    exclude: Sequence[str] = (),
) -> str | None:
    """Check that ``embed`` reproduces vectors the collection still has.

    Embeds the documents of up to ``sample`` live records that have a document and a vector
    (ids in ``exclude``, whose vectors Chroma cannot find, are skipped) and compares them (for
    cosine, the directions). Returns ``None`` when they match, else why not (also when no
    record can be checked: an unchecked function is never used).
    """
    skip = set(exclude)
    try:
        ids = [i for i in col.get(include=[], limit=max(64, 4 * sample) + len(skip))["ids"]]
        ids = [i for i in ids if i not in skip][: 4 * sample]
        got = col.get(ids=ids, include=["documents", "embeddings"]) if ids else {}
    except Exception as exc:  # noqa: BLE001 - e.g. "Error finding id": nothing to check with
        return f"cannot read surviving records to check the function: {exc}"
    pairs = [
        (d, np.asarray(e, dtype=np.float64))
        for d, e in zip(
            _or_empty(got.get("documents")), _or_empty(got.get("embeddings")), strict=False
        )
        if d is not None and e is not None
    ][:sample]
    if not pairs:
        return "no surviving record with a document and a vector to check the function against"
    try:
        new = np.asarray(embed([d for d, _ in pairs]), dtype=np.float64)
    except Exception as exc:  # noqa: BLE001 - the caller's function failed: say so
        return f"the embedding function failed: {type(exc).__name__}: {exc}"
    if new.shape != (len(pairs), pairs[0][1].size):
        want = (len(pairs), pairs[0][1].size)
        return f"the embedding function returned shape {new.shape}, expected {want}"
    for (doc, old), v in zip(pairs, new, strict=True):
        a, b = (v / np.linalg.norm(v), old / np.linalg.norm(old)) if space == "cosine" else (v, old)
        scale = max(float(np.linalg.norm(b)), 1e-12)
        if float(np.linalg.norm(a - b)) > _REEMBED_RTOL * scale:
            return f"the embedding function does not reproduce the stored vector of {doc[:40]!r}"
    return None


def saved_records(path: str | os.PathLike[str], collection: str | None = None) -> list[str]:
    """``.removed.json`` files of ``path`` (records saved by a repair) not yet fully restored."""
    backups = os.path.join(os.fspath(path), STATE_DIR, "backups")
    out: list[str] = []
    if not os.path.isdir(backups):
        return out
    for stamp in sorted(os.listdir(backups)):
        d = os.path.join(backups, stamp)
        if stamp.endswith(".partial") or not os.path.isdir(d):
            continue
        for name in sorted(os.listdir(d)):
            if not name.endswith(".npz.removed.json"):
                continue
            f = os.path.join(d, name)
            if os.path.exists(f + ".restored"):
                with open(f + ".restored", "rb") as fh:
                    if not json.loads(fh.read()).get("remaining"):
                        continue
            if collection is not None:
                with open(f[: -len(".npz.removed.json")] + ".json", "rb") as fh:
                    if json.loads(fh.read()).get("name") != collection:
                        continue
            out.append(f)
    return out


def recorded_embedding_function(
    path: str | os.PathLike[str], collection: str
) -> dict[str, Any] | None:
    """The embedding function ``collections.schema_str`` records for ``collection``.

    ``None`` when the collection was created with ``embedding_function=None`` (chromadb then
    still *reports* its default function when the collection is opened: FACTS §3, so only this
    raw record tells) or records a ``legacy``/``unknown`` one that cannot be rebuilt.
    """
    con = _ro(os.path.join(os.fspath(path), SQLITE_FILE))
    try:
        row = con.execute(
            "SELECT schema_str FROM collections WHERE name = ?", (collection,)
        ).fetchone()
    finally:
        con.close()
    if row is None or not row[0]:
        return None
    try:
        ef = json.loads(row[0])["keys"]["#embedding"]["float_list"]["vector_index"]["config"].get(
            "embedding_function"
        )
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(ef, dict) or ef.get("type") != "known" or not ef.get("name"):
        return None
    return ef


def _build_recorded(record: dict[str, Any]) -> EmbedFn:
    """Build a recorded, known embedding function, offline only (no model download)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    name = str(record["name"])
    if name in ("default", "onnx_mini_lm_l6_v2"):
        from chromadb.utils.embedding_functions.onnx_mini_lm_l6_v2 import ONNXMiniLM_L6_V2

        model = os.path.join(
            str(ONNXMiniLM_L6_V2.DOWNLOAD_PATH), ONNXMiniLM_L6_V2.EXTRACTED_FOLDER_NAME
        )
        if not os.path.isdir(model):
            raise LookupError(
                f"the collection's embedding function {name!r} needs a model that is not on this "
                f"machine ({model}); pass one that works offline"
            )
    from chromadb.utils.embedding_functions import known_embedding_functions

    if name not in known_embedding_functions:
        raise LookupError(f"the collection's embedding function {name!r} is not registered here")
    fn: Any = known_embedding_functions[name].build_from_config(record.get("config") or {})
    return cast(EmbedFn, fn)


def load_embedding_function(spec: str | EmbedFn) -> EmbedFn:
    """``module:name`` (a function, or a class instantiated without arguments) or a callable."""
    if callable(spec):
        return spec
    module, _, name = str(spec).partition(":")
    if not module or not name:
        raise ValueError(f"expected module:name, got {spec!r}")
    import importlib

    obj = getattr(importlib.import_module(module), name)
    if isinstance(obj, type):
        obj = obj()
    if not callable(obj):
        raise TypeError(f"{spec} is not callable")
    fn: EmbedFn = obj
    return fn


def restore_saved_records(
    client: Any,
    path: str,
    collection: str,
    embedding_function: str | EmbedFn | None = None,
    *,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Put back the records a repair saved (their vectors existed nowhere), re-embedded.

    Run it in the process that owns the directory (the CLI runs it in a child; :func:`reembed`
    in the SafeClient worker). The function is ``embedding_function`` when given, else the one
    the collection's record names (only a known function that works offline; never chromadb's
    reported default for a collection that never had one), and it is used only after it
    reproduced vectors that survived (:func:`check_embedding_function`). Ids the collection has
    again (the application re-added them) are left alone; records without a document cannot be
    re-embedded and stay saved.

    Returns:
        ``{"collection", "restored", "already_present", "remaining", "files", "error"}``;
        ``error`` is ``None`` or why nothing was restored.
    """
    out: dict[str, Any] = {
        "collection": collection,
        "restored": [],
        "already_present": [],
        "remaining": [],
        "files": [],
        "error": None,
    }
    files = saved_records(path, collection)
    out["files"] = files
    if not files:
        return out
    try:
        if embedding_function is None:
            record = recorded_embedding_function(path, collection)
            if record is None:
                raise LookupError(
                    f"collection {collection!r} records no embedding function it can be rebuilt "
                    "from (created with embedding_function=None or a legacy one); pass one"
                )
            embed = _build_recorded(record)
        else:
            embed = load_embedding_function(embedding_function)
    except Exception as exc:  # noqa: BLE001 - reported; nothing is changed
        out["error"] = f"{type(exc).__name__}: {exc}"
        return out
    col = client.get_collection(collection)
    space = "l2"
    for f in files:
        with open(f[: -len(".npz.removed.json")] + ".json", "rb") as fh:
            space = json.loads(fh.read()).get("space") or space
    why = check_embedding_function(col, embed, space=space)
    if why is not None:
        out["error"] = why
        return out
    for f in files:
        with open(f, "rb") as fh:
            saved = [r for r in json.loads(fh.read()) if isinstance(r, dict) and "id" in r]
        done: set[str] = set()
        if os.path.exists(f + ".restored"):
            with open(f + ".restored", "rb") as fh:
                done = set(json.loads(fh.read()).get("restored_ids") or [])
        todo = [r for r in saved if r["id"] not in done]
        restored: list[str] = []
        remaining: list[str] = []
        for s in range(0, len(todo), batch_size):
            chunk = todo[s : s + batch_size]
            present = set(col.get(ids=[r["id"] for r in chunk], include=[])["ids"])
            out["already_present"] += [r["id"] for r in chunk if r["id"] in present]
            ready = [r for r in chunk if r["id"] not in present and r.get("document") is not None]
            remaining += [
                r["id"] for r in chunk if r["id"] not in present and r.get("document") is None
            ]
            if not ready:
                continue
            vecs = np.asarray(embed([r["document"] for r in ready]), dtype=np.float32)
            with_meta = [k for k, r in enumerate(ready) if r.get("metadata")]
            without = [k for k, r in enumerate(ready) if not r.get("metadata")]
            for group, metas in ((with_meta, True), (without, False)):
                if not group:
                    continue
                col.add(
                    ids=[ready[k]["id"] for k in group],
                    embeddings=vecs[group],
                    documents=[ready[k]["document"] for k in group],
                    metadatas=[ready[k]["metadata"] for k in group] if metas else None,
                )
            restored += [r["id"] for r in ready]
        out["restored"] += restored
        out["remaining"] += remaining
        _write_atomic(
            f + ".restored",
            json.dumps(
                {"restored_ids": sorted(done | set(restored)), "remaining": remaining}
            ).encode(),
        )
    return out
