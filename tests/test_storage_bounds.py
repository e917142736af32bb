"""A file that grows without bound (chroma-core/chroma#7510, MemPalace#1046).

One torn record in ``link_lists.bin`` makes chromadb 1.5.9 write without bound: the loader
trusts the record's size, and every later flush writes the bogus lists back (measured once by
hand on a 1000-element index: 204 GB apparent size, 36 GB written in two minutes). These tests
reproduce it with plain chromadb under an ``RLIMIT_FSIZE`` (so the disk is safe), show that the
validator rejects every link-list size the header does not allow before Chroma loads the index,
without reading an oversized file, and that :func:`plausible_max_file_bytes` is a limit healthy
growth stays under and the runaway does not.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import struct
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import chroma_dirs as cd  # noqa: E402

from safechroma.storage.hnsw import (  # noqa: E402
    max_plausible_level,
    plausible_link_lists_bytes,
)
from safechroma.storage.limits import plausible_max_file_bytes  # noqa: E402
from safechroma.storage.validate import check_directory  # noqa: E402


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> str:
    """1000 records, flushed every 100 (upper levels exist), WAL purged: built once."""
    d = str(tmp_path_factory.mktemp("bounds") / "base")
    cd.make_collection_dir(d, n=1000, dim=8, sync_threshold=100)
    return d


def _copy(base: str, tmp_path: Path, name: str = "d") -> str:
    dest = str(tmp_path / name)
    shutil.copytree(base, dest)
    return dest


def _links(root: str) -> tuple[str, np.ndarray, int]:
    seg = cd.segment_dir(root)
    h = cd._header(seg)
    p = os.path.join(seg, "link_lists.bin")
    return p, np.fromfile(p, dtype="<u4"), int(h[9]) * 4 + 4


def _codes(rep: object) -> set[str]:
    return {f.code for c in rep.collections for f in c.findings}  # type: ignore[attr-defined]


def _tear_first_record(root: str, levels: int) -> None:
    """The first upper-level record claims ``levels`` levels and the file ends inside it."""
    p, words, slpe = _links(root)
    first = int(np.flatnonzero(words)[0])
    with open(p, "r+b") as f:
        f.seek(first * 4)
        f.write(struct.pack("<I", levels * slpe))
        f.truncate(first * 4 + 4 + int(words[first]))


@pytest.mark.slow
def test_torn_record_runs_away_in_plain_chromadb_and_the_validator_rejects_it(
    base: str, tmp_path: Path
) -> None:
    """chroma#7510 reproduced: plain chromadb writes past a 64 MB ceiling on a 1000-record index."""
    healthy = _copy(base, tmp_path, "healthy")
    torn = _copy(base, tmp_path, "torn")
    _tear_first_record(torn, 100_000)

    rep = check_directory(torn)
    assert rep.status == "damaged"
    assert _codes(rep) & {"links_truncated", "links_size_implausible", "links_level"}
    assert check_directory(healthy).status == "healthy"

    # Healthy growth (450 records, 4 flushes) fits under the computed bound ...
    limit = plausible_max_file_bytes(
        healthy, growth_elements=1000, sqlite_bytes_per_record=4096, min_bytes=0
    )
    ceiling = 64 << 20
    assert limit < ceiling // 4
    assert cd.grow(healthy, batches=3, batch=150, fsize_limit=limit) == 0
    assert check_directory(healthy).status == "healthy"
    # ... while plain chromadb on the torn index, under a ceiling several times larger still,
    # is killed by SIGXFSZ: it tried to write past 64 MB in a directory whose every file fits
    # in a quarter of that. The runaway is stopped by the limit, not the disk. (Which write
    # crosses it varies: hnswlib seeks as it writes the bogus lists, so no file need reach the
    # ceiling. Unbounded, link_lists.bin reached 204 GB apparent, 36 GB on disk.)
    rc = cd.grow(torn, batches=3, batch=150, fsize_limit=ceiling)
    assert rc == -signal.SIGXFSZ
    sizes = [os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(torn) for f in fs]
    assert max(sizes) <= ceiling


