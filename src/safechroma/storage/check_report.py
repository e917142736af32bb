"""What a check of a persist directory returns: one verdict per directory and per collection.

:class:`DirectoryReport` holds the directory's status (see :mod:`~safechroma.storage.validate`
for what each verdict means), its findings and one :class:`CollectionReport` per collection.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from safechroma.storage.hnsw import (
    Finding,
    SegmentReport,
)

Status = Literal["healthy", "damaged", "unknown", "incompatible"]


@dataclass
class CollectionReport:
    """Verdict for one collection.

    Attributes:
        id: Collection uuid.
        name: Collection name (``None`` when SQLite could not be read).
        status: ``"healthy"``, ``"damaged"`` or ``"unknown"``.
        space: Distance space: ``"l2"``, ``"cosine"`` or ``"ip"``.
        dimension: Dimension recorded in SQLite (``None`` before the first add).
        max_neighbors: HNSW ``M`` from the collection's configuration (default 16).
        segment_id: Vector segment uuid (its directory name).
        segment_path: The vector segment directory, whether or not it exists.
        metadata_segment_id: Metadata segment uuid (records live in SQLite under it).
        records: Records in the metadata segment (``None`` when unknown).
        index_max_seq_id: Last WAL sequence id flushed to the HNSW files (0 if never).
        metadata_max_seq_id: Last sequence id applied to the metadata segment.
        wal_rows: Rows of this collection still in ``embeddings_queue``.
        wal_min_seq_id: Oldest of them, or ``None``.
        wal_uncovered: Live records with no vector in the WAL: what a rebuild from the WAL
            alone would lose (computed when the index is damaged or missing, or on request).
        hnsw: The segment check, or ``None`` when the directory is missing.
        findings: Everything found, errors first.
    """

    id: str
    name: str | None = None
    status: Status = "healthy"
    space: str = "l2"
    dimension: int | None = None
    max_neighbors: int = 16
    segment_id: str | None = None
    segment_path: str | None = None
    metadata_segment_id: str | None = None
    records: int | None = None
    index_max_seq_id: int = 0
    metadata_max_seq_id: int | None = None
    wal_rows: int = 0
    wal_min_seq_id: int | None = None
    wal_uncovered: int | None = None
    hnsw: SegmentReport | None = None
    findings: list[Finding] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        """True when the status is ``"healthy"``."""
        return self.status == "healthy"

    @property
    def wal_covers_all(self) -> bool | None:
        """Whether the WAL alone can rebuild the whole index (``None``: not computed)."""
        return None if self.wal_uncovered is None else self.wal_uncovered == 0

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict."""
        return {
            "id": self.id,
            "name": self.name,
            "status": self.status,
            "space": self.space,
            "dimension": self.dimension,
            "max_neighbors": self.max_neighbors,
            "segment_id": self.segment_id,
            "segment_path": self.segment_path,
            "metadata_segment_id": self.metadata_segment_id,
            "records": self.records,
            "index_max_seq_id": self.index_max_seq_id,
            "metadata_max_seq_id": self.metadata_max_seq_id,
            "wal_rows": self.wal_rows,
            "wal_min_seq_id": self.wal_min_seq_id,
            "wal_uncovered": self.wal_uncovered,
            "wal_covers_all": self.wal_covers_all,
            "hnsw": self.hnsw.to_dict() if self.hnsw else None,
            "findings": [f.to_dict() for f in self.findings],
        }


@dataclass
class DirectoryReport:
    """Verdict for a whole persist directory.

    Attributes:
        path: The persist directory.
        status: ``"healthy"``, ``"damaged"`` or ``"unknown"``.
        collections: One report per collection.
        findings: Directory-level findings (SQLite, orphan segments, ...).
        sqlite_status: ``"ok"``, ``"corrupt"``, ``"busy"``, ``"missing"``, ``"unknown"`` or
            ``"incompatible"`` (written by a newer chromadb; collections not checked).
        wal_purge: Chroma's ``automatically_purge`` setting (``None`` when unreadable).
        elapsed_s: Wall time of the check.
        incompatibility: For ``"incompatible"``: ``installed_chromadb`` (version),
            ``unknown_migrations`` (``"dir version filename"`` each), ``directory_schema`` and
            ``installed_schema`` (highest migration per dir, as far as known).
    """

    path: str
    status: Status = "healthy"
    collections: list[CollectionReport] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    sqlite_status: str = "ok"
    wal_purge: bool | None = None
    elapsed_s: float = 0.0
    incompatibility: dict[str, Any] | None = None

    @property
    def healthy(self) -> bool:
        """True when the status is ``"healthy"``."""
        return self.status == "healthy"

    @property
    def damaged_collections(self) -> list[CollectionReport]:
        """Collections whose status is ``"damaged"``."""
        return [c for c in self.collections if c.status == "damaged"]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict."""
        return {
            "path": self.path,
            "status": self.status,
            "healthy": self.healthy,
            "sqlite_status": self.sqlite_status,
            "wal_purge": self.wal_purge,
            "elapsed_s": round(self.elapsed_s, 6),
            "incompatibility": self.incompatibility,
            "findings": [f.to_dict() for f in self.findings],
            "collections": [c.to_dict() for c in self.collections],
        }
