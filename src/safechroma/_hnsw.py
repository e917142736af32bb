"""Read one Chroma HNSW segment directory without Chroma.

Everything here is pure Python (``struct`` + ``numpy``) over untrusted bytes: no hnswlib, no
chromadb, no ``mmap`` (a file truncated under a mapping raises SIGBUS in the reader, FACTS §3),
no plain ``pickle.load``. The file layout is CHROMA_FACTS.md §1.

Two entry points:

* :func:`check_segment` walks the files and returns a :class:`SegmentReport` whose findings say
  precisely what is wrong (or nothing, for every healthy shape: FACTS §1 "Healthy shapes").
* :func:`salvage_vectors` reads every structurally intact vector out of ``data_level0.bin`` and
  maps it to its Chroma id through ``index_metadata.pickle``.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import struct
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "HEADER_FORMAT",
    "HEADER_SIZE",
    "Finding",
    "HnswHeader",
    "SegmentReport",
    "Salvage",
    "UnsafePickleError",
    "check_segment",
    "read_header",
    "read_index_metadata",
    "salvage_vectors",
]

HEADER_FORMAT = "<iQQQQQQiIQQQdQ"
HEADER_SIZE = struct.calcsize(HEADER_FORMAT)  # 100, FACTS §1
HEADER_FILE = "header.bin"
DATA_FILE = "data_level0.bin"
LENGTH_FILE = "length.bin"
LINKS_FILE = "link_lists.bin"
PICKLE_FILE = "index_metadata.pickle"

# The pickle holds a dict of str/int/None (FACTS §1); a few MB per 100k ids. A file far larger
# than any real one is refused before it is parsed, so a hostile file cannot make us allocate
# without bound.
MAX_PICKLE_BYTES = 1 << 31
# Elements per read when walking data_level0.bin: bounds memory to a few tens of MB whatever
# the index size, and keeps numpy's per-call overhead negligible.
_CHUNK_ELEMENTS = 65536

Severity = Literal["error", "warning", "info"]


@dataclass(frozen=True)
class Finding:
    """One fact the validator established about a file.

    Attributes:
        code: Stable machine-readable identifier, e.g. ``"level0_neighbor_out_of_range"``.
        message: One sentence a person can act on.
        file: Path of the file concerned, or ``None`` for the directory as a whole.
        severity: ``"error"`` means damaged (Chroma may crash or lose data); ``"warning"`` and
            ``"info"`` never make a directory damaged.
    """

    code: str
    message: str
    file: str | None = None
    severity: Severity = "error"

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict."""
        return asdict(self)


@dataclass(frozen=True)
class HnswHeader:
    """The 14 fields of ``header.bin`` (FACTS §1 table), in file order."""

    version: int
    offset_level0: int
    max_elements: int
    cur_element_count: int
    size_data_per_element: int
    label_offset: int
    offset_data: int
    maxlevel: int
    enterpoint_node: int
    max_m: int
    max_m0: int
    m: int
    mult: float
    ef_construction: int

    @property
    def dim(self) -> int:
        """Vector dimension implied by the offsets (4 bytes per f32 component)."""
        return (self.label_offset - self.offset_data) // 4

    @property
    def size_links_per_element(self) -> int:
        """Bytes of one upper-level link block: a u32 count word then ``maxM`` u32 ids."""
        return self.max_m * 4 + 4

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict (``mult`` stays a float)."""
        return asdict(self)


@dataclass
class SegmentReport:
    """What :func:`check_segment` found in one segment directory.

    Attributes:
        path: The segment directory.
        header: Parsed header, or ``None`` when it could not be read.
        element_count: ``cur_element_count`` from the header (deleted elements included).
        deleted_count: Elements whose deleted flag is set (deep check only).
        max_level: Highest level found in ``link_lists.bin`` (deep check only).
        has_pickle: Whether ``index_metadata.pickle`` exists.
        pickle_ids: Number of ids in the pickle's ``id_to_label`` map.
        findings: Everything noteworthy; any ``"error"`` makes the segment damaged.
    """

    path: str
    header: HnswHeader | None = None
    element_count: int = 0
    deleted_count: int | None = None
    max_level: int | None = None
    has_pickle: bool = False
    pickle_ids: int | None = None
    findings: list[Finding] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        """True when no finding has severity ``"error"``."""
        return not any(f.severity == "error" for f in self.findings)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict."""
        return {
            "path": self.path,
            "healthy": self.healthy,
            "header": self.header.to_dict() if self.header else None,
            "element_count": self.element_count,
            "deleted_count": self.deleted_count,
            "max_level": self.max_level,
            "has_pickle": self.has_pickle,
            "pickle_ids": self.pickle_ids,
            "findings": [f.to_dict() for f in self.findings],
        }


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asked for a global that is not on the allow-list; nothing was executed."""


class _LegacyPersistentData:
    """Inert stand-in for chromadb<0.5's ``PersistentData`` (a plain attribute bag).

    Pickle's BUILD opcode fills ``__dict__``; no method of any real class runs.
    """

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _AllowListUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals listed in ``_ALLOWED`` (none run code).

    Chroma 1.x writes a pickle of plain dicts, ints, strings and None (FACTS §1), which needs no
    global at all. Any other global (``os.system``, ``builtins.eval``, ``subprocess.Popen`` ...)
    raises :class:`UnsafePickleError` before it is even looked up.
    """

    _ALLOWED: dict[tuple[str, str], Any] = {
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        # Directories written by chromadb 0.4/0.5 pickled this class; we map it to an inert bag.
        (
            "chromadb.segment.impl.vector.local_persistent_hnsw",
            "PersistentData",
        ): _LegacyPersistentData,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refused global {module}.{name}: not on the allow-list"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refused persistent id")