def test_oversized_link_lists_rejected_without_reading_it(base: str, tmp_path: Path) -> None:
    """A 4 GiB (sparse) link_lists.bin is refused from its size: nothing close to it is read."""
    d = _copy(base, tmp_path)
    p, _, _ = _links(d)
    os.truncate(p, 4 << 30)
    for deep in (True, False):
        tracemalloc.start()
        try:
            rep = check_directory(d, deep=deep)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert rep.status == "damaged"
        assert "links_size_implausible" in _codes(rep)
        assert peak < 32 << 20, peak


def test_record_with_more_levels_than_the_header_allows(base: str, tmp_path: Path) -> None:
    """A whole, in-bounds record of maxlevel+1 levels (the file stays consistent otherwise)."""
    d = _copy(base, tmp_path)
    p, words, slpe = _links(d)
    h = cd._header(cd.segment_dir(d))
    first = int(np.flatnonzero(words)[0])
    old = int(words[first])
    new_levels = int(h[7]) + 1
    body = words[first + 1 : first + 1 + old // 4]
    grown = np.concatenate(
        [
            words[:first],
            np.array([new_levels * slpe], dtype="<u4"),
            body,
            np.zeros((new_levels * slpe - old) // 4, dtype="<u4"),
            words[first + 1 + old // 4 :],
        ]
    ).astype("<u4")
    grown.tofile(p)
    rep = check_directory(d)
    assert rep.status == "damaged"
    assert "links_level" in _codes(rep)


def test_header_maxlevel_beyond_any_drawn_level(base: str, tmp_path: Path) -> None:
    d = _copy(base, tmp_path)
    seg = cd.segment_dir(d)
    h = cd._header(seg)
    h[7] = max_plausible_level(int(h[11])) + 1
    cd._write_header(seg, h)
    rep = check_directory(d, deep=False)
    assert rep.status == "damaged"
    assert "header_maxlevel" in _codes(rep)


@pytest.mark.parametrize("m", [2, 4, 16, 48])
@pytest.mark.parametrize("cur", [1, 7, 1000, 200_000])
def test_link_list_bound_holds_for_hnswlib_level_draws(m: int, cur: int) -> None:
    """Levels drawn as hnswlib draws them, int(-ln(U)/ln(M)): every draw fits the bound."""
    rng = np.random.default_rng(m * 1_000_003 + cur)
    bound = plausible_link_lists_bytes(cur, m)
    for _ in range(20):
        u = rng.random(cur)
        u[u == 0] = np.finfo(float).tiny
        levels = np.floor(-np.log(u) / math.log(m)).astype(np.int64)
        assert int(levels.max()) <= max_plausible_level(m)
        assert 4 * cur + int(levels.sum()) * (4 * m + 4) <= bound
    # ...and the bound stays a bound: a few times the expected size, not a blank cheque.
    expected = 4 * cur + cur / (m - 1) * (4 * m + 4)
    assert bound <= 4 * expected + 4 * max_plausible_level(m) * (4 * m + 4) + 64 * (4 * m + 4)


@pytest.mark.slow
def test_plausible_max_file_bytes_shapes(base: str, tmp_path: Path) -> None:
    # A fresh directory still leaves room for SQLite to grow by growth_elements records.
    assert plausible_max_file_bytes(tmp_path / "missing") == 2 * 10**6 * 65536
    assert plausible_max_file_bytes(tmp_path / "missing", growth_elements=0) == 1 << 30
    small = plausible_max_file_bytes(base, growth_elements=0, min_bytes=0, headroom=1.0)
    largest = max(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(base) for f in fs)
    assert small >= largest
    assert plausible_max_file_bytes(base, growth_elements=10**6, min_bytes=0) > 10**6 * 172
