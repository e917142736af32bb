"""The write journal: a copy of every acknowledged write that does not live in chroma.sqlite3.

Issue 21: a directory written through ``SafeClient`` kept its second copy of every vector (the
retained WAL, :mod:`safechroma.storage.wal`) inside ``chroma.sqlite3``, beside the documents and
metadata, so damage to that one file took both copies at once. The journal keeps the records
apart from the file they protect, in the manner of Litestream:

* ``<path>/.safechroma/journal/seg-<n>.log``: append-only segment files. The worker appends one
  record per write (``add``, ``upsert``, ``update``, ``delete``, collection changes) with one
  ``write`` on an ``O_APPEND`` descriptor *before* Chroma is called, then ``fdatasync`` in a
  thread of its own *while* Chroma commits the write (Chroma's own commit syncs too; ~3-4 ms
  each on this machine; both release the GIL: the caller waits for the slower, not the sum),
  and replies only once both are done: an acknowledged write is in the journal, and so is every
  write Chroma committed, even when the worker dies before it replies (the record was in the
  page cache before Chroma began; a record written *beside* Chroma's commit once lagged it, and
  a repair then deleted again a record that an upsert of unknown outcome had re-created, so
  the upsert came back applied to some of its ids only). A write Chroma refused is voided by
  an ``abort`` record appended right after it. So the journal can hold more than Chroma
  committed only in one place: the last record of a segment whose worker died during that
  write. :func:`settle` decides that record from Chroma's WAL before the next worker starts,
  and voids it when Chroma never committed it. A lock held across Chroma's write and its record
  keeps the records in Chroma's order. A writer starts a new segment (it never appends after
  a torn tail).
* A record: a fixed header ``<4sIII`` (magic, JSON header length, body length, crc32 of the
  lengths, the JSON header and the body), a JSON header (op, collection, ids, documents,
  metadatas, dim; JSON only: this file is untrusted and never unpickled) and a body of raw
  little-endian float32 vectors (Chroma stores float32, so the copy is exact).
* :func:`read_records` stops a segment at its first torn or bad-checksum record (a crash
  mid-append) and reports it; :func:`replay` folds the records into each collection's live
  records, with Chroma's semantics (``add`` of a live id is ignored, ``update`` of an absent id
  is ignored, ``upsert``/``update`` merge metadata keys and a ``None`` value removes a key);
  :func:`compact` rewrites the journal as one record per live record (disk ~ the raw records).

Turned off per worker with ``SafeClient(path, journal=False)``, and for a directory whose WAL
retention mode is ``"chroma"`` (``set_wal_retention(path, "chroma")``: no second copy wanted).

This module is pure: it imports no chromadb and nothing of safechroma's api or runtime.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
import threading
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from safechroma.storage.journal_wal import (
    CHROMA_OPS,
    chroma_dropped,
    chroma_logged,
    roll_back_if_hot,
)
from safechroma.storage.layout import STATE_DIR, _fsync_dir

__all__ = [
    "JOURNAL_DIR",
    "CollectionState",
    "Journal",
    "ReadReport",
    "compact",
    "has_journal",
    "journal_bytes",
    "journal_dir",
    "read_records",
    "replay",
    "settle",
]

JOURNAL_DIR = "journal"
MAGIC = b"SCJ1"
_HEAD = struct.Struct("<4sIII")  # magic, JSON header length, body length, crc32
_LENGTHS = struct.Struct("<II")
# A writer rolls to a new segment past this size, so compaction and reads stay bounded.
SEGMENT_BYTES = 256 << 20
_MAX_HEADER = 1 << 30  # a header length beyond this is damage, not a record
_SPARSE = "__safechroma_sparse__"


def journal_dir(path: str | os.PathLike[str]) -> str:
    """``<path>/.safechroma/journal``."""
    return os.path.join(os.fspath(path), STATE_DIR, JOURNAL_DIR)


def _segments(path: str | os.PathLike[str]) -> list[str]:
    d = journal_dir(path)
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return []
    segs = [n for n in names if n.startswith("seg-") and n.endswith(".log")]
    return [os.path.join(d, n) for n in sorted(segs, key=_segment_number)]


def _segment_number(name: str) -> int:
    try:
        return int(os.path.basename(name)[4:-4])
    except ValueError:
        return -1


def journal_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes held by the journal's segments."""
    return sum(os.path.getsize(s) for s in _segments(path))