def read_index_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load ``index_metadata.pickle`` with the allow-list unpickler.

    Args:
        path: The pickle file.

    Returns:
        The metadata dict (``id_to_label``, ``label_to_id``, ...).

    Raises:
        UnsafePickleError: The file asks for a global that is not allowed.
        pickle.UnpicklingError, EOFError, ValueError: The file is garbled or truncated.
        OSError: The file cannot be read.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_PICKLE_BYTES:
            raise ValueError(f"pickle is {size} bytes, larger than any real index metadata")
        data = f.read()
    obj = _AllowListUnpickler(io.BytesIO(data)).load()
    if isinstance(obj, _LegacyPersistentData):
        obj = obj.as_dict()
    if not isinstance(obj, dict):
        raise ValueError(f"pickle holds {type(obj).__name__}, expected dict")
    return obj


def read_header(path: str | os.PathLike[str]) -> HnswHeader:
    """Parse ``header.bin``.

    Raises:
        ValueError: The file is not exactly 100 bytes.
        OSError: It cannot be read.
    """
    with open(path, "rb") as f:
        raw = f.read(HEADER_SIZE + 1)
    if len(raw) != HEADER_SIZE:
        raise ValueError(f"header.bin is {len(raw)} bytes, expected exactly {HEADER_SIZE}")
    return HnswHeader(*struct.unpack(HEADER_FORMAT, raw))


def _header_findings(h: HnswHeader, hfile: str, expected_dim: int | None) -> list[Finding]:
    """Arithmetic rules of FACTS §1: every field that feeds pointer maths in hnswlib."""
    out: list[Finding] = []

    def bad(code: str, msg: str) -> None:
        out.append(Finding(code, msg, hfile))

    if h.version != 1:
        bad("header_version", f"persistence version is {h.version}, expected 1")
    if h.offset_level0 != 0:
        bad("header_offset_level0", f"offsetLevel0 is {h.offset_level0}, expected 0")
    if not 2 <= h.m <= 32767 or h.max_m != h.m or h.max_m0 != 2 * h.m:
        bad("header_m", f"M={h.m}, maxM={h.max_m}, maxM0={h.max_m0}: expected maxM=M, maxM0=2*M")
    if h.offset_data != h.max_m0 * 4 + 4:
        bad("header_offset_data", f"offsetData={h.offset_data}, expected maxM0*4+4={h.max_m0 * 4 + 4}")
    span = h.label_offset - h.offset_data
    if span <= 0 or span % 4:
        bad("header_label_offset", f"label_offset={h.label_offset} leaves no whole f32 vector")
    elif expected_dim is not None and h.dim != expected_dim:
        bad("header_dim", f"header implies dimension {h.dim}, the collection has {expected_dim}")
    if h.size_data_per_element != h.label_offset + 8:
        bad(
            "header_size_data_per_element",
            f"size_data_per_element={h.size_data_per_element}, expected label_offset+8="
            f"{h.label_offset + 8}",
        )
    if h.m >= 2 and not math.isclose(h.mult, 1.0 / math.log(h.m), rel_tol=1e-9):
        bad("header_mult", f"mult={h.mult!r}, expected 1/ln(M)={1.0 / math.log(h.m)!r}")
    if h.max_elements < h.cur_element_count:
        bad(
            "header_capacity",
            f"max_elements={h.max_elements} < cur_element_count={h.cur_element_count}",
        )
    if h.cur_element_count == 0:
        if h.maxlevel != -1:
            bad("header_maxlevel", f"empty index with maxlevel={h.maxlevel}, expected -1")
    else:
        if h.maxlevel < 0:
            bad("header_maxlevel", f"{h.cur_element_count} elements but maxlevel={h.maxlevel}")
        if h.enterpoint_node >= h.cur_element_count:
            bad(
                "header_entry_point",
                f"entry point {h.enterpoint_node} >= element count {h.cur_element_count}",
            )
    return out


