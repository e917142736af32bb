"""What a repair returns, and the record of losses that outlives it.

:class:`RepairReport` (with one :class:`CollectionRepair` per damaged collection) is what
:func:`~safechroma.storage.recovery.repair_directory` and the ``chroma.sqlite3`` salvage return.
When a repair could not bring every record back whole, :func:`record_losses` writes
``<path>/.safechroma/losses.json``, which stays until a person acknowledges it (issue 21).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from safechroma.storage.layout import (
    LOSSES_MARKER,
    STATE_DIR,
    _fsync_dir,
    _stamp,
    _write_atomic,
)


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
