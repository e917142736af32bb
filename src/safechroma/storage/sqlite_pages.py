"""Read rows out of a damaged SQLite file: b-tree range reads that step around bad pages, and a
small page scanner for the leaf pages no intact b-tree reaches.

Python's ``sqlite3`` has no recover API (issue 12). Two complementary readers:

* :func:`read_table`: ``SELECT`` by rowid ranges through SQLite itself; a range that fails is
  split and retried, so every row outside the damaged pages comes back. Rows read this way are
  live by construction (reached from the table's root).
* :func:`scan_leaf_pages`: decode every table-leaf page of the file (record format of
  https://sqlite.org/fileformat2.html, overflow chains included) that no readable b-tree
  claims. It finds rows under a destroyed root or interior page, and also stale copies on free
  pages: its rows must be validated by the caller.

:func:`readable_copy` makes a file whose 100-byte header is destroyed readable again by writing
a plausible header into a copy (the schema on page 1 follows the header and usually survives).
Nothing here writes to the damaged file itself.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import struct
from collections.abc import Collection, Iterator
from typing import Any

__all__ = [
    "claimed_pages",
    "is_hot_journal",
    "page_size_of",
    "read_both_ends",
    "read_ranges",
    "read_table",
    "readable_copy",
    "rebuild_header",
    "scan_leaf_pages",
]

_MAGIC = b"SQLite format 3\x00"
_PAGE_TYPES = (0x02, 0x05, 0x0A, 0x0D)


def _connect(path: str) -> sqlite3.Connection:
    con = sqlite3.connect(f"file:{os.path.abspath(path)}?mode=ro", uri=True, timeout=1.0)
    con.text_factory = lambda b: b.decode("utf-8", "replace")
    return con


_JOURNAL_MAGIC = bytes.fromhex("d9d505f920a163d7")


def is_hot_journal(path: str) -> bool:
    """``path`` is a rollback journal SQLite would play back: it exists and starts with the
    journal magic (a journal zeroed or truncated at commit does not)."""
    try:
        with open(path, "rb") as f:
            return f.read(8) == _JOURNAL_MAGIC
    except OSError:
        return False


def _opens(path: str) -> bool:
    try:
        con = _connect(path)
        try:
            con.execute("SELECT count(*) FROM sqlite_master").fetchone()
        finally:
            con.close()
        return True
    except sqlite3.DatabaseError:
        return False


def page_size_of(path: str) -> int:
    """The page size: from the header when it is sane, else guessed from the page layout."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(100)
        if head[:16] == _MAGIC:
            ps = struct.unpack(">H", head[16:18])[0]
            ps = 65536 if ps == 1 else ps
            if ps >= 512 and ps & (ps - 1) == 0:
                return ps
        best, best_hits = 4096, -1
        for ps in (4096, 1024, 2048, 8192, 16384, 32768, 65536, 512):
            hits = 0
            for n in range(1, min(64, size // ps)):
                f.seek(n * ps)
                b = f.read(1)
                hits += bool(b) and b[0] in _PAGE_TYPES
            if hits > best_hits:
                best, best_hits = ps, hits
        return best


def _header(page_size: int, pages: int) -> bytes:
    """A valid 100-byte header for a rollback-journal (``journal_mode=delete``) UTF-8 file.

    Fixed fields as SQLite writes them (https://sqlite.org/fileformat2.html#the_database_header):
    write/read versions 1 (legacy rollback journal), no reserved bytes, payload fractions
    64/32/32, schema format 4, UTF-8. The change counter equals the version-valid-for number, so
    SQLite trusts the page count. The freelist was in the lost header: none is declared (its
    pages read as unused, which is harmless to a reader). The schema cookie only has to stay
    the same while a connection is open.
    """
    ps = 1 if page_size == 65536 else page_size
    return (
        _MAGIC
        + struct.pack(">HBBBBBB", ps, 1, 1, 0, 64, 32, 32)
        # change counter, pages, freelist trunk and count (lost: none), schema cookie, schema
        # format 4, cache size, autovacuum root, UTF-8, user version, incremental vacuum, app id
        + struct.pack(">12I", 1, pages, 0, 0, 1, 4, 0, 0, 1, 0, 0, 0)
        + bytes(20)
        + struct.pack(">II", 1, 3040001)
    )


def _page1_fits(head: bytes, page_size: int) -> bool:
    """Page 1's b-tree header (at offset 100) is consistent with ``page_size``."""
    if len(head) < 112 or head[100] not in (0x05, 0x0D):
        return False
    cells = struct.unpack(">H", head[103:105])[0]
    start = struct.unpack(">H", head[105:107])[0] or 65536
    ptrs = 100 + (12 if head[100] == 0x05 else 8)
    if start > page_size or ptrs + 2 * cells > page_size:
        return False
    for c in range(cells):
        off = struct.unpack(">H", head[ptrs + 2 * c : ptrs + 2 * c + 2])[0]
        if not ptrs + 2 * cells <= off < page_size:
            return False
    return True


def _root_score(path: str, page_size: int) -> int:
    """How many b-tree roots named in ``sqlite_master`` start with a page of their kind.

    -1 when SQLite cannot read the schema under this page size. A wrong page size points the
    roots at the wrong bytes (measured: 4096-byte pages read as 8192 made the file "malformed",
    issue 21), so the true size scores highest.
    """
    try:
        con = _connect(path)
        try:
            roots = con.execute(
                "SELECT type, rootpage FROM sqlite_master WHERE rootpage > 0"
            ).fetchall()
        finally:
            con.close()
    except sqlite3.DatabaseError:
        return -1
    score = 0
    with open(path, "rb") as f:
        for kind, root in roots:
            f.seek((int(root) - 1) * page_size + (100 if root == 1 else 0))
            b = f.read(1)
            want = (0x05, 0x0D) if kind == "table" else (0x02, 0x0A)
            score += bool(b) and b[0] in want
    return score


def rebuild_header(path: str) -> int:
    """Write a valid 100-byte header over ``path`` (a copy), taken from the file itself.

    Candidate page sizes are the powers of two page 1's b-tree header allows; each is tried
    with SQLite, and the one under which the most b-tree roots land on pages of their kind
    wins (ties: the layout guess of :func:`page_size_of`). The page count is the file size over
    the page size (a torn last page is left out).

    Returns:
        The page size written.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(65536)
    guess = page_size_of(path)
    best, best_score = guess, -2
    for ps in (guess, 4096, 1024, 2048, 8192, 16384, 32768, 65536, 512):
        if size < ps or not _page1_fits(head, ps):
            continue
        with open(path, "r+b") as f:
            f.write(_header(ps, size // ps))
        score = _root_score(path, ps)
        if score > best_score:
            best, best_score = ps, score
    with open(path, "r+b") as f:
        f.write(_header(best, max(1, size // best)))
    return best


def readable_copy(db: str, dest: str) -> tuple[str, bool]:
    """Copy ``db`` to ``dest`` and, if SQLite cannot open it, rewrite the copy's header.

    Returns:
        (``dest``, whether the header was rewritten).
    """
    shutil.copyfile(db, dest)
    journal = db + "-journal"
    if is_hot_journal(journal):
        # The file holds a transaction that never committed; its journal holds the pages as
        # they were. SQLite rolls it back on the first read-write open, as Chroma would.
        shutil.copyfile(journal, dest + "-journal")
        try:
            con = sqlite3.connect(dest, timeout=1.0)
            try:
                con.execute("SELECT count(*) FROM sqlite_master").fetchone()
            finally:
                con.close()
        except sqlite3.DatabaseError:
            pass
        if os.path.exists(dest + "-journal"):
            os.remove(dest + "-journal")  # not rolled back: read the file as it is
    if _opens(dest):
        return dest, False
    rebuild_header(dest)
    return dest, True


def read_ranges(
    con: sqlite3.Connection,
    query: str,
    lo: int,
    hi: int,
    *,
    budget: int = 2000,
    min_width: int = 16,
    unique: bool = True,
) -> tuple[list[tuple[Any, ...]], list[tuple[int, int]]]:
    """Rows of ``query`` (two ``?``: an integer key range, rows ordered by that key, the key
    first) over ``[lo, hi]``; a range that fails is split and retried.

    With ``unique=False`` (several rows per key, as in an index on ``(id, key)``), a read that
    fails after some rows of a key is retried from that key, so a key is never taken as read
    whole when only its first rows were (issue 21: a record whose document row was read and
    whose other keys were on the lost page). Rows may then repeat.

    Returns:
        (rows, failed): ``failed`` lists the key ranges that could not be read (each at most
        ``min_width`` wide, or the rest when the retry budget ran out).
    """
    rows: list[tuple[Any, ...]] = []
    failed: list[tuple[int, int]] = []
    stack = [(lo, hi)]
    tries = 0
    while stack:
        a, b = stack.pop()
        if a > b:
            continue
        tries += 1
        if tries > budget:
            failed.append((a, b))
            failed.extend(stack)
            break
        last = a - 1
        try:
            for r in con.execute(query, (a, b)):
                rows.append(tuple(r))
                last = int(r[0])
            continue
        except sqlite3.DatabaseError:
            pass
        a = last if not unique and last >= a else last + 1
        if b - a < min_width:
            failed.append((a, b))
            continue
        mid = (a + b) // 2
        stack.append((mid + 1, b))
        stack.append((a, mid))
    return rows, sorted(failed)


def read_table(
    con: sqlite3.Connection, table: str, *, budget: int = 2000, min_width: int = 16
) -> tuple[dict[int, tuple[Any, ...]], bool]:
    """Every row of ``table`` SQLite can reach, as ``{rowid: row}``.

    Returns:
        (rows, complete): ``complete`` is False when some range could not be read.
    """
    q = f'SELECT rowid, * FROM "{table}" WHERE rowid BETWEEN ? AND ? ORDER BY rowid'
    try:
        lo_hi = con.execute(f'SELECT min(rowid), max(rowid) FROM "{table}"').fetchone()
        lo, hi = (int(lo_hi[0]), int(lo_hi[1])) if lo_hi[0] is not None else (1, 0)
    except sqlite3.DatabaseError:
        lo, hi = -(1 << 40), 1 << 40
    got, failed = read_ranges(con, q, lo, hi, budget=budget, min_width=min_width)
    return {int(r[0]): tuple(r[1:]) for r in got}, not failed


def read_both_ends(
    con: sqlite3.Connection, forward: str, backward: str, params: tuple[Any, ...] = ()
) -> tuple[list[tuple[Any, ...]], bool]:
    """Rows of a query read from its start and, once it fails, from its end (``backward`` is
    the same query in reverse order): around a damaged page of an index ordered by text or
    real values, where rowid ranges cannot step.

    Returns:
        (rows, complete): the rows of both passes (without duplicates), whether the forward
        pass read to the end.
    """
    rows: list[tuple[Any, ...]] = []
    try:
        for r in con.execute(forward, params):
            rows.append(tuple(r))
        return rows, True
    except sqlite3.DatabaseError:
        pass
    seen = set(rows)
    try:
        for r in con.execute(backward, params):
            t = tuple(r)
            if t in seen:
                break
            rows.append(t)
    except sqlite3.DatabaseError:
        pass
    return rows, False


def claimed_pages(
    con: sqlite3.Connection, *, exclude: Collection[str] = ()
) -> tuple[set[int], set[str]]:
    """Pages of every b-tree SQLite can still walk (``dbstat``), and the names that failed.

    Names in ``exclude`` (tables that could not be read whole) claim no page: ``dbstat`` walked
    a table whose every read failed (issue 21: ``embedding_metadata`` unreadable, ``dbstat``
    without error), and the page scanner must still read its leaves. A walk that fails part
    way claims none of the pages it saw.
    """
    names = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE rootpage > 0")]
    pages: set[int] = set()
    failed: set[str] = set()
    for name in names:
        try:
            seen = {r[0] for r in con.execute("SELECT pageno FROM dbstat WHERE name = ?", (name,))}
        except sqlite3.DatabaseError:
            failed.add(name)
            continue
        if name not in exclude:
            pages |= seen
    return pages, failed


def _varint(b: bytes, i: int) -> tuple[int, int]:
    v = 0
    for k in range(8):
        if i + k >= len(b):
            raise ValueError("varint past the end")
        c = b[i + k]
        v = (v << 7) | (c & 0x7F)
        if c < 0x80:
            return v, i + k + 1
    if i + 8 >= len(b):
        raise ValueError("varint past the end")
    return (v << 8) | b[i + 8], i + 9


def _record(payload: bytes) -> tuple[Any, ...]:
    hsize, i = _varint(payload, 0)
    if hsize > len(payload) or hsize < 1:
        raise ValueError("bad record header")
    types = []
    while i < hsize:
        t, i = _varint(payload, i)
        types.append(t)
    pos = hsize
    out: list[Any] = []
    for t in types:
        if t == 0:
            out.append(None)
        elif 1 <= t <= 6:
            n = (1, 2, 3, 4, 6, 8)[t - 1]
            out.append(int.from_bytes(payload[pos : pos + n], "big", signed=True))
            pos += n
        elif t == 7:
            out.append(struct.unpack(">d", payload[pos : pos + 8])[0])
            pos += 8
        elif t in (8, 9):
            out.append(t - 8)
        elif t >= 12:
            n = (t - 12) // 2
            raw = payload[pos : pos + n]
            if len(raw) != n:
                raise ValueError("value past the end")
            out.append(raw if t % 2 == 0 else raw.decode("utf-8", "strict"))
            pos += n
        else:
            raise ValueError("reserved serial type")
        if pos > len(payload):
            raise ValueError("record past the end")
    return tuple(out)


def scan_leaf_pages(
    path: str, page_size: int, *, skip: set[int] | None = None, reserved: int = 0
) -> Iterator[tuple[int, int, tuple[Any, ...]]]:
    """Yield ``(page number, rowid, values)`` for every decodable cell of every table-leaf page.

    Pages in ``skip`` (those a readable b-tree owns) are not read. Cells that do not decode
    (overwritten bytes) are dropped one by one; a page that does not parse is skipped.
    """
    size = os.path.getsize(path)
    n_pages = size // page_size
    usable = page_size - reserved
    max_local = usable - 35
    min_local = ((usable - 12) * 32 // 255) - 23
    skip = skip or set()
    with open(path, "rb") as f:

        def page(n: int) -> bytes:
            f.seek((n - 1) * page_size)
            return f.read(page_size)

        for n in range(1, n_pages + 1):
            if n in skip:
                continue
            buf = page(n)
            h = 100 if n == 1 else 0
            if len(buf) < h + 8 or buf[h] != 0x0D:
                continue
            cells = struct.unpack(">H", buf[h + 3 : h + 5])[0]
            if h + 8 + 2 * cells > usable:
                continue
            for c in range(cells):
                off = struct.unpack(">H", buf[h + 8 + 2 * c : h + 10 + 2 * c])[0]
                try:
                    plen, i = _varint(buf, off)
                    rowid, i = _varint(buf, i)
                    if rowid >= 1 << 63:
                        rowid -= 1 << 64
                    if plen <= max_local:
                        payload = buf[i : i + plen]
                    else:
                        k = min_local + (plen - min_local) % (usable - 4)
                        local = k if k <= max_local else min_local
                        payload = buf[i : i + local]
                        nxt = struct.unpack(">I", buf[i + local : i + local + 4])[0]
                        hops = 0
                        while len(payload) < plen and 0 < nxt <= n_pages and hops < 100000:
                            ov = page(nxt)
                            nxt = struct.unpack(">I", ov[:4])[0]
                            payload += ov[4:usable]
                            hops += 1
                        payload = payload[:plen]
                    if len(payload) != plen:
                        continue
                    yield n, rowid, _record(payload)
                except (ValueError, struct.error, UnicodeDecodeError):
                    continue