def _json_default(value: Any) -> Any:
    # chromadb's SparseVector metadata values: kept as a tagged dict (no pickle, ever).
    if hasattr(value, "indices") and hasattr(value, "values"):
        return {
            _SPARSE: {
                "indices": list(value.indices),
                "values": [float(v) for v in value.values],
                "labels": list(getattr(value, "labels", None) or []) or None,
            }
        }
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot journal a {type(value).__name__}")


def encode(header: dict[str, Any], vectors: np.ndarray | None = None) -> bytes:
    """One journal record: fixed header, JSON header, float32 vectors."""
    head = json.dumps(header, separators=(",", ":"), default=_json_default).encode()
    body = b"" if vectors is None else np.ascontiguousarray(vectors, dtype="<f4").tobytes()
    lengths = _LENGTHS.pack(len(head), len(body))
    crc = zlib.crc32(body, zlib.crc32(head, zlib.crc32(lengths)))
    return _HEAD.pack(MAGIC, len(head), len(body), crc) + head + body


def _datasync(fd: int) -> None:
    getattr(os, "fdatasync", os.fsync)(fd)  # macOS and Windows: no fdatasync


def _vectors(embeddings: Any) -> tuple[np.ndarray | None, int | None]:
    if embeddings is None:
        return None, None
    if isinstance(embeddings, np.ndarray):
        arr = embeddings.astype("<f4", copy=False)
    else:
        rows = list(embeddings)
        if not rows:
            return None, None
        arr = np.asarray(rows, dtype="<f4")
    if arr.ndim != 2:
        return None, None
    return arr, int(arr.shape[1])


