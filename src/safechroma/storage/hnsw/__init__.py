"""Read one Chroma HNSW segment directory without Chroma.

Everything here is pure Python (``struct`` + ``numpy``) over untrusted bytes: no hnswlib, no
chromadb, no ``mmap`` (a file truncated under a mapping raises SIGBUS in the reader, FACTS §3),
no plain ``pickle.load``. The file layout is CHROMA_FACTS.md §1.

Two entry points:

* :func:`check_segment` walks the files and returns a :class:`SegmentReport` whose findings say
  precisely what is wrong (or nothing, for every healthy shape: FACTS §1 "Healthy shapes").
* :func:`salvage_vectors` reads every structurally intact vector out of ``data_level0.bin`` and
  maps it to its Chroma id through ``index_metadata.pickle``.

The parts: :mod:`.files` (the format: header, findings, the safe pickle reader, the bounds
every index hnswlib writes holds), :mod:`.check` and :mod:`.salvage`.
"""

from __future__ import annotations

from safechroma.storage.hnsw.check import (
    check_segment,
)
from safechroma.storage.hnsw.files import (
    DATA_FILE,
    HEADER_FILE,
    HEADER_FORMAT,
    HEADER_SIZE,
    LENGTH_FILE,
    LINKS_FILE,
    MAX_PICKLE_BYTES,
    PICKLE_FILE,
    Finding,
    HnswHeader,
    SegmentReport,
    Severity,
    UnsafePickleError,
    max_plausible_level,
    plausible_link_lists_bytes,
    read_header,
    read_index_metadata,
)
from safechroma.storage.hnsw.salvage import (
    LiveElements,
    Salvage,
    read_label_map,
    read_live_elements,
    salvage_vectors,
)

__all__ = [
    "DATA_FILE",
    "Finding",
    "HEADER_FILE",
    "HEADER_FORMAT",
    "HEADER_SIZE",
    "HnswHeader",
    "LENGTH_FILE",
    "LINKS_FILE",
    "LiveElements",
    "MAX_PICKLE_BYTES",
    "PICKLE_FILE",
    "Salvage",
    "SegmentReport",
    "Severity",
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
