"""Which SQLite schema migrations the installed chromadb knows, without importing it.

Chroma records every migration it applied in the ``migrations`` table of ``chroma.sqlite3``
(``dir``, ``version``, ``filename``, ``sql``, ``hash``). chromadb 1.x applies them from its Rust
core, which embeds the SQL files: the Python package's own ``chromadb/migrations`` folder is
older (1.5.9 ships sysdb up to 00009 and metadb up to 00005 there, while its core applies
sysdb 00010 and metadb 00006), so the names are read from the compiled core itself, where
each file name is stored as a string.

Measured on 1.5.9 (issue 13, chroma#5909): a directory whose table lists a migration the core
does not know opens without any error or warning, and the core then writes into a schema it
does not understand; a known migration with another hash fails at ``PersistentClient()``
("Inconsistent hash"). So an unknown migration means "written by a newer chromadb": the
directory must not be opened or repaired by this one.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import sqlite3
import threading
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SchemaVersion", "compare_schema", "installed_migrations", "written_by_newer"]

_NAME_TAIL = re.compile(rb"\d{5}-[a-z0-9_-]+$")
_SUFFIX = b".sqlite.sql"
_CHUNK = 8 << 20
_cache: dict[tuple[str, int, int], frozenset[str]] = {}
_cache_lock = threading.Lock()


@dataclass
class SchemaVersion:
    """The directory's migrations against the installed chromadb's.

    Attributes:
        installed_chromadb: Version of the installed chromadb, or ``None`` if absent.
        unknown: ``(dir, version, filename)`` the directory has and the installed one lacks.
        directory_schema: Highest migration version per dir in the directory.
        installed_schema: Highest version per dir among the directory's migrations that the
            installed chromadb knows (what it would have written itself).
        checked: ``False`` when the installed migrations could not be determined.
    """

    installed_chromadb: str | None
    unknown: list[tuple[str, int, str]] = field(default_factory=list)
    directory_schema: dict[str, int] = field(default_factory=dict)
    installed_schema: dict[str, int] = field(default_factory=dict)
    checked: bool = True

    @property
    def newer(self) -> bool:
        """True when the directory was written by a chromadb newer than the installed one."""
        return bool(self.unknown)

    def describe(self) -> str:
        """One sentence naming both versions."""

        def fmt(d: dict[str, int]) -> str:
            return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "none"

        first = ", ".join(f"{d} {v} ({n})" for d, v, n in self.unknown[:3])
        more = f" and {len(self.unknown) - 3} more" if len(self.unknown) > 3 else ""
        return (
            f"written by a newer chromadb than the installed {self.installed_chromadb}: its "
            f"schema is at {fmt(self.directory_schema)}, chromadb {self.installed_chromadb} "
            f"knows up to {fmt(self.installed_schema)} and not {first}{more}. Upgrade chromadb "
            "(or open it with the version that wrote it); nothing was changed"
        )

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict."""
        return {
            "installed_chromadb": self.installed_chromadb,
            "unknown_migrations": [f"{d} {v} {n}" for d, v, n in self.unknown],
            "directory_schema": dict(self.directory_schema),
            "installed_schema": dict(self.installed_schema),
        }


def _chromadb_version() -> str | None:
    try:
        return importlib.metadata.version("chromadb")
    except importlib.metadata.PackageNotFoundError:
        return None


def _core_library() -> str | None:
    """Path of chromadb's compiled core (``chromadb_rust_bindings``), found without importing."""
    try:
        spec = importlib.util.find_spec("chromadb_rust_bindings")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    places = list(spec.submodule_search_locations or [])
    if spec.origin and not places:
        places = [os.path.dirname(spec.origin)]
    for place in places:
        try:
            names = sorted(os.listdir(place))
        except OSError:
            continue
        for name in names:
            if name.startswith("chromadb_rust_bindings") and name.endswith((".so", ".pyd")):
                return os.path.join(place, name)
    return None


def _scan(path: str) -> frozenset[str]:
    """Every ``NNNNN-name.sqlite.sql`` string in a binary, read in chunks (~0.2 s for 59 MB)."""
    found: set[str] = set()
    tail = b""
    with open(path, "rb") as f:
        while True:
            block = f.read(_CHUNK)
            if not block:
                break
            buf = tail + block
            i = buf.find(_SUFFIX)
            while i >= 0:
                m = _NAME_TAIL.search(buf, max(0, i - 200), i)
                if m:
                    found.add(m.group().decode("ascii") + _SUFFIX.decode())
                i = buf.find(_SUFFIX, i + 1)
            tail = buf[-256:]
    return frozenset(found)


def installed_migrations() -> frozenset[str] | None:
    """File names of every migration the installed chromadb's core can apply (``None``: unknown).

    Cached per process, keyed by the library's path, size and mtime.
    """
    lib = _core_library()
    if lib is None:
        return None
    try:
        st = os.stat(lib)
    except OSError:
        return None
    key = (lib, st.st_size, st.st_mtime_ns)
    with _cache_lock:
        hit = _cache.get(key)
    if hit is not None:
        return hit
    try:
        names = _scan(lib)
    except OSError:
        return None
    if not names:
        return None
    with _cache_lock:
        _cache[key] = names
    return names


def compare_schema(
    con: sqlite3.Connection, known: frozenset[str] | None = None
) -> SchemaVersion | None:
    """Compare the ``migrations`` table of an open ``chroma.sqlite3`` with the installed chromadb.

    Args:
        con: A read-only connection.
        known: The installed migrations (default: :func:`installed_migrations`).

    Returns:
        ``None`` when the database has no ``migrations`` table (not a Chroma 0.4+ database),
        otherwise a :class:`SchemaVersion` (``checked`` is ``False`` when the installed
        migrations are unknown: then nothing is called newer).

    Raises:
        sqlite3.Error: The table cannot be read.
    """
    has = con.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'migrations'"
    ).fetchone()
    if has is None:
        return None
    rows = [
        (str(r[0]), int(r[1]), str(r[2]))
        for r in con.execute("SELECT dir, version, filename FROM migrations")
    ]
    if known is None:
        known = installed_migrations()
    out = SchemaVersion(installed_chromadb=_chromadb_version(), checked=known is not None)
    for d, v, name in rows:
        out.directory_schema[d] = max(v, out.directory_schema.get(d, 0))
        if known is None or name in known:
            out.installed_schema[d] = max(v, out.installed_schema.get(d, 0))
        else:
            out.unknown.append((d, v, name))
    out.unknown.sort()
    return out


def written_by_newer(path: str | os.PathLike[str]) -> bool:
    """True when ``<path>/chroma.sqlite3`` has migrations the installed chromadb lacks.

    For code that writes to a directory outside Chroma (WAL compaction, repairs): such a
    directory must not be written at all. Any failure to tell means ``False``.
    """
    db = os.path.join(os.fspath(path), "chroma.sqlite3")
    if not os.path.isfile(db):
        return False
    try:
        con = sqlite3.connect(f"file:{os.path.abspath(db)}?mode=ro", uri=True, timeout=1.0)
        try:
            sv = compare_schema(con)
        finally:
            con.close()
    except sqlite3.Error:
        return False
    return bool(sv is not None and sv.newer)