class Journal:
    """The appending side, one per worker (thread-safe).

    Args:
        path: The persist directory.
        segment_bytes: Roll to a new segment past this size.
    """

    def __init__(self, path: str | os.PathLike[str], *, segment_bytes: int = SEGMENT_BYTES):
        self.path = os.fspath(path)
        self.dir = journal_dir(path)
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._size = 0
        self.announced: set[str] = set()  # collections with a collection record in this session
        # Held by the worker across Chroma's write and its journal record, so that records are
        # in the order Chroma applied them (Chroma serializes its writes anyway: one SQLite
        # writer).
        self.order = threading.RLock()
        self._seq = itertools.count(1)
        self._pool: ThreadPoolExecutor | None = None

    def _open_segment(self) -> int:
        # Always a new segment: a writer never appends after a torn tail that the reader would
        # stop at (the bytes after it would be unreadable).
        os.makedirs(self.dir, exist_ok=True)
        last = max((_segment_number(s) for s in _segments(self.path)), default=0)
        n = last + 1
        while True:
            name = os.path.join(self.dir, f"seg-{n:08d}.log")
            try:
                fd = os.open(name, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
                break
            except FileExistsError:
                n += 1
        _fsync_dir(self.dir)  # the new name survives a crash, as the records in it do
        self._size = 0
        return fd

    def append(
        self, header: dict[str, Any], vectors: np.ndarray | None = None, *, roll: bool = True
    ) -> None:
        """Append one record durably (write, then fdatasync) before returning."""
        self._put(encode(header, vectors), roll=roll)
        self._sync()

    def _put(self, data: bytes, *, roll: bool = True) -> None:
        """Write one encoded record (into the page cache: it survives the process, not yet
        a power cut)."""
        with self._lock:
            if self._fd is None or (roll and self._size >= self.segment_bytes):
                if self._fd is not None:
                    _datasync(self._fd)  # a pending _sync may find the next segment's fd
                    os.close(self._fd)
                    self._fd = None
                self._fd = self._open_segment()
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            self._size += len(data)

    def _sync(self) -> None:
        with self._lock:
            if self._fd is not None:
                _datasync(self._fd)

    def submit(
        self,
        op: str,
        collection_id: str,
        ids: Sequence[str],
        *,
        embeddings: Any = None,
        metadatas: Any = None,
        documents: Any = None,
    ) -> tuple[int, Future[None]]:
        """Journal a record write whose Chroma write comes next: the record is written before
        this returns (so a worker that dies in Chroma's write never leaves Chroma ahead of the
        journal), its fdatasync starts in the background (to overlap Chroma's own commit);
        returns its sequence number and the future of that sync. Call it holding
        :attr:`order`, and :meth:`abort` the sequence number if Chroma then refuses the write.

        Raises:
            OSError: the record could not be written (Chroma must then not be called).
        """
        seq = next(self._seq)
        data = self._record(op, collection_id, ids, embeddings, metadatas, documents, seq, pre=True)
        self._put(data)
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(1, thread_name_prefix="safechroma-journal")
        return seq, self._pool.submit(self._sync)

    def abort(self, seq: int) -> None:
        """Void record ``seq`` (Chroma refused that write): appended right after it, durably,
        in the same segment (the reader applies a record only if no abort follows it)."""
        self.append({"op": "abort", "s": seq}, roll=False)

    def write(
        self,
        op: str,
        collection_id: str,
        ids: Sequence[str],
        *,
        embeddings: Any = None,
        metadatas: Any = None,
        documents: Any = None,
        seq: int | None = None,
    ) -> None:
        """Journal one record write (``add``, ``upsert``, ``update`` or ``delete``) durably."""
        self._put(self._record(op, collection_id, ids, embeddings, metadatas, documents, seq))
        self._sync()

    @staticmethod
    def _record(
        op: str,
        collection_id: str,
        ids: Sequence[str],
        embeddings: Any,
        metadatas: Any,
        documents: Any,
        seq: int | None,
        *,
        pre: bool = False,
    ) -> bytes:
        vectors, dim = _vectors(embeddings)
        header: dict[str, Any] = {"op": op, "c": collection_id, "ids": list(ids)}
        if seq is not None:
            header["s"] = seq
        if pre:
            header["pre"] = True  # written before Chroma's write: settle() may decide it
        if documents is not None:
            header["documents"] = list(documents)
        if metadatas is not None:
            header["metadatas"] = [None if m is None else dict(m) for m in metadatas]
        if dim is not None:
            header["dim"] = dim
        return encode(header, vectors)

    def collection(
        self,
        collection_id: str,
        name: str,
        *,
        metadata: Any = None,
        configuration: Any = None,
        schema: Any = None,
        dimension: int | None = None,
        tenant: str | None = None,
        database: str | None = None,
        created: bool = False,
        adopt: str | None = None,
    ) -> None:
        """Journal a collection's creation (``created``) or change (its whole catalog entry)."""
        header = {
            "op": "collection",
            "created": created,
            "c": collection_id,
            "name": name,
            "metadata": _plain(metadata),
            "configuration": _plain(configuration),
            "schema": _plain(schema),
            "dimension": dimension,
            "tenant": tenant,
            "database": database,
        }
        if adopt is not None:
            header["adopt"] = adopt  # a repair's new id for collection ``adopt``
        self.append(header)
        self.announced.add(collection_id)

    def drop_collection(self, collection_id: str, name: str) -> int:
        """Journal a collection's deletion, durably, before Chroma is asked (as a record write:
        a repair must never bring back a collection Chroma dropped); returns its sequence
        number, to :meth:`abort` if Chroma then refuses."""
        seq = next(self._seq)
        header = {"op": "drop_collection", "c": collection_id, "name": name, "s": seq}
        self.append({**header, "pre": True})
        self.announced.discard(collection_id)
        return seq

    def reset(self) -> int:
        """Journal chromadb's ``reset()`` (every collection gone), durably, before Chroma is
        asked, as a drop; returns its sequence number, to :meth:`abort` if Chroma refuses."""
        seq = next(self._seq)
        self.append({"op": "reset", "s": seq, "pre": True})
        self.announced.clear()
        return seq

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _plain(value: Any) -> Any:
    """``value`` if it is plain JSON, else ``None`` (configuration objects we cannot copy)."""
    if value is None:
        return None
    try:
        return json.loads(json.dumps(value, default=_json_default))
    except (TypeError, ValueError):
        return None


# ---- reading ---------------------------------------------------------------------------------


@dataclass
class ReadReport:
    """What :func:`read_records` found.

    Attributes:
        segments: Segment files read.
        records: Good records.
        torn: Per segment whose reading stopped early: ``(file, offset, why)``.
    """

    segments: int = 0
    records: int = 0
    torn: list[tuple[str, int, str]] = field(default_factory=list)


def _read_segment(
    name: str, report: ReadReport
) -> Iterator[tuple[dict[str, Any], np.ndarray | None]]:
    with open(name, "rb") as f:
        data = f.read()
    yield from _parse(data, name, report)


def _parse(
    data: bytes, name: str, report: ReadReport
) -> Iterator[tuple[dict[str, Any], np.ndarray | None]]:
    off = 0
    while off < len(data):
        why = None
        if len(data) - off < _HEAD.size:
            why = "torn record header"
        else:
            magic, hlen, blen, crc = _HEAD.unpack_from(data, off)
            end = off + _HEAD.size + hlen + blen
            if magic != MAGIC or hlen > _MAX_HEADER:
                why = "bad magic"
            elif end > len(data):
                why = "torn record"
            else:
                head = data[off + _HEAD.size : off + _HEAD.size + hlen]
                body = data[off + _HEAD.size + hlen : end]
                got = zlib.crc32(body, zlib.crc32(head, zlib.crc32(_LENGTHS.pack(hlen, blen))))
                if got != crc:
                    why = "bad checksum"
        if why is not None:
            report.torn.append((name, off, why))
            return
        try:
            header = json.loads(head)
            if not isinstance(header, dict):
                raise ValueError("not an object")
            vectors = None
            dim = header.get("dim")
            if blen:
                if not isinstance(dim, int) or dim <= 0 or blen % (4 * dim):
                    raise ValueError("vector body does not match dim")
                vectors = np.frombuffer(body, dtype="<f4").reshape(-1, dim)
        except ValueError as exc:
            report.torn.append((name, off, f"bad record: {exc}"))
            return
        report.records += 1
        yield header, vectors
        off = end


def read_records(
    path: str | os.PathLike[str], report: ReadReport | None = None
) -> Iterator[tuple[dict[str, Any], np.ndarray | None]]:
    """Every good record of the journal, oldest first (each segment up to its first bad one)."""
    rep = report if report is not None else ReadReport()
    for seg in _segments(path):
        rep.segments += 1
        yield from _read_segment(seg, rep)


@dataclass
class CollectionState:
    """One collection as the journal knows it.

    Attributes:
        id: Collection id.
        name: Its last name.
        metadata, configuration, schema, dimension, tenant, database: Its last catalog entry
            (``None`` when the journal never saw one).
        complete: The journal saw its creation: every record written since is here.
        records: Live records: id -> ``{"document", "metadata", "vector"}``.
        deleted: Ids whose last write was a delete (tombstones: a repair that brings back a
            stale row of one of them deletes it again).
    """

    id: str
    name: str | None = None
    metadata: Any = None
    configuration: Any = None
    schema: Any = None
    dimension: int | None = None
    tenant: str | None = None
    database: str | None = None
    complete: bool = False
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    deleted: set[str] = field(default_factory=set)


def _merge_meta(old: dict[str, Any] | None, new: dict[str, Any] | None) -> dict[str, Any] | None:
    if new is None:
        return old
    out = dict(old or {})
    for k, v in new.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out or None


def _clean_meta(meta: dict[str, Any] | None) -> dict[str, Any] | None:
    if meta is None:
        return None
    out = {k: v for k, v in meta.items() if v is not None}
    return out or None


def _apply(
    state: dict[str, CollectionState], header: dict[str, Any], vectors: np.ndarray | None
) -> None:
    op = header.get("op")
    cid = str(header.get("c"))
    if op == "reset":  # chromadb's reset(): every collection gone
        state.clear()
        return
    if op in ("compacted", "settled"):
        return
    if op == "collection":
        prev = state.get(cid)
        col = prev or CollectionState(id=cid, complete=bool(header.get("created")))
        adopt = header.get("adopt")
        if isinstance(adopt, str) and adopt in state and adopt != cid:
            # A repair rebuilt the collection under a new id: its history continues here.
            old = state.pop(adopt)
            col.records = {**old.records, **col.records}
            col.deleted = (old.deleted | col.deleted) - set(col.records)
            col.complete = col.complete or old.complete
        for key in ("name", "metadata", "configuration", "schema", "dimension", "tenant"):
            if key in header and (header[key] is not None or key == "metadata"):
                setattr(col, key, header[key])
        if header.get("database") is not None:
            col.database = header["database"]
        state[cid] = col
        return
    if op == "drop_collection":
        state.pop(cid, None)
        return
    col = state.setdefault(cid, CollectionState(id=cid))
    ids = [str(i) for i in header.get("ids") or []]
    if op == "delete":
        for i in ids:
            col.records.pop(i, None)
        col.deleted.update(ids)
        return
    docs = header.get("documents")
    metas = header.get("metadatas")
    for k, i in enumerate(ids):
        doc = docs[k] if docs is not None else None
        meta = metas[k] if metas is not None else None
        vec = vectors[k] if vectors is not None else None
        live = col.records.get(i)
        if op == "add" or (op == "upsert" and live is None):
            if live is not None:
                continue  # Chroma ignores an add of an id it has
            col.records[i] = {"document": doc, "metadata": _clean_meta(meta), "vector": vec}
            col.deleted.discard(i)
        elif op in ("update", "upsert") and live is not None:
            if doc is not None:
                live["document"] = doc
            live["metadata"] = _merge_meta(live["metadata"], meta)
            if vec is not None:
                live["vector"] = vec


def replay(
    path: str | os.PathLike[str], report: ReadReport | None = None
) -> dict[str, CollectionState]:
    """Fold the journal into each collection's live records (collection id -> state)."""
    state: dict[str, CollectionState] = {}
    pending: tuple[dict[str, Any], np.ndarray | None] | None = None
    for header, vectors in read_records(path, report):
        if header.get("op") == "abort":  # voids the record right before it
            if pending is not None and pending[0].get("s") == header.get("s"):
                pending = None
            continue
        if pending is not None:
            _apply(state, *pending)
        pending = (header, vectors)
    if pending is not None:
        _apply(state, *pending)
    return state


# ---- compaction ------------------------------------------------------------------------------


def _is_compacted(segment: str) -> bool:
    for header, _ in _read_segment(segment, ReadReport()):
        return header.get("op") == "compacted"
    return os.path.getsize(segment) == 0


@dataclass
class CompactReport:
    """What :func:`compact` did."""

    segments_before: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    records: int = 0
    torn: list[tuple[str, int, str]] = field(default_factory=list)


def compact(
    path: str | os.PathLike[str], *, batch: int = 1000, min_growth: float = 0.1
) -> CompactReport:
    """Rewrite the journal as its live state: a collection record per collection and one
    ``upsert`` per live record (batched), into a new segment (written, fsynced, renamed), then
    remove the old segments. Only while no worker writes to the directory.

    Skipped while what was appended since the last compaction is under ``min_growth`` of the
    compacted journal (so a close after a few writes does not rewrite a large journal; the
    disk stays within ``1 + min_growth`` of the compacted size).
    """
    out = CompactReport()
    # Before anything folds the journal or compacts Chroma's WAL (which runs right after this,
    # in wal.maintain, and plays back a hot SQLite journal anyway): settle() reads the WAL
    # rows as Chroma wrote them.
    settle(path, roll_back=True)
    segs = _segments(path)
    out.segments_before = len(segs)
    out.bytes_before = sum(os.path.getsize(s) for s in segs)
    if not segs:
        return out
    if _is_compacted(segs[0]):
        base = os.path.getsize(segs[0])
        if out.bytes_before - base <= min_growth * base:
            out.bytes_after = out.bytes_before
            return out  # little or nothing appended since the last compaction
    rep = ReadReport()
    state = replay(path, rep)
    out.torn = rep.torn
    d = journal_dir(path)
    # The result replaces the newest segment it folds in (an atomic rename), so it sorts
    # before any segment a writer started meanwhile; a crash before the older ones are
    # removed leaves them in front of it, and replaying them again changes nothing.
    final = segs[-1]
    tmp = os.path.join(d, "compact.partial")
    with open(tmp, "wb") as f:
        f.write(encode({"op": "compacted"}))
        for col in state.values():
            f.write(
                encode(
                    {
                        "op": "collection",
                        "c": col.id,
                        "name": col.name,
                        "metadata": col.metadata,
                        "configuration": col.configuration,
                        "schema": col.schema,
                        "dimension": col.dimension,
                        "tenant": col.tenant,
                        "database": col.database,
                        "created": col.complete,
                    }
                )
            )
            # Groups of records with the same vector dimension (and with/without a vector).
            groups: dict[int | None, list[str]] = {}
            for rid, r in col.records.items():
                v = r["vector"]
                groups.setdefault(None if v is None else int(v.shape[0]), []).append(rid)
            for dim, ids in groups.items():
                for start in range(0, len(ids), batch):
                    part = ids[start : start + batch]
                    recs = [col.records[i] for i in part]
                    header: dict[str, Any] = {
                        "op": "upsert",
                        "c": col.id,
                        "ids": part,
                        "documents": [r["document"] for r in recs],
                        "metadatas": [r["metadata"] for r in recs],
                    }
                    vecs = None
                    if dim is not None:
                        header["dim"] = dim
                        vecs = np.stack([r["vector"] for r in recs])
                    f.write(encode(header, vecs))
                    out.records += len(part)
            dead = sorted(col.deleted)
            for start in range(0, len(dead), batch * 10):
                part = dead[start : start + batch * 10]
                f.write(encode({"op": "delete", "c": col.id, "ids": part}))
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, final)
    _fsync_dir(d)
    for old in segs[:-1]:
        os.remove(old)
    _fsync_dir(d)
    out.bytes_after = os.path.getsize(final)
    return out