def _read_exact(f: io.BufferedReader, n: int) -> bytes:
    buf = f.read(n)
    if len(buf) != n:
        raise EOFError(f"short read: {len(buf)} of {n} bytes")
    return buf


def _strided(
    buf: bytes, count: int, sdpe: int, offset: int, dtype: str, width: int = 0
) -> npt.NDArray[Any]:
    """A zero-copy view of one field of every element in a chunk (elements are ``sdpe`` apart)."""
    if width:
        return np.ndarray(
            shape=(count, width),
            dtype=dtype,
            buffer=buf,
            offset=offset,
            strides=(sdpe, np.dtype(dtype).itemsize),
        )
    return np.ndarray(shape=(count,), dtype=dtype, buffer=buf, offset=offset, strides=(sdpe,))


def _check_neighbors(
    counts: npt.NDArray[Any],
    ids: npt.NDArray[Any],
    self_ids: npt.NDArray[Any],
    limit: int,
    cur: int,
) -> tuple[int, int, int, int]:
    """Vectorised bounds check of a batch of link lists.

    Returns:
        (lists whose count > limit, first such element or -1,
         neighbour ids >= cur, first element holding one or -1).
    """
    counts = counts.astype(np.int64)
    too_many = counts > limit
    n_too_many = int(too_many.sum())
    first_too_many = int(self_ids[np.argmax(too_many)]) if n_too_many else -1
    used = np.arange(ids.shape[1]) < np.minimum(counts, limit)[:, None]
    oob = (ids >= cur) & used
    oob_rows = oob.any(axis=1)
    n_oob = int(oob.sum())
    first_oob = int(self_ids[np.argmax(oob_rows)]) if n_oob else -1
    return n_too_many, first_too_many, n_oob, first_oob


def _count_self_links(ids: npt.NDArray[Any], counts: npt.NDArray[Any], self_ids: npt.NDArray[Any]) -> int:
    used = np.arange(ids.shape[1]) < counts.astype(np.int64)[:, None]
    return int(((ids == self_ids[:, None].astype(ids.dtype)) & used).sum())


