"""The HNSW segment format (CHROMA_FACTS.md §1): file names, the header, findings and reports.

Also the only reader of ``index_metadata.pickle`` (an allow-list unpickler: the file is
untrusted, a plain ``pickle.load`` would run whatever it names) and the bounds every index
hnswlib can write holds (issue 13), which the check and the runtime's size limits share.
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
    "HEADER_FILE",
    "DATA_FILE",
    "LENGTH_FILE",
    "LINKS_FILE",
    "PICKLE_FILE",
    "MAX_PICKLE_BYTES",
    "Severity",
    "Finding",
    "HnswHeader",
    "SegmentReport",
    "UnsafePickleError",
    "read_index_metadata",
    "read_header",
    "max_plausible_level",
    "plausible_link_lists_bytes",
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
