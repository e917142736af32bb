"""Repair against real damage: every record comes back with its document and metadata and
its own vector first, or the report names exactly the ids it could not recover; no step runs
before its backup exists; a crash mid-repair leaves the old state plus the backup."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import chroma_dirs as cd  # noqa: E402

from safechroma.storage.recovery import (  # noqa: E402
    keep_full_wal,
    pending_salvage_files,
    repair_directory,
    snapshot_label_maps,
    wal_purge_enabled,
)
from safechroma.storage.validate import check_directory  # noqa: E402

SPECS: dict[str, dict[str, Any]] = {
    "l2": {"collections": [{"n": 600, "sync_threshold": 100}]},
    "cosine": {
        "collections": [
            {"n": 600, "sync_threshold": 100, "space": "cosine", "updates": 40, "deletes": 30}
        ]
    },
    "full_wal": {"purge_wal": False, "collections": [{"n": 600, "sync_threshold": 100}]},
}


@pytest.fixture(scope="session")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("recovery-base")
    cd.build_dirs({str(root / k): v for k, v in SPECS.items()})
    return {k: str(root / k) for k in SPECS}


def _copy(base: dict[str, str], name: str, tmp: Path) -> str:
    d = str(tmp / name)
    shutil.copytree(base[name], d)
    return d


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "safechroma", *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    "spec,kind",
    [
        ("l2", "level0_neighbor_oob"),
        ("l2", "header_zeroed"),
        ("l2", "data_truncated"),
        ("l2", "pickle_deleted"),
        ("cosine", "level0_count_huge"),
        ("cosine", "entry_point_oob"),
        ("full_wal", "data_random"),
        # Issue 7: a torn pickle (chromadb 1.5.9 rewrites it in place) with keep_full_wal: the
        # WAL rebuilds every record, nothing lost (with the WAL purged: see the snapshot test).
        ("full_wal", "pickle_truncated"),
    ],
)
def test_repair_recovers_or_names_the_lost(
    base: dict[str, str], tmp_path: Path, spec: str, kind: str
) -> None:
    d = _copy(base, spec, tmp_path)
    cd.corrupt(d, kind)
    p = _cli("repair", d, "--json")
    assert p.returncode in (0, 1), p.stderr
    out = json.loads(p.stdout)
    lost = {r["id"] for s in out["applied"] for r in s["not_recovered"]}
    assert lost == set(out["repair"]["collections"][0]["not_recovered"])
    # Exit 1 exactly when records had to be removed (saved for re-adding), else 0.
    assert p.returncode == (1 if lost else 0), p.stdout + p.stderr
    assert out["after"]["status"] == "healthy"
    res = cd.verify_dir(d, SPECS[spec])["coll"]
    # Every record is present with its document and vector, except the named ids: their vector
    # exists nowhere, so they were saved (document and metadata) and removed, leaving a
    # collection Chroma can serve in full (issue 7: left in place they failed every get).
    assert set(res["missing"]) == lost and res["bad_document"] == []
    # HNSW is approximate: an intact record (its exact vector stored: wrong_vector below) may,
    # rarely, not come first for its own vector (seen once in a loaded CI run); a lost one never.
    assert lost <= set(res["not_first"]) and len(set(res["not_first"]) - lost) <= 2, res
    assert res["wrong_vector"] == []
    assert res["get_embeddings_error"] is None
    for s in out["applied"]:
        assert set(s["removed"]) == {r["id"] for r in s["not_recovered"]}
        if s["removed"]:
            saved = json.loads(Path(s["salvage_file"] + ".removed.json").read_text())
            assert {r["id"] for r in saved} == set(s["removed"])
            assert all(r["document"] and r["metadata"] for r in saved)
    if spec == "full_wal":
        assert lost == set()  # FACTS §2: the complete WAL rebuilds everything
    if kind in ("level0_neighbor_oob", "header_zeroed", "level0_count_huge", "entry_point_oob"):
        assert lost == set()  # intact data_level0.bin: everything salvaged
    # The damaged index was moved, not deleted, and the backup holds SQLite and the segment.
    q = out["repair"]["collections"][0]["quarantined_to"]
    assert os.path.isfile(os.path.join(q, "header.bin"))
    bdir = out["repair"]["backup_dir"]
    assert os.path.isfile(os.path.join(bdir, "chroma.sqlite3"))
    assert os.path.isdir(os.path.join(bdir, "segments", os.path.basename(q)))
    assert pending_salvage_files(d) == []


def test_no_step_before_its_backup(base: dict[str, str], tmp_path: Path) -> None:
    """Pins issue 4 "no repair step runs before its backup exists": at every progress step
    the backup (SQLite copy + damaged segment) is already complete on disk."""
    d = _copy(base, "l2", tmp_path)
    seg = cd.corrupt(d, "level0_neighbor_oob")
    seen: list[str] = []

    def step(name: str, details: dict[str, Any]) -> None:
        seen.append(name)
        backups = Path(d, ".safechroma", "backups")
        (b,) = [x for x in backups.iterdir() if not x.name.endswith(".partial")]
        assert (b / "chroma.sqlite3").stat().st_size > 0
        assert (b / "segments" / os.path.basename(seg) / "data_level0.bin").exists()
        if name != "quarantine":
            assert os.path.isdir(seg)  # nothing moved yet

    rep = repair_directory(d, progress=step)
    assert seen == ["backup", "salvage", "quarantine"]
    assert rep.status == "repaired" and not os.path.exists(seg)


def test_dry_run_changes_nothing(base: dict[str, str], tmp_path: Path) -> None:
    d = _copy(base, "l2", tmp_path)
    seg = cd.corrupt(d, "pickle_deleted")
    rep = repair_directory(d, dry_run=True)
    assert rep.status == "planned" and rep.collections[0].reasons == ["pickle_missing"]
    assert os.path.isdir(seg) and not os.path.exists(os.path.join(d, ".safechroma"))


@pytest.mark.parametrize("kill_at", ["backup", "salvage", "quarantine"])
def test_crash_mid_repair_leaves_old_state_plus_backup(
    base: dict[str, str], tmp_path: Path, kill_at: str
) -> None:
    """SIGKILL the repairing process right after a step: the directory is either untouched
    (plus a backup) or quarantined (plus backup and salvage), and a second repair finishes."""
    d = _copy(base, "l2", tmp_path)
    seg = cd.corrupt(d, "level0_neighbor_oob")
    code = (
        "import os, signal, sys\n"
        "from safechroma.storage.recovery import repair_directory\n"
        "def step(name, details):\n"
        f"    if name == {kill_at!r}: os.kill(os.getpid(), signal.SIGKILL)\n"
        "repair_directory(sys.argv[1], progress=step)\n"
    )
    p = subprocess.run([sys.executable, "-c", code, d], capture_output=True, timeout=120)
    assert p.returncode == -signal.SIGKILL
    backups = [
        x for x in Path(d, ".safechroma", "backups").iterdir() if not x.name.endswith(".partial")
    ]
    assert len(backups) == 1 and (backups[0] / "chroma.sqlite3").exists()
    assert os.path.isdir(seg) != (kill_at == "quarantine")
    # Finishing the job: repair again through the CLI (it also applies pending salvage).
    r = _cli("repair", d)
    assert r.returncode == 0, r.stdout + r.stderr
    res = cd.verify_dir(d, SPECS["l2"])["coll"]
    assert res["missing"] == [] and res["not_first"] == [] and res["bad_document"] == []
    assert res["wrong_vector"] == []


def test_keep_full_wal_roundtrip(base: dict[str, str], tmp_path: Path) -> None:
    d = _copy(base, "l2", tmp_path)
    assert wal_purge_enabled(d) is True
    assert keep_full_wal(d) == {"path": d, "automatically_purge": False, "previous": True}
    assert wal_purge_enabled(d) is False
    assert check_directory(d).wal_purge is False
    keep_full_wal(d, enable=False)
    assert wal_purge_enabled(d) is True


def test_repair_nothing_to_do_on_healthy(base: dict[str, str]) -> None:
    rep = repair_directory(base["cosine"])
    assert rep.status == "nothing_to_do" and rep.backup_dir is None
    assert not os.path.exists(os.path.join(base["cosine"], ".safechroma"))


def test_repair_leaves_no_id_chroma_cannot_find(base: dict[str, str], tmp_path: Path) -> None:
    """Pins issue 7 (soak: "Error finding id" through 22 validate+repair cycles, then a
    directory chromadb could not read). With the WAL purged and the index gone, the ids flushed
    earlier have a document in SQLite and a vector nowhere. Repair used to report them and leave
    them in place: every ``get`` with embeddings raised "Error finding id", the next check said
    ``index_missing_ids`` again, and each new repair found nothing to salvage. Now they are saved
    (document and metadata, in ``.removed.json``) and deleted through Chroma: the directory is
    healthy after one repair, a second repair has nothing to do, and Chroma serves every id."""
    d = _copy(base, "l2", tmp_path)
    cd.corrupt(d, "segment_deleted")
    assert check_directory(d).status == "damaged"
    p = _cli("repair", d, "--json")
    assert p.returncode == 1, p.stdout + p.stderr  # records had to be removed: exit 1
    out = json.loads(p.stdout)
    (applied,) = out["applied"]
    lost = set(applied["removed"])
    # The WAL holds only the tail after the last flush; everything flushed before is lost.
    assert 0 < len(lost) < 600 and lost == set(out["repair"]["collections"][0]["not_recovered"])
    assert out["after"]["status"] == "healthy"
    res = cd.verify_dir(d, SPECS["l2"])["coll"]
    assert res["get_embeddings_error"] is None
    assert set(res["missing"]) == lost and res["count"] == 600 - len(lost)
    assert set(res["not_first"]) == lost
    assert res["wrong_vector"] == []
    again = repair_directory(d)
    assert again.status == "nothing_to_do", again.message


def test_repair_ignores_the_vector_of_an_ignored_add(base: dict[str, str], tmp_path: Path) -> None:
    """Pins issue 7's "get returns an acknowledged record with the wrong vector (document and
    metadata right)". Chroma ignores an ``add`` of an existing id, but the row stays in the WAL.
    Repair counted any ADD row as "the WAL rebuilds this id", so it did not write back the
    flushed vector; the rebuilt index then applied the ignored ADD (the id was not in it yet)
    and the record came back with the ignored write's vector. Now only the write the metadata
    segment applied (``embeddings.seq_id``) counts: every record gets its own vector back."""
    d = _copy(base, "l2", tmp_path)
    cd.readd_existing(d, 0, 20)  # 20 < sync_threshold: the rows stay in the WAL, unflushed
    cd.corrupt(d, "level0_neighbor_oob")  # data_level0.bin intact: every vector salvageable
    p = _cli("repair", d, "--json")
    assert p.returncode == 0, p.stdout + p.stderr
    out = json.loads(p.stdout)
    assert out["repair"]["collections"][0]["not_recovered"] == []
    res = cd.verify_dir(d, SPECS["l2"])["coll"]
    assert (
        res["missing"] == [] and res["bad_document"] == [] and res["get_embeddings_error"] is None
    )
    # Before the fix: coll-0 .. coll-19 came back with the ignored vectors.
    assert res["wrong_vector"] == []
    # Chroma's HNSW search is approximate: in 1 of 31 runs of this scenario, one id whose
    # stored vector is exact is not found first by its own vector (the graph differs from run
    # to run). Plain chromadb does the same: 600 ids written by the same calls (100 adds, then
    # 500 upserts) in an EphemeralClient missed one id in 1 of 150 trials, with or without 20
    # re-added ids before the upserts. The stored vectors above are what the repair answers
    # for; before the fix all 20 re-added ids were here too.
    assert len(res["not_first"]) <= 2, res["not_first"]


def test_torn_pickle_salvaged_through_the_label_map_snapshot(
    base: dict[str, str], tmp_path: Path
) -> None:
    """Pins issue 7's largest loss: chromadb 1.5.9 rewrites ``index_metadata.pickle`` in place,
    so a kill during a flush left it empty (seen in a 120 s soak: 664 of 1000 records without a
    label map, WAL purged). The snapshot of the last healthy label map maps every label it
    knows; the records flushed after it used to be removed (issue 13's soak loss) and are now
    mapped by the label-map rebuild from the metadata segment: nothing is lost, exit 0."""
    d = _copy(base, "l2", tmp_path)
    seg = cd.segment_dir(d)
    (snap,) = snapshot_label_maps(d)
    assert snapshot_label_maps(d) == []  # unchanged pickle: no new copy
    assert os.path.isfile(snap)
    cd._run_child("extend", {"path": d, "name": "coll", "start": 600, "stop": 700, "dim": 8})
    Path(seg, "index_metadata.pickle").write_bytes(b"")  # truncated, never rewritten
    assert check_directory(d).status == "damaged"
    p = _cli("repair", d, "--json")
    assert p.returncode == 0, p.stdout + p.stderr
    out = json.loads(p.stdout)
    (col,) = out["repair"]["collections"]
    assert col["not_recovered"] == [] and out["applied"][0]["removed"] == []
    # Labels 1..600 come from the snapshot, 601..700 from the proven rebuild.
    assert col["label_map"]["known"] == 600 and col["label_map"]["proven"] is True
    # The rebuilt index numbers its labels from 1 again: the old snapshot went with the old
    # index into quarantine, so that no later repair maps new labels through it.
    assert not os.path.exists(snap)
    assert os.path.isfile(col["quarantined_to"] + ".labelmap.pickle")
    res = cd.verify_dir(d, {"collections": [{"n": 700, "sync_threshold": 100}]})["coll"]
    assert res["missing"] == [] and res["bad_document"] == []
    assert res["not_first"] == [] and res["get_embeddings_error"] is None
    assert res["wrong_vector"] == []
