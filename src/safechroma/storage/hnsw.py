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

import array
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
    "LiveElements",
    "UnsafePickleError",
    "check_segment",
    "max_plausible_level",
    "plausible_link_lists_bytes",
    "read_header",
    "read_index_metadata",
    "read_label_map",
    "read_live_elements",
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
# Elements per read when salvaging data_level0.bin: bounds memory to a few tens of MB whatever
# the index size, and keeps numpy's per-call overhead negligible.
_CHUNK_ELEMENTS = 65536
# Bytes per read when checking data_level0.bin. One buffer of this size is reused for every
# chunk, so its pages are faulted in once and the strided views stay in cache. Measured on
# 1M x 128 (652 MB): fresh 42 MB ``f.read()`` buffers cost ~0.37 s of CPU (page faults),
# ``readinto`` a reused 2.7 MB buffer ~0.06 s.
_SCAN_CHUNK_BYTES = 4 << 20

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
    # Labels of the live elements in file order (deep check only), kept for the WAL replay
    # check of safechroma.storage.validate; not part of the report's JSON.
    _live_labels: npt.NDArray[np.uint64] | None = field(
        default=None, init=False, repr=False, compare=False
    )

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
    # The C unpickler reads a stream without ``peek`` (a bare BytesIO) through one Python
    # ``read()`` call per opcode; with a BufferedReader it prefetches 128 KB at a time. Measured
    # on a 1M-id pickle: 1.05 s of CPU through BytesIO, 0.67 s buffered, 0.68 s for pickle.loads.
    obj = _AllowListUnpickler(io.BufferedReader(io.BytesIO(data))).load()
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
        bad(
            "header_offset_data",
            f"offsetData={h.offset_data}, expected maxM0*4+4={h.max_m0 * 4 + 4}",
        )
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