def check_segment(
    path: str | os.PathLike[str],
    *,
    deep: bool = True,
    expected_dim: int | None = None,
) -> SegmentReport:
    """Check one HNSW segment directory against the format of FACTS §1.

    Never raises for bad file contents: every problem becomes a :class:`Finding`.

    Args:
        path: The ``<vector-segment-uuid>`` directory.
        deep: Also walk ``data_level0.bin`` (link counts, neighbour ids, deleted flags, labels)
            and ``link_lists.bin`` (every upper-level list), and compare labels with the pickle.
            Without it only the header, the file sizes and the pickle are checked.
        expected_dim: The collection's dimension from SQLite, if known.

    Returns:
        A :class:`SegmentReport`.
    """
    seg = os.fspath(path)
    rep = SegmentReport(path=seg)
    add = rep.findings.append
    hfile, dfile, lfile, kfile, pfile = (
        os.path.join(seg, n) for n in (HEADER_FILE, DATA_FILE, LENGTH_FILE, LINKS_FILE, PICKLE_FILE)
    )

    sizes: dict[str, int] = {}
    for name in (hfile, dfile, lfile, kfile):
        try:
            sizes[name] = os.stat(name).st_size
        except FileNotFoundError:
            add(Finding("file_missing", f"{os.path.basename(name)} is missing", name))
        except OSError as e:
            add(Finding("file_unreadable", f"cannot stat: {e}", name))
    rep.has_pickle = os.path.exists(pfile)
    if hfile not in sizes:
        return rep

    try:
        h = read_header(hfile)
    except (OSError, ValueError) as e:
        add(Finding("header_size", str(e), hfile))
        return rep
    rep.header = h
    rep.element_count = cur = h.cur_element_count
    hf = _header_findings(h, hfile, expected_dim)
    rep.findings.extend(hf)
    if hf:
        # Offsets are wrong, so every later computation would read garbage: stop here.
        return rep
    sdpe = h.size_data_per_element

    # File sizes against the header (FACTS §1 "The other files").
    if dfile in sizes:
        dsize = sizes[dfile]
        if dsize < cur * sdpe:
            add(Finding("data_truncated", f"data_level0.bin is {dsize} bytes, {cur} elements need {cur * sdpe}", dfile))
        elif dsize % sdpe:
            add(Finding("data_size", f"data_level0.bin size {dsize} is not a multiple of {sdpe}", dfile))
        elif dsize > max(h.max_elements, cur) * sdpe:
            add(Finding("data_size", f"data_level0.bin holds {dsize // sdpe} slots, more than max_elements={h.max_elements}", dfile))
    if lfile in sizes and sizes[lfile] < 4 * cur:
        add(Finding("length_truncated", f"length.bin is {sizes[lfile]} bytes, {cur} elements need {4 * cur}", lfile))
    if kfile in sizes and sizes[kfile] % 4:
        add(Finding("links_size", f"link_lists.bin size {sizes[kfile]} is not a multiple of 4", kfile))

    # The pickle (FACTS §1): required once anything was flushed; read with the allow-list.
    label_to_id: dict[Any, Any] | None = None
    if rep.has_pickle:
        try:
            meta = read_index_metadata(pfile)
            l2i = meta.get("label_to_id")
            i2l = meta.get("id_to_label")
            if not isinstance(l2i, dict) or not isinstance(i2l, dict):
                raise ValueError("label_to_id / id_to_label missing or not dicts")
            label_to_id = l2i
            rep.pickle_ids = len(i2l)
            if len(l2i) != len(i2l):
                add(Finding("pickle_maps", f"label_to_id has {len(l2i)} entries, id_to_label {len(i2l)}", pfile))
        except UnsafePickleError as e:
            add(Finding("pickle_unsafe", f"index_metadata.pickle is not a Chroma pickle ({e}); it was not executed", pfile))
        except Exception as e:  # noqa: BLE001 - any parse failure of untrusted bytes is damage
            add(Finding("pickle_unreadable", f"index_metadata.pickle cannot be parsed: {type(e).__name__}: {e}", pfile))
    elif cur > 0:
        add(Finding("pickle_missing", f"{cur} elements on disk but index_metadata.pickle is missing", pfile))

    if not deep or not rep.healthy or cur == 0:
        if deep and cur == 0 and rep.healthy:
            rep.deleted_count = 0
            if sizes.get(kfile, 0) != 0:
                add(Finding("links_trailing", f"empty index but link_lists.bin has {sizes[kfile]} bytes", kfile))
        return rep

    # ---- deep: level 0 ---------------------------------------------------------------------
    live_labels: list[npt.NDArray[np.uint64]] = []
    deleted = 0
    too_many = oob = self_links = 0
    first_bad = -1
    first_oob = -1
    try:
        with open(dfile, "rb") as f:
            for start in range(0, cur, _CHUNK_ELEMENTS):
                k = min(_CHUNK_ELEMENTS, cur - start)
                buf = _read_exact(f, k * sdpe)  # type: ignore[arg-type]
                counts = _strided(buf, k, sdpe, 0, "<u2")
                flags = _strided(buf, k, sdpe, 2, "u1")
                nbr = _strided(buf, k, sdpe, 4, "<u4", h.max_m0)
                labels = _strided(buf, k, sdpe, h.label_offset, "<u8")
                selves = np.arange(start, start + k, dtype=np.int64)
                t, ft, o, fo = _check_neighbors(counts, nbr, selves, h.max_m0, cur)
                too_many += t
                oob += o
                if ft >= 0 and first_bad < 0:
                    first_bad = ft
                if fo >= 0 and first_oob < 0:
                    first_oob = fo
                self_links += _count_self_links(nbr, np.minimum(counts, h.max_m0), selves)
                is_del = (flags & 1).astype(bool)
                deleted += int(is_del.sum())
                live_labels.append(np.array(labels[~is_del], dtype=np.uint64))
    except (OSError, EOFError) as e:
        add(Finding("data_unreadable", f"cannot read data_level0.bin: {e}", dfile))
        return rep
    rep.deleted_count = deleted
    if too_many:
        add(Finding("level0_link_count", f"{too_many} level-0 link counts exceed maxM0={h.max_m0} (first at element {first_bad})", dfile))
    if oob:
        add(Finding("level0_neighbor_out_of_range", f"{oob} level-0 neighbour ids >= element count {cur} (first at element {first_oob})", dfile))
    if self_links:
        # hnswlib never links an element to itself, but a self link cannot crash a search:
        # report it without calling the index damaged (no false positives, issue 4).
        add(Finding("level0_self_link", f"{self_links} level-0 lists link an element to itself", dfile, "warning"))

    # ---- deep: upper levels (link_lists.bin) -------------------------------------------------
    if kfile in sizes and sizes[kfile] % 4 == 0:
        _walk_link_lists(kfile, h, rep)

    # ---- deep: labels --------------------------------------------------------------------------
    labels_all = np.concatenate(live_labels) if live_labels else np.zeros(0, np.uint64)
    # Sort-based set logic: np.unique's hash path took ~1.4 s per million uint64 here.
    srt = np.sort(labels_all)
    dup = int((srt[1:] == srt[:-1]).sum()) if srt.size > 1 else 0
    if dup:
        add(Finding("labels_duplicate", f"{dup} live elements share a label with another", dfile))
    if label_to_id is not None:
        try:
            pk = np.fromiter((int(x) for x in label_to_id), dtype=np.uint64, count=len(label_to_id))
        except (TypeError, ValueError, OverflowError):
            add(Finding("pickle_labels", "label_to_id has keys that are not labels", pfile))
        else:
            pk.sort()
            if not (pk.size == srt.size and np.array_equal(pk, srt)):
                uniq = srt[np.concatenate(([True], srt[1:] != srt[:-1]))] if srt.size else srt
                only_disk = int((~_isin_sorted(uniq, pk)).sum())
                only_pickle = int((~_isin_sorted(pk, uniq)).sum())
                if only_disk or only_pickle:
                    add(Finding(
                        "pickle_labels",
                        f"labels disagree: {only_disk} live labels on disk are not in the pickle, "
                        f"{only_pickle} pickle labels are not live on disk",
                        pfile,
                    ))
    return rep


