"""The validator against real Chroma directories: every harmful corruption is detected, every
healthy shape passes (issue 4: zero false positives), and it never executes the pickle."""

from __future__ import annotations

import os
import pickle
import shutil
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import chroma_dirs as cd  # noqa: E402

from safechroma.storage.hnsw import UnsafePickleError, read_index_metadata  # noqa: E402
from safechroma.storage.validate import check_directory  # noqa: E402

HEALTHY: dict[str, dict[str, Any]] = {
    "empty": {"collections": [{"n": 0}]},
    "below_threshold": {"collections": [{"n": 50}]},
    "one_flush_default_threshold": {
        "collections": [{"n": 1100, "sync_threshold": 1000, "batch": 550}]
    },
    "many_flushes": {"collections": [{"n": 1000, "sync_threshold": 100}]},
    "deletes_updates": {"collections": [{"n": 400, "deletes": 60, "updates": 80}]},
    "cosine": {"collections": [{"n": 300, "space": "cosine"}]},
    "ip": {"collections": [{"n": 300, "space": "ip"}]},
    "several": {
        "collections": [
            {"name": "small", "n": 30, "dim": 3},
            {"name": "mid", "n": 250, "dim": 17, "space": "cosine"},
            {"name": "wide", "n": 220, "dim": 64, "space": "ip", "deletes": 20},
        ]
    },
    "full_wal": {"purge_wal": False, "collections": [{"n": 300}]},
}


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Every base directory, built once in one child process, never touched by tests."""
    base = tmp_path_factory.mktemp("chroma-base")
    specs = {str(base / name): spec for name, spec in HEALTHY.items()}
    cd.build_dirs(specs)
    out = {name: str(base / name) for name in HEALTHY}
    cd.make_torn_dir(str(base / "torn"))
    cd.make_two_writers_dir(str(base / "two_writers"))
    out["torn"] = str(base / "torn")
    out["two_writers"] = str(base / "two_writers")
    return out


@pytest.fixture
def copy_of(built: dict[str, str], tmp_path: Path) -> Iterator[Any]:
    def make(name: str) -> str:
        dest = str(tmp_path / name)
        shutil.copytree(built[name], dest)
        return dest

    yield make


def _codes(rep: Any) -> set[str]:
    return {f.code for f in rep.findings} | {f.code for c in rep.collections for f in c.findings}


@pytest.mark.parametrize("shape", sorted(HEALTHY))
def test_healthy_shapes_pass(built: dict[str, str], shape: str) -> None:
    rep = check_directory(built[shape], wal_coverage=True)
    assert rep.status == "healthy", rep.to_dict()
    assert rep.healthy
    names = (
        {c["name"] for c in HEALTHY[shape]["collections"]}
        if "name" in HEALTHY[shape]["collections"][0]
        else {"coll"}
    )
    assert {c.name for c in rep.collections} == names
    exp = cd.expected(HEALTHY[shape])
    for c in rep.collections:
        assert c.records == len(exp[c.name]["ids"])
        assert c.space == exp[c.name]["space"]


def test_healthy_shape_facts(built: dict[str, str]) -> None:
    """Pins FACTS §1 "healthy shapes that naive checks call corrupt": below the flush threshold
    the index is empty (cur=0, 0-byte link_lists.bin, no pickle) and still healthy."""
    rep = check_directory(built["below_threshold"])
    (c,) = rep.collections
    assert c.hnsw is not None and c.hnsw.element_count == 0 and not c.hnsw.has_pickle
    assert c.segment_path is not None
    assert os.path.getsize(os.path.join(c.segment_path, "link_lists.bin")) == 0
    assert rep.healthy


@pytest.mark.parametrize("kind", sorted(cd.KINDS))
def test_corruption_detected(copy_of: Any, kind: str) -> None:
    d = copy_of("many_flushes")
    cd.corrupt(d, kind)
    rep = check_directory(d)
    assert rep.status == "damaged", rep.to_dict()
    assert set(cd.KINDS[kind].codes) <= _codes(rep)
    # Every finding names what is wrong in words.
    assert all(f.message for c in rep.collections for f in c.findings)


# What only the deep walk can see: link contents, labels, link_lists.bin structure, SQLite pages.
DEEP_ONLY = {
    "level0_neighbor_oob",
    "level0_count_huge",
    "upper_neighbor_oob",
    "links_truncated",
    "data_zeroed",
    "data_random",
    "sqlite_pages",
}


@pytest.mark.parametrize("kind", sorted(set(cd.KINDS) - DEEP_ONLY))
def test_corruption_detected_shallow(copy_of: Any, kind: str) -> None:
    """deep=False still catches every header, size, pickle and missing-segment problem."""
    d = copy_of("many_flushes")
    cd.corrupt(d, kind)
    rep = check_directory(d, deep=False)
    assert rep.status == "damaged", rep.to_dict()


@pytest.mark.parametrize("name", ["torn", "two_writers"])
def test_process_made_damage_detected(built: dict[str, str], name: str) -> None:
    """Torn flush (FACTS §3) and two writers on one directory (FACTS §4) are both reported."""
    rep = check_directory(built[name])
    assert rep.status == "damaged", rep.to_dict()


def test_segment_deleted_with_full_wal_is_healthy(copy_of: Any) -> None:
    """Pins FACTS §2: with the WAL complete Chroma rebuilds a missing index exactly, so a
    missing directory is not damage there (it is with a purged WAL: see the matrix)."""
    d = copy_of("full_wal")
    cd.corrupt(d, "segment_deleted")
    rep = check_directory(d)
    assert rep.status == "healthy", rep.to_dict()
    assert rep.collections[0].wal_covers_all is True
    assert "segment_missing_rebuildable" in _codes(rep)


def test_lock_is_not_corruption(copy_of: Any) -> None:
    """A SQLite lock held by another connection gives "unknown", never "damaged"."""
    d = copy_of("many_flushes")
    holder = sqlite3.connect(os.path.join(d, "chroma.sqlite3"), isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        rep = check_directory(d, busy_timeout=0.2)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert rep.status == "unknown", rep.to_dict()
    assert rep.sqlite_status == "busy"
    assert "sqlite_busy" in _codes(rep)


def test_safechroma_entries_ignored(copy_of: Any) -> None:
    d = copy_of("many_flushes")
    Path(d, ".safechroma.lock").write_bytes(b"")
    Path(d, ".safechroma", "backups", "x").mkdir(parents=True)
    Path(d, ".safechroma", "backups", "x", "junk.bin").write_bytes(b"\0" * 10)
    rep = check_directory(d)
    assert rep.healthy and not rep.findings


def test_not_a_chroma_dir(tmp_path: Path) -> None:
    rep = check_directory(tmp_path)
    assert rep.status == "unknown" and "no_sqlite" in _codes(rep)
    assert not (tmp_path / "chroma.sqlite3").exists()  # mode=ro never creates the file
    assert check_directory(tmp_path / "nope").status == "unknown"


def test_unpickler_refuses_malicious_pickle_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    p = tmp_path / "index_metadata.pickle"
    p.write_bytes(cd.malicious_pickle(str(marker)))
    with pytest.raises(UnsafePickleError):
        read_index_metadata(p)
    assert not marker.exists()


def test_unpickler_reads_chroma_pickle(built: dict[str, str]) -> None:
    seg = cd.segment_dir(built["many_flushes"])
    meta = read_index_metadata(os.path.join(seg, "index_metadata.pickle"))
    assert len(meta["id_to_label"]) == 1000
    assert meta == pickle.loads(Path(seg, "index_metadata.pickle").read_bytes())


def test_report_json_and_pickle(copy_of: Any) -> None:
    import json

    d = copy_of("many_flushes")
    cd.corrupt(d, "level0_neighbor_oob")
    rep = check_directory(d)
    back = pickle.loads(pickle.dumps(rep))
    assert back.to_dict() == rep.to_dict()
    js = json.loads(json.dumps(rep.to_dict()))
    assert js["status"] == "damaged"
    assert js["collections"][0]["findings"][0]["code"] == "level0_neighbor_out_of_range"


def test_flushed_id_missing_from_pickle_detected(copy_of: Any) -> None:
    """A record flushed to the index whose id the pickle does not know (and the purged WAL
    cannot replay) is reported. Pins the deep id comparison of check_directory, which now
    reuses the pickle check_segment parsed instead of parsing it a second time."""
    d = copy_of("many_flushes")
    p = Path(cd.segment_dir(d), "index_metadata.pickle")
    meta = pickle.loads(p.read_bytes())
    label = meta["id_to_label"].pop("coll-5")
    meta["id_to_label"]["renamed-5"] = label
    meta["label_to_id"][label] = "renamed-5"
    p.write_bytes(pickle.dumps(meta, protocol=3))
    rep = check_directory(d)
    assert rep.status == "damaged", rep.to_dict()
    (c,) = rep.collections
    assert c.hnsw is not None and not c.hnsw.findings  # the segment itself is sound
    (f,) = [f for f in c.findings if f.code == "index_missing_ids"]
    assert f.message.startswith("1 records") and "'coll-5'" in f.message
