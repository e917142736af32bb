"""The names and small file helpers every storage module shares: the bottom of storage/.

Where a persist directory keeps what (Chroma's ``chroma.sqlite3`` and segment types, the
``.safechroma`` state folder, the losses marker), the UTC stamp that names backups, and the
write-then-rename and directory fsync every repair step relies on. Imports nothing of safechroma.
"""

from __future__ import annotations

import datetime as _dt
import os
import sqlite3
from collections.abc import Callable
from typing import Any

__all__ = [
    "LOSSES_MARKER",
    "METADATA_SEGMENT_TYPE",
    "SQLITE_FILE",
    "STATE_DIR",
    "VECTOR_SEGMENT_TYPE",
    "Progress",
    "backup_files",
]

STATE_DIR = ".safechroma"
SQLITE_FILE = "chroma.sqlite3"
VECTOR_SEGMENT_TYPE = "urn:chroma:segment/vector/hnsw-local-persisted"
METADATA_SEGMENT_TYPE = "urn:chroma:segment/metadata/sqlite"
Progress = Callable[[str, dict[str, Any]], None]

# Issue 21: a repair that could not bring every record back whole says so until a person
# acknowledges it, so `safechroma check` after it is not "healthy" and the backup holding what
# is left of those records is not cleaned up by someone who believed a plain "repaired".
LOSSES_MARKER = "losses.json"


def backup_files(path: str | os.PathLike[str]) -> list[str]:
    """Every file of every finished backup under ``<path>/.safechroma/backups``: oldest backup
    first, names sorted within one (a backup still being written ends in ``.partial``)."""
    backups = os.path.join(os.fspath(path), STATE_DIR, "backups")
    if not os.path.isdir(backups):
        return []
    out: list[str] = []
    for stamp in sorted(os.listdir(backups)):
        d = os.path.join(backups, stamp)
        if stamp.endswith(".partial") or not os.path.isdir(d):
            continue
        out += [os.path.join(d, name) for name in sorted(os.listdir(d))]
    return out


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


def _ro(db: str) -> sqlite3.Connection:
    """A read-only connection to ``db`` (a check or a plan never writes the file it reads)."""
    return sqlite3.connect(f"file:{os.path.abspath(db)}?mode=ro", uri=True, timeout=5.0)


def _seq(v: Any) -> int:
    """Sequence ids are integers since metadb migration 00005; older ones were big-endian blobs."""
    if v is None:
        return 0
    if isinstance(v, (bytes, bytearray)):
        return int.from_bytes(v, "big")
    return int(v)
