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

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from typing import Any

import numpy as np

from safechroma._env import private_env
from safechroma.storage.layout import (
    SQLITE_FILE,
    STATE_DIR,
    Progress,
    _fsync_dir,
    _stamp,
)
from safechroma.storage.reports import (
    CollectionRepair,
    CollectionSalvage,
    RepairReport,
    SqliteSalvage,
    record_losses,
)
from safechroma.storage.sqlite_assemble import _assemble, _unidentified
from safechroma.storage.sqlite_pages import (
    readable_copy,
)
from safechroma.storage.sqlite_rows import _read_all, _segment_dirs

__all__ = ["CollectionSalvage", "SqliteSalvage", "salvage_sqlite"]


# ---- building ---------------------------------------------------------------------------------

# The child that builds the new directory through chromadb, the only code of the salvage that
# imports it; started by module name (storage/ never imports the jobs above it, issue 22).
_BUILD_JOB = "safechroma.jobs.build_sqlite"


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
        [python, "-m", _BUILD_JOB, mf, new_dir], capture_output=True, text=True, env=env
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
) -> RepairReport:
    """:func:`salvage_sqlite` as a :class:`~safechroma.storage.reports.RepairReport`.

    What :func:`~safechroma.storage.recovery.repair_directory` returns for a damaged
    ``chroma.sqlite3``: each collection's ``salvaged`` counts the records rebuilt with their
    vector, ``not_recovered`` names the records with no vector anywhere;
    ``incomplete_records`` and ``losses_file`` count and list every record that did not come
    back whole; a repair that left any behind records that in ``.safechroma/losses.json``
    (:func:`~safechroma.storage.recovery.record_losses`).
    """
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
