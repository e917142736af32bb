"""How large a healthy persist directory's files can plausibly grow: a bound for the worker.

Chroma's HNSW loader trusts the sizes it reads: one torn or bogus link-list record made
``link_lists.bin`` grow to 231 GiB and panic the host (chroma-core/chroma#7510); reproduced here
on 1.5.9 with one torn record in a 1000-element index: 204 GB apparent size, 36 GB written, in
two minutes. The validator rejects such files before Chroma loads them
(:func:`safechroma.storage.hnsw.check_segment`). This module gives the runtime a second line:
a per-file size ceiling (``RLIMIT_FSIZE``) for the worker process, derived from the headers,
so a runaway write kills the worker instead of filling the disk.

Pure functions over ``stat`` and ``header.bin``; no Chroma, no SQLite connection, never writes.
"""

from __future__ import annotations

import os

from safechroma.storage.hnsw import (
    HEADER_FILE,
    plausible_link_lists_bytes,
    read_header,
)

__all__ = ["plausible_max_file_bytes"]

# Bytes of index_metadata.pickle per element: the id twice (id_to_label and label_to_id), the
# label twice, the seq id and pickle framing. 1.5.9 writes ~36 bytes per 8-character id, so
# 256 covers ids of ~100 characters; Chroma caps nothing, hence the headroom factor on top.
_PICKLE_BYTES_PER_ELEMENT = 256


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def plausible_max_file_bytes(
    path: str | os.PathLike[str],
    *,
    growth_elements: int = 1_000_000,
    sqlite_bytes_per_record: int = 65536,
    headroom: float = 2.0,
    min_bytes: int = 1 << 30,
) -> int:
    """The largest size any one file of ``path`` can reach while growing by ``growth_elements``.

    Meant for ``resource.setrlimit(RLIMIT_FSIZE, ...)`` in the worker (the limit applies to every
    file the process writes, so it must cover the largest one). For each vector segment whose
    ``header.bin`` parses, the index is assumed to grow by ``growth_elements`` elements, with
    Chroma's resize rule (capacity becomes the next power of two of what it must hold), and the
    largest of its files at that size is taken: ``data_level0.bin`` (capacity x
    ``size_data_per_element``), ``link_lists.bin`` (:func:`~safechroma.storage.hnsw.
    plausible_link_lists_bytes`), ``length.bin`` and the pickle. ``chroma.sqlite3`` (and its
    journal) may grow by ``sqlite_bytes_per_record`` per new record (documents and metadata
    are the caller's and unbounded by the index; the default allows 64 KB per record). Every
    existing file's current size is also covered. The result is the largest of these, times
    ``headroom``, and never below ``min_bytes``.

    Recompute it between calls (it costs a ``stat`` and a 100-byte read per segment) when the
    directory grows by more than ``growth_elements`` in a worker's life.

    Args:
        path: The persist directory (may not exist yet: then ``min_bytes``).
        growth_elements: New elements (records) the bound must leave room for.
        sqlite_bytes_per_record: SQLite growth allowed per new record.
        headroom: Factor on top of the computed size.
        min_bytes: Floor of the result.

    Returns:
        A size in bytes.
    """
    root = os.fspath(path)
    growth = max(0, int(growth_elements))
    # chroma.sqlite3 grows with every record even before it exists (a fresh directory): a
    # ceiling of min_bytes there would kill a worker bulk-loading a new directory.
    largest = growth * max(0, int(sqlite_bytes_per_record))
    try:
        entries = list(os.scandir(root))
    except OSError:
        return max(int(min_bytes), int(largest * headroom))
    for entry in entries:
        try:
            if entry.is_file(follow_symlinks=False):
                size = entry.stat(follow_symlinks=False).st_size
                if entry.name.startswith("chroma.sqlite3"):
                    size += growth * max(0, int(sqlite_bytes_per_record))
                largest = max(largest, size)
                continue
            if not entry.is_dir(follow_symlinks=False):
                continue
            largest = max(largest, _segment_bound(entry.path, growth))
        except OSError:
            continue
    return max(int(min_bytes), int(largest * headroom))


def _segment_bound(seg: str, growth: int) -> int:
    """Largest plausible file of one segment directory after ``growth`` more elements."""
    current = 0
    try:
        for f in os.scandir(seg):
            if f.is_file(follow_symlinks=False):
                current = max(current, f.stat(follow_symlinks=False).st_size)
    except OSError:
        return 0
    try:
        h = read_header(os.path.join(seg, HEADER_FILE))
    except (OSError, ValueError):
        return current
    sdpe = h.size_data_per_element
    if h.version != 1 or not 0 < sdpe < 1 << 24 or not 2 <= h.m <= 32767:
        # Not a header we can reason from (the validator reports why): current sizes only.
        return current
    cap = _next_pow2(max(h.max_elements, h.cur_element_count) + growth)
    return max(
        current,
        cap * sdpe,
        plausible_link_lists_bytes(cap, h.max_m),
        4 * cap,
        cap * _PICKLE_BYTES_PER_ELEMENT,
    )