def _create_configuration(configuration: Any) -> dict[str, Any] | None:
    """The parts of a recorded configuration that ``create_collection`` takes back."""
    if not isinstance(configuration, dict) or not isinstance(configuration.get("hnsw"), dict):
        return None
    keep = ("space", "ef_construction", "ef_search", "max_neighbors", "sync_threshold")
    hnsw = {k: v for k, v in configuration["hnsw"].items() if k in keep and v is not None}
    return {"hnsw": hnsw} if hnsw else None


def has_journal(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` has a write journal."""
    return bool(_segments(path))


# ---- the one uncertain record ----------------------------------------------------------------


def settle(path: str | os.PathLike[str], *, roll_back: bool = False) -> str | None:
    """Decide the journal's one uncertain record, once, before anything writes again.

    A record is written before Chroma is asked (:meth:`Journal.submit`), so the journal can
    hold a write Chroma never committed in one place only: the last record of the newest
    segment, when its worker died during that write. Left as it is, a later repair would
    write it back, to some of its ids only (the records the directory lacks): an unknown
    outcome turned into a partial one, long after a read had seen it not applied. Chroma's
    WAL (``embeddings_queue``, kept by safechroma and compacted only after a settle: see
    :func:`compact`) says which: Chroma logs a write as one row per id, in order, in one
    transaction, after every earlier write, so the write was committed exactly when the
    collection's newest rows are its ids with its operation (and its vectors and documents).
    A committed record gets a ``settled`` record after it, one Chroma never committed an
    ``abort`` (the reader then skips it). A collection's drop is decided by the collection's
    absence from ``chroma.sqlite3``, a ``reset()`` by the absence of every collection. Only
    records marked as written before Chroma's write (``pre``) are decided; the caller must own
    the directory (no worker has it open).

    A worker killed inside Chroma's transaction leaves a hot ``chroma.sqlite3-journal``, which a
    read-only reader cannot get past: with ``roll_back`` it is played back first, as Chroma's
    next open would (``safechroma repair`` backs it up and plays it back before it settles).

    Returns:
        ``"committed"``, ``"voided"``, or None when there was nothing to decide, or the WAL
        could not be read or the mark not written (the record then stays, as a write that
        happened). Never raises for a bad file.
    """
    segs = _segments(path)
    if not segs:
        return None
    seg = segs[-1]
    try:
        last = _last_record(seg)
    except (OSError, ValueError):
        return None
    if last is None:
        return None
    header, vectors = last
    op, seq = header.get("op"), header.get("s")
    ids = [str(i) for i in header.get("ids") or []]
    if not isinstance(seq, int) or not header.get("pre"):
        return None
    cid, root = str(header.get("c")), os.fspath(path)
    if op not in ("drop_collection", "reset") and (op not in CHROMA_OPS or not ids):
        return None

    def decide() -> bool | None:
        if op in ("drop_collection", "reset"):
            return chroma_dropped(root, cid if op == "drop_collection" else None)
        return chroma_logged(root, cid, str(op), ids, header.get("documents"), vectors)

    committed = decide()
    if committed is None and roll_back and roll_back_if_hot(root):
        committed = decide()
    if committed is None:
        return None
    mark = {"op": "settled" if committed else "abort", "c": cid, "s": seq}
    try:
        fd = os.open(seg, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, encode(mark))
            _datasync(fd)
        finally:
            os.close(fd)
    except OSError:
        return None  # a read-only or full disk: the record stays, as a write that happened
    return "committed" if committed else "voided"


def _last_record(segment: str) -> tuple[dict[str, Any], np.ndarray | None] | None:
    """The last record of ``segment`` when the file ends right after it; None when it is empty
    or its tail is torn or damaged (a torn tail is the write the worker died in, cut short
    before Chroma was asked). Walks the records' lengths only, so a respawn does not read and
    check a large segment whole."""
    import mmap

    size = os.path.getsize(segment)
    if size == 0:
        return None
    with open(segment, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        off, last = 0, -1
        while off < size:
            if size - off < _HEAD.size:
                return None
            magic, hlen, blen, _crc = _HEAD.unpack_from(m, off)
            end = off + _HEAD.size + hlen + blen
            if magic != MAGIC or hlen > _MAX_HEADER or end > size:
                return None
            last, off = off, end
        tail = m[last:size]
    rep = ReadReport()
    records = list(_parse(tail, segment, rep))
    return records[0] if len(records) == 1 and not rep.torn else None