def _isin_sorted(a: npt.NDArray[Any], sorted_b: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
    """Membership of ``a`` in the sorted array ``sorted_b`` by binary search."""
    if sorted_b.size == 0:
        return np.zeros(a.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_b, a), sorted_b.size - 1)
    return np.asarray(sorted_b[pos] == a)


def _walk_link_lists(kfile: str, h: HnswHeader, rep: SegmentReport) -> None:
    """Walk ``link_lists.bin`` end to end and bounds-check every upper-level list.

    Layout (FACTS §1): per element ``u32 nbytes`` then ``nbytes`` bytes, ``nbytes = level *
    (maxM*4+4)``; each level block is a count word (low 16 bits) and ``maxM`` u32 ids. The walk
    is sequential by nature, but most elements have level 0 (a zero word), so the Python loop
    only visits non-zero words (~1/M of the elements) and jumps over zero runs with
    ``searchsorted``; the list contents are then checked in one vectorised pass.
    """
    add = rep.findings.append
    cur = h.cur_element_count
    try:
        with open(kfile, "rb") as f:
            words = np.frombuffer(f.read(), dtype="<u4")
    except OSError as e:
        add(Finding("links_unreadable", f"cannot read link_lists.bin: {e}", kfile))
        return
    n = words.size
    slpe_words = h.size_links_per_element // 4
    nz = np.flatnonzero(words)
    elem_ids: list[int] = []
    starts: list[int] = []
    levels: list[int] = []
    p = 0
    j = 0
    while j < cur:
        k = int(np.searchsorted(nz, p))
        q = int(nz[k]) if k < nz.size else n
        run = q - p  # consecutive zero words at header positions: level-0 elements
        if run >= cur - j:
            p += cur - j
            j = cur
            break
        if q >= n:
            add(Finding("links_truncated", f"link_lists.bin ends after {n * 4} bytes, before all {cur} elements", kfile))
            return
        j += run
        p = q
        nbytes = int(words[q])
        if nbytes % h.size_links_per_element:
            add(Finding("links_nbytes", f"element {j}: link list of {nbytes} bytes is not a whole number of levels", kfile))
            return
        lvl = nbytes // h.size_links_per_element
        end = q + 1 + nbytes // 4
        if end > n:
            add(Finding("links_truncated", f"element {j}: level-{lvl} link list runs past the end of link_lists.bin", kfile))
            return
        elem_ids.append(j)
        starts.append(q + 1)
        levels.append(lvl)
        p = end
        j += 1
    if p > n:
        add(Finding("links_truncated", f"link_lists.bin ends after {n * 4} bytes, before all {cur} elements", kfile))
        return
    if p < n:
        add(Finding("links_trailing", f"{(n - p) * 4} bytes after the last element's link list", kfile))
        return

    lv = np.asarray(levels, dtype=np.int64)
    max_level = int(lv.max()) if lv.size else 0
    rep.max_level = max_level
    if max_level != h.maxlevel:
        add(Finding("header_maxlevel", f"header maxlevel={h.maxlevel} but the highest element level is {max_level}", kfile))
    ep_level = 0
    if levels:
        ids_arr = np.asarray(elem_ids, dtype=np.int64)
        hit = np.flatnonzero(ids_arr == h.enterpoint_node)
        ep_level = int(lv[hit[0]]) if hit.size else 0
    if ep_level != h.maxlevel:
        # Search starts at the entry point's top level: a lower entry reads links it lacks.
        add(Finding("header_entry_point", f"entry point {h.enterpoint_node} has level {ep_level}, header maxlevel is {h.maxlevel}", kfile))
    if not levels:
        return
    owners = np.repeat(np.asarray(elem_ids, dtype=np.int64), lv)
    first = np.repeat(np.asarray(starts, dtype=np.int64), lv)
    within = np.arange(owners.size) - np.repeat(np.cumsum(lv) - lv, lv)
    block = first + within * slpe_words
    counts = words[block] & 0xFFFF
    ids = words[block[:, None] + 1 + np.arange(h.max_m)]
    t, ft, o, fo = _check_neighbors(counts, ids, owners, h.max_m, cur)
    if t:
        add(Finding("upper_link_count", f"{t} upper-level link counts exceed maxM={h.max_m} (first at element {ft})", kfile))
    if o:
        add(Finding("upper_neighbor_out_of_range", f"{o} upper-level neighbour ids >= element count {cur} (first at element {fo})", kfile))


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


