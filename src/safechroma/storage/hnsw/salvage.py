"""Read the vectors of a damaged HNSW segment: :func:`salvage_vectors` and its readers.

Every structurally intact element of ``data_level0.bin`` is read (in chunks, never through
``mmap``: FACTS §3) and mapped to its Chroma id through ``index_metadata.pickle`` when that file
can still be read safely.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from safechroma.storage.hnsw.files import (
    _CHUNK_ELEMENTS,
    _SCAN_CHUNK_BYTES,
    DATA_FILE,
    HEADER_FILE,
    LENGTH_FILE,
    PICKLE_FILE,
    HnswHeader,
    _header_findings,
    _strided,
    read_header,
    read_index_metadata,
)

__all__ = ["LiveElements", "Salvage", "read_label_map", "read_live_elements", "salvage_vectors"]


@dataclass
class Salvage:
    """Vectors read back from a damaged segment.

    Attributes:
        ids: Chroma ids, one per row of ``vectors``.
        vectors: float32 array ``(len(ids), dim)``; for cosine, rescaled by ``length.bin``
            norms where those are valid (FACTS §1: the index stores normalised vectors).
        skipped: Reason -> number of element slots not salvaged.
        unmapped_labels: Number of intact vectors whose label the pickle does not know.
    """

    ids: list[str]
    vectors: npt.NDArray[np.float32]
    skipped: dict[str, int] = field(default_factory=dict)
    unmapped_labels: int = 0


@dataclass
class LiveElements:
    """Every structurally intact, live element of ``data_level0.bin``.

    Attributes:
        labels: uint64 labels, ascending and unique (a label stored twice is dropped: it is
            ambiguous).
        index: for each entry of ``labels``, its row in ``vectors`` and ``stored`` (the rows
            stay in file order: sorting them would copy every vector).
        vectors: float32 ``(rows, dim)``, rescaled by ``length.bin`` for cosine.
        stored: the vectors exactly as the index stores them (normalised for cosine; the same
            array as ``vectors`` otherwise), for comparing with a WAL vector.
        cur: ``cur_element_count`` of a usable header, or ``None`` (layout recomputed).
        skipped: Reason -> number of slots not read.
    """

    labels: npt.NDArray[np.uint64]
    index: npt.NDArray[np.int64]
    vectors: npt.NDArray[np.float32]
    stored: npt.NDArray[np.float32]
    cur: int | None
    skipped: dict[str, int] = field(default_factory=dict)

    def vector_of(self, i: int) -> npt.NDArray[np.float32]:
        """The vector of ``labels[i]``."""
        return np.asarray(self.vectors[self.index[i]], dtype=np.float32)

    def stored_of(self, i: int) -> npt.NDArray[np.float32]:
        """The stored (normalised for cosine) vector of ``labels[i]``."""
        return np.asarray(self.stored[self.index[i]], dtype=np.float32)


def read_live_elements(
    path: str | os.PathLike[str], *, space: str, dim: int | None = None, m: int = 16
) -> LiveElements | None:
    """Read every intact, live element of a segment (no label map needed).

    "Intact": the element's bytes are fully inside ``data_level0.bin``, its deleted flag is
    clear and all its components are finite. When the header is unusable the layout is
    recomputed from ``dim`` and ``m`` and every slot is tried. Memory: one float32 copy of the
    live vectors (two for cosine), written in place chunk by chunk.

    Returns:
        The elements, or ``None`` when no layout or no data file is available.
    """
    seg = os.fspath(path)
    skipped: dict[str, int] = {}
    header: HnswHeader | None
    try:
        header = read_header(os.path.join(seg, HEADER_FILE))
        if _header_findings(header, "", dim):
            header = None
    except (OSError, ValueError):
        header = None
    if header is not None:
        sdpe, off, lab_off, d = (
            header.size_data_per_element,
            header.offset_data,
            header.label_offset,
            header.dim,
        )
        limit: int | None = header.cur_element_count
    elif dim:
        off = 2 * m * 4 + 4
        d = dim
        lab_off = off + 4 * dim
        sdpe = lab_off + 8
        limit = None
    else:
        return None
    try:
        dsize = os.stat(os.path.join(seg, DATA_FILE)).st_size
    except OSError:
        return None
    slots = dsize // sdpe
    if limit is not None and limit > slots:
        skipped["beyond_end_of_file"] = limit - slots
    n = slots if limit is None else min(limit, slots)

    norms: npt.NDArray[np.float32] | None = None
    if space == "cosine":
        try:
            with open(os.path.join(seg, LENGTH_FILE), "rb") as f:
                norms = np.frombuffer(f.read(4 * n), dtype="<f4").astype(np.float32)
        except OSError:
            norms = None

    vectors = np.empty((n, d), dtype=np.float32)
    stored = np.empty((n, d), dtype=np.float32) if norms is not None else vectors
    labels_all = np.empty(n, dtype=np.uint64)
    rows = 0
    deleted = non_finite = 0
    chunk = max(1, min(_CHUNK_ELEMENTS, (_SCAN_CHUNK_BYTES * 4) // sdpe))
    buf = bytearray(chunk * sdpe)
    mv = memoryview(buf)
    with open(os.path.join(seg, DATA_FILE), "rb", buffering=0) as f:
        for start in range(0, n, chunk):
            want = min(chunk, n - start) * sdpe
            got = 0
            while got < want:
                r = f.readinto(mv[got:want])
                if not r:
                    break
                got += r
            k = got // sdpe
            if k == 0:
                break
            flags = _strided(buf, k, sdpe, 2, "u1")
            raw = _strided(buf, k, sdpe, off, "<f4", d)
            alive = (flags & 1) == 0
            finite = np.isfinite(raw).all(axis=1)
            deleted += int((~alive).sum())
            non_finite += int((alive & ~finite).sum())
            keep = np.flatnonzero(alive & finite)
            c = keep.size
            stored[rows : rows + c] = raw[keep]
            labels_all[rows : rows + c] = _strided(buf, k, sdpe, lab_off, "<u8")[keep]
            if norms is not None:
                vec = stored[rows : rows + c].copy()
                nn = norms[start : start + k]
                if nn.size == k:
                    nk = nn[keep]
                    good = np.isfinite(nk) & (nk > 0)
                    # A bad norm leaves the unit vector: same cosine neighbours, only its scale
                    # lost.
                    with np.errstate(over="ignore", invalid="ignore"):
                        scaled = vec * nk[:, None]
                    good &= np.isfinite(scaled).all(axis=1)
                    vec[good] = scaled[good]
                vectors[rows : rows + c] = vec
            rows += c
    skipped["deleted"] = deleted
    skipped["non_finite"] = non_finite
    labels_all = labels_all[:rows]
    index = np.argsort(labels_all, kind="stable").astype(np.int64)
    labels_sorted = labels_all[index]
    if labels_sorted.size > 1:
        same = labels_sorted[1:] == labels_sorted[:-1]
        if same.any():
            # A label stored twice is ambiguous: keep neither copy.
            dup = np.zeros(labels_sorted.size, dtype=bool)
            dup[1:] |= same
            dup[:-1] |= same
            skipped["duplicate_label"] = int(dup.sum())
            labels_sorted, index = labels_sorted[~dup], index[~dup]
    return LiveElements(
        labels=labels_sorted,
        index=index,
        vectors=vectors[:rows],
        stored=stored[:rows],
        cur=limit,
        skipped={k: v for k, v in skipped.items() if v},
    )


def read_label_map(path: str | os.PathLike[str]) -> dict[int, str] | None:
    """``label_to_id`` of a pickle, or ``None`` when it is missing, unreadable or not a map."""
    try:
        meta = read_index_metadata(path)
        l2i = meta["label_to_id"]
        if not isinstance(l2i, dict):
            return None
        return {int(k): v for k, v in l2i.items() if isinstance(v, str)}
    except Exception:  # noqa: BLE001 - untrusted file: any failure means "no mapping"
        return None


def salvage_vectors(
    path: str | os.PathLike[str],
    *,
    space: str,
    dim: int | None = None,
    m: int = 16,
    label_map_file: str | os.PathLike[str] | None = None,
    label_to_id: dict[int, str] | None = None,
    elements: LiveElements | None = None,
) -> Salvage:
    """Read every structurally intact, live vector from a segment and map it to its id.

    Intact elements are those of :func:`read_live_elements`. Labels are mapped through the
    segment's own ``index_metadata.pickle``, else ``label_map_file``, else ``label_to_id``.

    Args:
        path: Segment directory.
        space: ``"l2"``, ``"cosine"`` or ``"ip"``.
        dim: Collection dimension (fallback when the header is unusable).
        m: HNSW ``M`` (fallback when the header is unusable).
        label_map_file: An older copy of this segment's ``index_metadata.pickle``, used when
            the segment's own pickle is unreadable. chromadb 1.5.9 rewrites the pickle in place
            (truncate, then write, no fsync), so a kill in between leaves it empty and every
            label unmappable (issue 7 soak: 664 records). An older map is safe for the labels
            it has: labels are never reassigned (updates keep their label, a re-add gets a new
            one, measured), and a deleted element's slot is skipped by its flag; labels newer
            than the copy stay unmapped (``Salvage.unmapped_labels``).
        label_to_id: A map built by the caller (for example a proven rebuild from the metadata
            segment); when given it is used as is and the files above are not read.
        elements: The segment's :func:`read_live_elements`, when the caller has read them.

    Returns:
        A :class:`Salvage`; empty when no label map is available.
    """
    seg = os.fspath(path)
    skipped: dict[str, int] = {}
    empty = Salvage(ids=[], vectors=np.zeros((0, dim or 0), np.float32), skipped=skipped)
    mapping = label_to_id
    if mapping is None:
        for n, source in enumerate([os.path.join(seg, PICKLE_FILE), label_map_file]):
            if source is None:
                continue
            mapping = read_label_map(source)
            if mapping is None:
                continue
            if n:
                skipped["snapshot_label_map"] = 1
            break
    if mapping is None:
        skipped["no_label_map"] = -1
        return empty
    el = elements if elements is not None else read_live_elements(seg, space=space, dim=dim, m=m)
    if el is None:
        skipped["no_layout_or_data"] = -1
        return empty
    skipped.update(el.skipped)
    ids: list[str] = []
    rows: list[int] = []
    unmapped = 0
    for i, lab in enumerate(el.labels.tolist()):
        ident = mapping.get(lab)
        if ident is None:
            unmapped += 1
            continue
        ids.append(ident)
        rows.append(i)
    # Two labels mapping to one id (map inconsistent): keep the last one written.
    by_id: dict[str, int] = {}
    for pos, x in enumerate(ids):
        by_id[x] = pos
    if len(by_id) != len(ids):
        skipped["duplicate_id"] = len(ids) - len(by_id)
        keep = sorted(by_id.values())
        ids = [ids[i] for i in keep]
        rows = [rows[i] for i in keep]
    arr = (
        el.vectors[el.index[np.asarray(rows, dtype=np.int64)]]
        if rows
        else np.zeros((0, el.vectors.shape[1]), np.float32)
    )
    return Salvage(
        ids=ids,
        vectors=arr.astype(np.float32),
        skipped={k: v for k, v in skipped.items() if v},
        unmapped_labels=unmapped,
    )