def _strided(
    buf: bytes | bytearray | memoryview,
    count: int,
    sdpe: int,
    offset: int,
    dtype: str,
    width: int = 0,
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


def _count_self_links(
    ids: npt.NDArray[Any], counts: npt.NDArray[Any], self_ids: npt.NDArray[Any]
) -> int:
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
    return _check_segment(os.fspath(path), deep, expected_dim, [])


def _check_segment_keep_metadata(
    path: str, *, deep: bool, expected_dim: int | None
) -> tuple[SegmentReport, dict[str, Any] | None]:
    """:func:`check_segment`, also returning the parsed pickle (``None`` if it was not read).

    For callers that need the ids too: the pickle is the most expensive file to parse
    (~0.6 s per million ids, measured), so it is parsed once.
    """
    keep: list[dict[str, Any]] = []
    rep = _check_segment(path, deep, expected_dim, keep)
    return rep, (keep[0] if keep else None)


def _check_segment(
    seg: str, deep: bool, expected_dim: int | None, keep: list[dict[str, Any]]
) -> SegmentReport:
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
    hf = _header_findings(h, hfile, expected_dim) or _level_bound_findings(h, hfile)
    rep.findings.extend(hf)
    if hf:
        # Offsets are wrong, so every later computation would read garbage: stop here.
        return rep
    sdpe = h.size_data_per_element

    # File sizes against the header (FACTS §1 "The other files").
    if dfile in sizes:
        dsize = sizes[dfile]
        if dsize < cur * sdpe:
            add(
                Finding(
                    "data_truncated",
                    f"data_level0.bin is {dsize} bytes, {cur} elements need {cur * sdpe}",
                    dfile,
                )
            )
        elif dsize % sdpe:
            add(
                Finding(
                    "data_size", f"data_level0.bin size {dsize} is not a multiple of {sdpe}", dfile
                )
            )
        elif dsize > max(h.max_elements, cur) * sdpe:
            add(
                Finding(
                    "data_size",
                    f"data_level0.bin holds {dsize // sdpe} slots, more than "
                    f"max_elements={h.max_elements}",
                    dfile,
                )
            )
    if lfile in sizes and sizes[lfile] < 4 * cur:
        add(
            Finding(
                "length_truncated",
                f"length.bin is {sizes[lfile]} bytes, {cur} elements need {4 * cur}",
                lfile,
            )
        )
    if kfile in sizes:
        rep.findings.extend(_links_size_findings(h, sizes[kfile], kfile))
    if kfile in sizes and sizes[kfile] % 4:
        add(
            Finding(
                "links_size", f"link_lists.bin size {sizes[kfile]} is not a multiple of 4", kfile
            )
        )

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
            keep.append(meta)
            rep.pickle_ids = len(i2l)
            if len(l2i) != len(i2l):
                add(
                    Finding(
                        "pickle_maps",
                        f"label_to_id has {len(l2i)} entries, id_to_label {len(i2l)}",
                        pfile,
                    )
                )
        except UnsafePickleError as e:
            add(
                Finding(
                    "pickle_unsafe",
                    f"index_metadata.pickle is not a Chroma pickle ({e}); it was not executed",
                    pfile,
                )
            )
        except Exception as e:  # noqa: BLE001 - any parse failure of untrusted bytes is damage
            add(
                Finding(
                    "pickle_unreadable",
                    f"index_metadata.pickle cannot be parsed: {type(e).__name__}: {e}",
                    pfile,
                )
            )
    elif cur > 0:
        add(
            Finding(
                "pickle_missing",
                f"{cur} elements on disk but index_metadata.pickle is missing",
                pfile,
            )
        )

    if not deep or not rep.healthy or cur == 0:
        if deep and cur == 0 and rep.healthy:
            rep.deleted_count = 0
            if sizes.get(kfile, 0) != 0:
                add(
                    Finding(
                        "links_trailing",
                        f"empty index but link_lists.bin has {sizes[kfile]} bytes",
                        kfile,
                    )
                )
        return rep

    # ---- deep: level 0 ---------------------------------------------------------------------
    try:
        with open(dfile, "rb", buffering=0) as f:
            scan = _scan_level0(f, h)
    except (OSError, EOFError) as e:
        add(Finding("data_unreadable", f"cannot read data_level0.bin: {e}", dfile))
        return rep
    deleted, too_many, first_bad, oob, first_oob, self_links, labels_all = scan
    rep.deleted_count = deleted
    rep._live_labels = labels_all
    if too_many:
        add(
            Finding(
                "level0_link_count",
                f"{too_many} level-0 link counts exceed maxM0={h.max_m0} (first at element "
                f"{first_bad})",
                dfile,
            )
        )
    if oob:
        add(
            Finding(
                "level0_neighbor_out_of_range",
                f"{oob} level-0 neighbour ids >= element count {cur} (first at element "
                f"{first_oob})",
                dfile,
            )
        )
    if self_links:
        # hnswlib never links an element to itself, but a self link cannot crash a search:
        # report it without calling the index damaged (no false positives, issue 4).
        add(
            Finding(
                "level0_self_link",
                f"{self_links} level-0 lists link an element to itself",
                dfile,
                "warning",
            )
        )

    # ---- deep: upper levels (link_lists.bin) -------------------------------------------------
    if kfile in sizes and sizes[kfile] % 4 == 0:
        _walk_link_lists(kfile, h, rep)

    # ---- deep: labels --------------------------------------------------------------------------
    pk: npt.NDArray[np.uint64] | None = None
    bad_keys = False
    if label_to_id is not None:
        try:
            pk = _label_keys(label_to_id)
        except (TypeError, ValueError, OverflowError):
            bad_keys = True
    dup, only_disk, only_pickle = _compare_labels(labels_all, pk)
    if dup:
        add(Finding("labels_duplicate", f"{dup} live elements share a label with another", dfile))
    if bad_keys:
        add(Finding("pickle_labels", "label_to_id has keys that are not labels", pfile))
    if only_disk or only_pickle:
        add(
            Finding(
                "pickle_labels",
                f"labels disagree: {only_disk} live labels on disk are not in the pickle, "
                f"{only_pickle} pickle labels are not live on disk",
                pfile,
            )
        )
    return rep


def _readinto_exact(f: Any, mv: memoryview) -> None:
    got = 0
    while got < len(mv):
        n = f.readinto(mv[got:])
        if not n:
            raise EOFError(f"short read: {got} of {len(mv)} bytes")
        got += n


def _scan_level0(
    f: Any, h: HnswHeader
) -> tuple[int, int, int, int, int, int, npt.NDArray[np.uint64]]:
    """Check every level-0 element of ``data_level0.bin`` (``f`` positioned at offset 0).

    Each chunk is read into one reused buffer and checked through strided views. The common,
    healthy case costs one ``max`` per field: only when a chunk's largest link count exceeds
    ``maxM0``, its largest neighbour id (unused slots included) reaches ``cur``, or some slot
    holds the element's own id does the exact, per-slot count of :func:`_check_neighbors` and
    :func:`_count_self_links` run on that chunk. The results are those of the exact count.

    Returns:
        (deleted elements, link counts > maxM0, first such element or -1, neighbour ids >= cur,
        first element holding one or -1, self links, labels of the live elements in file order).

    Raises:
        EOFError: The file ends before ``cur`` elements.
        OSError: It cannot be read.
    """
    cur, sdpe, max_m0 = h.cur_element_count, h.size_data_per_element, h.max_m0
    per = max(1, _SCAN_CHUNK_BYTES // sdpe)
    buf = bytearray(min(per, cur) * sdpe)
    mv = memoryview(buf)
    live = np.empty(cur, dtype=np.uint64)
    n_live = deleted = too_many = oob = self_links = 0
    first_bad = first_oob = -1
    for start in range(0, cur, per):
        k = min(per, cur - start)
        _readinto_exact(f, mv[: k * sdpe])
        counts = _strided(buf, k, sdpe, 0, "<u2")
        flags = _strided(buf, k, sdpe, 2, "u1")
        nbr = _strided(buf, k, sdpe, 4, "<u4", max_m0)
        labels = _strided(buf, k, sdpe, h.label_offset, "<u8")
        selves = np.arange(start, start + k, dtype=np.int64)
        if int(counts.max()) > max_m0 or int(nbr.max()) >= cur:
            t, ft, o, fo = _check_neighbors(counts, nbr, selves, max_m0, cur)
            too_many += t
            oob += o
            if ft >= 0 and first_bad < 0:
                first_bad = ft
            if fo >= 0 and first_oob < 0:
                first_oob = fo
        if (nbr == selves.astype(nbr.dtype)[:, None]).any():
            self_links += _count_self_links(nbr, np.minimum(counts, max_m0), selves)
        is_del = (flags & 1).astype(bool)
        nd = int(np.count_nonzero(is_del))
        if nd:
            deleted += nd
            live[n_live : n_live + k - nd] = labels[~is_del]
        else:
            live[n_live : n_live + k] = labels
        n_live += k - nd
    return deleted, too_many, first_bad, oob, first_oob, self_links, live[:n_live]


def _label_keys(label_to_id: dict[Any, Any]) -> npt.NDArray[np.uint64]:
    """The pickle's labels as uint64, converted as ``int(key)`` would.

    Raises:
        TypeError, ValueError, OverflowError: A key is not a label.
    """
    try:
        # A C loop over the keys, ints only (~3x faster than a generator of int() calls).
        return np.frombuffer(array.array("Q", label_to_id), dtype=np.uint64)
    except TypeError:
        # Not all ints (real pickles never get here): the lenient int() conversion as before.
        return np.fromiter((int(x) for x in label_to_id), dtype=np.uint64, count=len(label_to_id))


def _compare_labels(
    disk: npt.NDArray[np.uint64], pk: npt.NDArray[np.uint64] | None
) -> tuple[int, int, int]:
    """Compare the live labels on disk with the pickle's labels.

    Returns:
        (live elements sharing a label with another, distinct live labels not in the pickle,
        pickle labels not live on disk); the last two are 0 when ``pk`` is None.
    """
    top = max(
        int(disk.max()) if disk.size else 0, int(pk.max()) if pk is not None and pk.size else 0
    )
    if top <= 4 * (disk.size + (pk.size if pk is not None else 0)) + 4096:
        # Labels are small dense integers (hnswlib numbers elements from 1): mark them in a
        # table instead of sorting (two 1M uint64 sorts took ~0.1 s here, this ~0.01 s).
        on_disk = np.zeros(top + 1, dtype=bool)
        on_disk[disk] = True
        dup = int(disk.size - np.count_nonzero(on_disk))
        if pk is None:
            return dup, 0, 0
        in_pk = np.zeros(top + 1, dtype=bool)
        in_pk[pk] = True
        return dup, int(np.count_nonzero(on_disk & ~in_pk)), int(np.count_nonzero(~on_disk[pk]))
    # Sparse or huge labels: sort-based set logic (np.unique's hash path took ~1.4 s per
    # million uint64 here).
    srt = np.sort(disk)
    dup = int((srt[1:] == srt[:-1]).sum()) if srt.size > 1 else 0
    if pk is None:
        return dup, 0, 0
    pks = np.sort(pk)
    if pks.size == srt.size and np.array_equal(pks, srt):
        return dup, 0, 0
    uniq = srt[np.concatenate(([True], srt[1:] != srt[:-1]))] if srt.size else srt
    return dup, int((~_isin_sorted(uniq, pks)).sum()), int((~_isin_sorted(pks, uniq)).sum())


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
    is sequential by nature, but most elements have level 0 (a zero word). So the next record
    after each non-zero word is computed for all of them at once, the Python loop only follows
    that chain (one list step per element above level 0, ~1/M of them), and the element index of
    each record and the list contents are then derived in vectorised passes.
    """
    add = rep.findings.append
    cur = h.cur_element_count
    limit = plausible_link_lists_bytes(cur, h.max_m)
    try:
        with open(kfile, "rb") as f:
            # Never more than a healthy index of this size can hold (issue 13, chroma#7510): the
            # size was checked against the same bound, this also covers a file grown meanwhile.
            raw = f.read(limit + 1)
    except OSError as e:
        add(Finding("links_unreadable", f"cannot read link_lists.bin: {e}", kfile))
        return
    if len(raw) > limit or len(raw) % 4:
        add(
            Finding(
                "links_size_implausible",
                f"link_lists.bin grew past {limit} bytes while it was read",
                kfile,
            )
        )
        return
    words = np.frombuffer(raw, dtype="<u4")
    n = words.size
    slpe = h.size_links_per_element
    slpe_words = slpe // 4
    # rank[p]: number of non-zero words before position p, i.e. the index in nz of the first
    # non-zero word at or after p. The walk at p skips nz[rank[p]] - p level-0 elements, then
    # reads a record header there. int32 where it fits: these arrays have one entry per word.
    idx_t = np.int32 if n < 2**31 - 1 else np.int64
    nz = np.flatnonzero(words)
    rank = np.zeros(n + 1, dtype=idx_t)
    np.cumsum(words != 0, dtype=idx_t, out=rank[1:])
    nbytes = words[nz].astype(np.int64)
    ends = nz + 1 + nbytes // 4
    whole = (nbytes % slpe == 0) & (ends <= n)
    # nxt[i]: index in nz of the next record header after the record at nz[i] (nz.size: none);
    # -1 stops the walk there (a bad record).
    nxt = np.full(nz.size, -1, dtype=idx_t)
    nxt[whole] = rank[ends[whole]]
    del rank, ends, whole
    step = nxt.data  # a memoryview: indexing it yields Python ints, fast in the loop below
    chain: list[int] = []
    i = 0
    # At most cur records belong to elements; one more shows the file runs on past them.
    while 0 <= i < nz.size and len(chain) <= cur:
        chain.append(i)
        i = step[i]
    bad_last = bool(chain) and step[chain[-1]] < 0
    heads = nz[np.asarray(chain, dtype=np.int64)]
    head_bytes = words[heads].astype(np.int64)
    head_ends = heads + 1 + head_bytes // 4
    prev_ends = np.concatenate(([0], head_ends))[:-1]
    # Element index of each record: the zero words skipped so far, plus the records before it.
    elem = np.cumsum(heads - prev_ends) + np.arange(heads.size)
    k = int(np.searchsorted(elem, cur))  # records that belong to the cur elements
    if k < heads.size:
        p = int(heads[k] - elem[k]) + cur  # just after element cur-1, a level-0 element
        add(
            Finding(
                "links_trailing", f"{(n - p) * 4} bytes after the last element's link list", kfile
            )
        )
        return
    if bad_last:
        j = int(elem[-1])
        nb = int(head_bytes[-1])
        if nb % slpe:
            add(
                Finding(
                    "links_nbytes",
                    f"element {j}: link list of {nb} bytes is not a whole number of levels",
                    kfile,
                )
            )
        else:
            add(
                Finding(
                    "links_truncated",
                    f"element {j}: level-{nb // slpe} link list runs past the end of "
                    "link_lists.bin",
                    kfile,
                )
            )
        return
    p = int(head_ends[-1]) if heads.size else 0
    j = int(elem[-1]) + 1 if heads.size else 0
    if n - p < cur - j:
        add(
            Finding(
                "links_truncated",
                f"link_lists.bin ends after {n * 4} bytes, before all {cur} elements",
                kfile,
            )
        )
        return
    p += cur - j
    if p < n:
        add(
            Finding(
                "links_trailing", f"{(n - p) * 4} bytes after the last element's link list", kfile
            )
        )
        return
    elem_ids = elem
    starts = heads + 1
    levels = head_bytes // slpe
    over = _levels_over_header(levels, elem_ids, h)
    if over is not None:
        add(Finding("links_level", over, kfile))
        return

    lv = np.asarray(levels, dtype=np.int64)
    max_level = int(lv.max()) if lv.size else 0
    rep.max_level = max_level
    if max_level != h.maxlevel:
        add(
            Finding(
                "header_maxlevel",
                f"header maxlevel={h.maxlevel} but the highest element level is {max_level}",
                kfile,
            )
        )
    ep_level = 0
    if lv.size:
        hit = np.flatnonzero(elem_ids == h.enterpoint_node)
        ep_level = int(lv[hit[0]]) if hit.size else 0
    if ep_level != h.maxlevel:
        # Search starts at the entry point's top level: a lower entry reads links it lacks.
        add(
            Finding(
                "header_entry_point",
                f"entry point {h.enterpoint_node} has level {ep_level}, header maxlevel is "
                f"{h.maxlevel}",
                kfile,
            )
        )
    if not lv.size:
        return
    owners = np.repeat(elem_ids, lv)
    first = np.repeat(starts, lv)
    within = np.arange(owners.size) - np.repeat(np.cumsum(lv) - lv, lv)
    block = first + within * slpe_words
    counts = words[block] & 0xFFFF
    ids = words[block[:, None] + 1 + np.arange(h.max_m)]
    t, ft, o, fo = _check_neighbors(counts, ids, owners, h.max_m, cur)
    if t:
        add(
            Finding(
                "upper_link_count",
                f"{t} upper-level link counts exceed maxM={h.max_m} (first at element {ft})",
                kfile,
            )
        )
    if o:
        add(
            Finding(
                "upper_neighbor_out_of_range",
                f"{o} upper-level neighbour ids >= element count {cur} (first at element {fo})",
                kfile,
            )
        )


# ---- bounds that hold for every index hnswlib can write (issue 13: chroma#7510) -------------
#
# hnswlib draws an element's level as ``int(-ln(U) * mult)`` with ``mult = 1/ln(M)`` (the header
# check enforces it) and U uniform in (0, 1). U comes from a generator of at most 64 bits, so
# ``-ln(U) <= 64 ln 2`` and no level exceeds ``64 ln 2 / ln M``. P(level >= l) = M**-l: the
# number of upper-level blocks of ``cur`` elements is a sum of geometric variables with mean
# ``cur/(M-1)`` and variance ``cur*M/(M-1)**2``. The bound below allows three times the mean
# plus twenty standard deviations plus four maximal elements: a healthy index exceeds it with
# a probability far below that of a disk error, a runaway record (chroma#7510: 231 GiB;
# MemPalace#1046: one 2.5 GB ``linkListSize``) exceeds it at once.


def max_plausible_level(m: int) -> int:
    """The highest level hnswlib can give an element of an index with ``M = m`` (m >= 2)."""
    return int(64 * math.log(2) / math.log(max(2, m))) + 1


def plausible_link_lists_bytes(cur: int, m: int) -> int:
    """Upper bound on the size of a healthy ``link_lists.bin`` holding ``cur`` elements.

    Each element takes a 4-byte size word, plus ``maxM*4+4`` bytes per level above 0.
    """
    m = max(2, m)
    mean = cur / (m - 1)
    sd = math.sqrt(cur * m) / (m - 1)
    blocks = int(3 * mean + 20 * sd) + 4 * max_plausible_level(m)
    return 4 * cur + blocks * (m * 4 + 4)


def _level_bound_findings(h: HnswHeader, hfile: str) -> list[Finding]:
    """The header's ``maxlevel`` against the highest level hnswlib can draw."""
    top = max_plausible_level(h.m)
    if h.maxlevel > top:
        return [
            Finding(
                "header_maxlevel",
                f"maxlevel={h.maxlevel} is higher than any level hnswlib draws with M={h.m} "
                f"(at most {top})",
                hfile,
            )
        ]
    return []


def _links_size_findings(h: HnswHeader, size: int, kfile: str) -> list[Finding]:
    """``link_lists.bin`` larger than any healthy index of ``cur`` elements: refuse to read it.

    Checked from ``stat`` alone (shallow checks too), before anything reads the file: a runaway
    file can be hundreds of GB, and hnswlib would allocate each bogus record when loading it.
    """
    limit = plausible_link_lists_bytes(h.cur_element_count, h.max_m)
    if size > limit:
        return [
            Finding(
                "links_size_implausible",
                f"link_lists.bin is {size} bytes; {h.cur_element_count} elements with M={h.m} "
                f"hold at most {limit}: a link-list size the header does not allow",
                kfile,
            )
        ]
    return []


def _levels_over_header(
    levels: npt.NDArray[Any], elem_ids: npt.NDArray[Any], h: HnswHeader
) -> str | None:
    """The first link list with more levels than the header's ``maxlevel`` allows, described."""
    if not levels.size:
        return None
    bad = np.flatnonzero(levels > max(h.maxlevel, 0))
    if not bad.size:
        return None
    i = int(bad[0])
    return (
        f"{bad.size} link lists have more levels than maxlevel={h.maxlevel} (first: element "
        f"{int(elem_ids[i])}, {int(levels[i])} levels, {int(levels[i]) * h.size_links_per_element}"
        " bytes)"
    )


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