def salvage_vectors(
    path: str | os.PathLike[str],
    *,
    space: str,
    dim: int | None = None,
    m: int = 16,
) -> Salvage:
    """Read every structurally intact, live vector from a segment and map it to its id.

    "Intact" means: the element's bytes are fully inside ``data_level0.bin``, its deleted flag
    is clear, all components are finite, its label is unique and the pickle maps it to an id.
    When the header is unusable, the layout is recomputed from ``dim`` and ``m`` (the
    collection's dimension and ``max_neighbors`` from SQLite) and every slot is tried.

    Args:
        path: Segment directory.
        space: ``"l2"``, ``"cosine"`` or ``"ip"``.
        dim: Collection dimension (fallback when the header is unusable).
        m: HNSW ``M`` (fallback when the header is unusable).

    Returns:
        A :class:`Salvage`; empty when the pickle is unreadable (labels cannot be mapped).
    """
    seg = os.fspath(path)
    skipped: dict[str, int] = {}
    empty = Salvage(ids=[], vectors=np.zeros((0, dim or 0), np.float32), skipped=skipped)
    try:
        meta = read_index_metadata(os.path.join(seg, PICKLE_FILE))
        label_to_id = meta["label_to_id"]
        if not isinstance(label_to_id, dict):
            raise ValueError("label_to_id is not a dict")
    except Exception:  # noqa: BLE001 - untrusted file: any failure means "no mapping"
        skipped["no_label_map"] = -1
        return empty

    header: HnswHeader | None
    try:
        header = read_header(os.path.join(seg, HEADER_FILE))
        if _header_findings(header, "", dim):
            header = None
    except (OSError, ValueError):
        header = None
    if header is not None:
        sdpe, off, lab_off, d = (
            header.size_data_per_element, header.offset_data, header.label_offset, header.dim
        )
        limit: int | None = header.cur_element_count
    elif dim:
        off = 2 * m * 4 + 4
        d = dim
        lab_off = off + 4 * dim
        sdpe = lab_off + 8
        limit = None
    else:
        skipped["no_layout"] = -1
        return empty

    try:
        dsize = os.stat(os.path.join(seg, DATA_FILE)).st_size
    except OSError:
        skipped["no_data_file"] = -1
        return empty
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

    ids: list[str] = []
    vecs: list[npt.NDArray[np.float32]] = []
    seen: dict[int, int] = {}
    dup_labels: set[int] = set()
    unmapped = 0
    with open(os.path.join(seg, DATA_FILE), "rb") as f:
        for start in range(0, n, _CHUNK_ELEMENTS):
            k = min(_CHUNK_ELEMENTS, n - start)
            buf = f.read(k * sdpe)
            k = len(buf) // sdpe
            if k == 0:
                break
            flags = _strided(buf, k, sdpe, 2, "u1")
            vec = np.array(_strided(buf, k, sdpe, off, "<f4", d), dtype=np.float32)
            labels = np.array(_strided(buf, k, sdpe, lab_off, "<u8"), dtype=np.uint64)
            alive = (flags & 1) == 0
            finite = np.isfinite(vec).all(axis=1)
            skipped["deleted"] = skipped.get("deleted", 0) + int((~alive).sum())
            skipped["non_finite"] = skipped.get("non_finite", 0) + int((alive & ~finite).sum())
            if norms is not None:
                nn = norms[start : start + k]
                if nn.size == k:
                    good = np.isfinite(nn) & (nn > 0)
                    # A bad norm leaves the unit vector: same cosine neighbours, only its scale lost.
                    with np.errstate(over="ignore", invalid="ignore"):
                        scaled = vec * nn[:, None]
                    good &= np.isfinite(scaled).all(axis=1)
                    vec[good] = scaled[good]
            for i in np.flatnonzero(alive & finite):
                lab = int(labels[i])
                ident = label_to_id.get(lab)
                if not isinstance(ident, str):
                    unmapped += 1
                    continue
                if lab in seen:
                    dup_labels.add(lab)
                    continue
                seen[lab] = len(ids)
                ids.append(ident)
                vecs.append(vec[i])
    if dup_labels:
        # A label stored twice is ambiguous: keep neither copy.
        drop = {seen[lab] for lab in dup_labels}
        ids = [x for i, x in enumerate(ids) if i not in drop]
        vecs = [v for i, v in enumerate(vecs) if i not in drop]
        skipped["duplicate_label"] = len(drop)
    # Two labels mapping to one id (pickle inconsistent): keep the last one written.
    by_id: dict[str, int] = {}
    for i, x in enumerate(ids):
        by_id[x] = i
    if len(by_id) != len(ids):
        skipped["duplicate_id"] = len(ids) - len(by_id)
        keep = sorted(by_id.values())
        ids = [ids[i] for i in keep]
        vecs = [vecs[i] for i in keep]
    arr = np.stack(vecs).astype(np.float32) if vecs else np.zeros((0, d), np.float32)
    return Salvage(ids=ids, vectors=arr, skipped={k: v for k, v in skipped.items() if v}, unmapped_labels=unmapped)
