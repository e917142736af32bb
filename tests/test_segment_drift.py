"""Metadata and vector index drifting apart while ``count()`` looks healthy (issue 13).

* chroma-core/chroma#7678, "Failed to apply logs": a flush writes the index files, then the
  pickle, then ``max_seq_id``. A kill between the first two, with deletes among the flushed
  rows, leaves an index whose elements are already deleted while the old pickle still maps
  them: the replay of the WAL then fails the first call of every process. Built here from those
  facts (the kill window is the pickle's serialisation: a timed SIGKILL lands in it only by
  chance; 40 SIGKILLs during upserts of existing ids at flush time gave one torn pickle and no
  wedge, because upserts converge on replay), reproduced with plain chromadb, detected, and
  repaired by SafeClient's default recovery with nothing lost.
* chroma-core/chroma#7032, "Error finding id": an id the metadata segment has and the index
  never gets back. And the reverse: an id only the index has, which ``query`` returns and
  ``get`` does not know. Both reproduced with plain chromadb, detected from a replay of the WAL
  as Chroma's next open does it, and repaired.
* Random histories of every operation, across flushes: the replay check calls none of them
  damaged (no false positives).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import sqlite3
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# Slow (long write histories per case): not in the everyday lane, -m "not slow".
pytestmark = pytest.mark.slow

sys.path.insert(0, os.path.dirname(__file__))
import chroma_dirs as cd  # noqa: E402

from safechroma import SafeClient  # noqa: E402
from safechroma.storage.replay import replay_index, replay_metadata  # noqa: E402
from safechroma.storage.validate import check_directory  # noqa: E402

DIM = 8


def _codes(rep: Any) -> set[str]:
    return {f.code for c in rep.collections for f in c.findings}


def _segment_row(root: str) -> tuple[str, str]:
    seg = cd.segment_dir(root)
    return seg, os.path.basename(seg)


def _sql(root: str, *stmts: tuple[str, tuple[Any, ...]]) -> None:
    con = sqlite3.connect(os.path.join(root, "chroma.sqlite3"))
    with con:
        for q, args in stmts:
            con.execute(q, args)
    con.close()


def _safe_view(root: str) -> dict[str, np.ndarray]:
    """Every record's vector, read through SafeClient with default options (repairs first)."""
    with SafeClient(root) as client:
        col = client.get_collection("coll", embedding_function=None)
        got = col.get(include=["embeddings"])
        assert col.count() == len(got["ids"])
        pairs = zip(got["ids"], got["embeddings"], strict=True)
        return {i: np.asarray(v, dtype=np.float32) for i, v in pairs}


def _assert_vectors(view: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(view) == sorted(expected)
    bad = [i for i in expected if not np.allclose(view[i], expected[i], atol=1e-6)]
    assert not bad, bad[:5]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("drift")
    specs = {
        str(base / "purged"): {"collections": [{"n": 300, "sync_threshold": 100}]},
        str(base / "full_wal"): {
            "purge_wal": False,
            "collections": [{"n": 300, "sync_threshold": 100}],
        },
    }
    cd.build_dirs(specs)
    return {os.path.basename(k): k for k in specs}


def _copy(built: dict[str, str], name: str, tmp_path: Path, as_: str = "d") -> str:
    dest = str(tmp_path / as_)
    shutil.copytree(built[name], dest)
    return dest


def _wedge(built: dict[str, str], tmp_path: Path) -> str:
    """The state a kill leaves between the index files and the pickle of a flush."""
    d = _copy(built, "full_wal", tmp_path)
    seg, segid = _segment_row(d)
    with open(os.path.join(seg, "index_metadata.pickle"), "rb") as f:
        old_pickle = f.read()
    con = sqlite3.connect(os.path.join(d, "chroma.sqlite3"))
    old_seq = con.execute("SELECT seq_id FROM max_seq_id WHERE segment_id = ?", (segid,)).fetchone()
    con.close()
    # 20 deletes, then 100 adds: the flush at 120 rows writes the deleted marks.
    cd.run_ops(d, [["delete", list(range(10, 30)), 0], ["add", list(range(300, 400)), 0]])
    with open(os.path.join(seg, "index_metadata.pickle"), "wb") as f:
        f.write(old_pickle)  # the pickle of the previous flush: the new one was never written
    purge_on = json.dumps(
        {"automatically_purge": True, "_type": "EmbeddingsQueueConfigurationInternal"}
    )
    _sql(
        d,
        ("UPDATE max_seq_id SET seq_id = ? WHERE segment_id = ?", (old_seq[0], segid)),
        # What Chroma's purge had left: nothing at or below the index's max_seq_id.
        ("DELETE FROM embeddings_queue WHERE seq_id <= ?", (old_seq[0],)),
        ("UPDATE embeddings_queue_config SET config_json_str = ?", (purge_on,)),
    )
    return d


def test_wedged_replay_reproduced_detected_and_repaired(
    built: dict[str, str], tmp_path: Path
) -> None:
    d = _wedge(built, tmp_path)
    probe_copy = str(tmp_path / "probe")
    shutil.copytree(d, probe_copy)
    seen = cd.probe(probe_copy)
    # Plain chromadb: the first call of the process fails, whatever it is (count() here). A
    # second call in the same process gets through, because the failed attempt had already
    # dropped the deleted ids from its in-memory map before the index refused them: what a
    # process then persists depends on what that half-applied attempt left.
    assert "Failed to apply logs to the hnsw segment writer" in seen.get("count_error", ""), seen

    rep = check_directory(d)
    assert rep.status == "damaged"
    (f,) = [f for c in rep.collections for f in c.findings if f.code == "wal_replay_fails"]
    assert "already deleted" in f.message and "'coll-10'" in f.message

    old = cd.vectors("coll", 300, DIM)
    new = cd.vectors("ops", 400, DIM, 0)
    expected = {f"coll-{i}": old[i] for i in range(300) if not 10 <= i < 30}
    expected.update({f"coll-{i}": new[i] for i in range(300, 400)})
    _assert_vectors(_safe_view(d), expected)
    assert check_directory(d).status == "healthy"


def test_id_only_in_the_metadata_segment(built: dict[str, str], tmp_path: Path) -> None:
    """chroma#7032: count() is right, get with embeddings raises "Error finding id".

    The index (full WAL kept) has lost one flushed record: gone from the pickle, its element
    marked deleted, so every file agrees with every other; the WAL still holds its ADD, below
    the index's max_seq_id, where Chroma never replays it.
    """
    d = _copy(built, "full_wal", tmp_path)
    seg, _ = _segment_row(d)
    pk = os.path.join(seg, "index_metadata.pickle")
    with open(pk, "rb") as fh:
        meta = pickle.load(fh)  # our own test directory, written by chromadb a moment ago
    label = meta["id_to_label"].pop("coll-42")
    del meta["label_to_id"][label]
    with open(pk, "wb") as fh:
        pickle.dump(meta, fh)
    h = cd._header(seg)
    with open(os.path.join(seg, "data_level0.bin"), "r+b") as fh:
        for i in range(h[3]):
            fh.seek(i * h[4] + h[5])
            if struct.unpack("<Q", fh.read(8))[0] == label:
                fh.seek(i * h[4] + 2)
                fh.write(b"\x01")  # the deleted flag
                break
    probe_copy = str(tmp_path / "probe")
    shutil.copytree(d, probe_copy)
    seen = cd.probe(probe_copy)
    assert seen["count"] == 300
    assert "Error finding id" in seen.get("embeddings_error", ""), seen

    rep = check_directory(d)
    assert rep.status == "damaged"
    (f,) = [f for c in rep.collections for f in c.findings if f.code == "segments_disagree"]
    assert "1 ids only in the metadata segment" in f.message and "'coll-42'" in f.message

    old = cd.vectors("coll", 300, DIM)
    _assert_vectors(_safe_view(d), {f"coll-{i}": old[i] for i in range(300)})
    assert check_directory(d).status == "healthy"


def test_id_only_in_the_vector_index(built: dict[str, str], tmp_path: Path) -> None:
    """The metadata segment lost a record the index still has: query returns it, get does not."""
    d = _copy(built, "purged", tmp_path)
    con = sqlite3.connect(os.path.join(d, "chroma.sqlite3"))
    (rid,) = con.execute("SELECT id FROM embeddings WHERE embedding_id = 'coll-7'").fetchone()
    con.close()
    _sql(
        d,
        ("DELETE FROM embedding_metadata WHERE id = ?", (rid,)),
        ("DELETE FROM embeddings WHERE id = ?", (rid,)),
    )
    old = cd.vectors("coll", 300, DIM)
    probe_copy = str(tmp_path / "probe")
    shutil.copytree(d, probe_copy)
    seen = cd.probe(probe_copy, near=old[7].tolist())
    assert seen["count"] == 299 and "coll-7" not in seen["ids"]
    assert seen["near"] == ["coll-7"]  # a record that get() says does not exist

    rep = check_directory(d)
    assert rep.status == "damaged"
    assert "segments_disagree" in _codes(rep)

    _assert_vectors(_safe_view(d), {f"coll-{i}": old[i] for i in range(300) if i != 7})
    assert check_directory(d).status == "healthy"
    assert cd.probe(d, near=old[7].tolist())["near"] != ["coll-7"]


def _random_history(rnd: random.Random, n_ids: int, steps: int) -> list[Any]:
    ops: list[Any] = [["add", list(range(n_ids // 2)), 0]]
    for g in range(1, steps + 1):
        op = rnd.choice(["add", "add", "upsert", "update", "delete"])
        nums = sorted(rnd.sample(range(n_ids), rnd.randint(1, 40)))
        ops.append([op, nums, g])
    return ops


@pytest.mark.parametrize("seed", range(6))
def test_random_histories_are_never_called_damaged(
    built: dict[str, str], tmp_path: Path, seed: int
) -> None:
    """Adds, re-adds of deleted ids, upserts, updates and deletes of absent ids, across flushes
    (sync_threshold 100 on 300 records), with the WAL purged and kept: healthy, and Chroma
    agrees (every id findable)."""
    rnd = random.Random(seed)
    d = _copy(built, "full_wal" if seed % 2 else "purged", tmp_path)
    cd.run_ops(d, _random_history(rnd, 420, 25))
    rep = check_directory(d)
    assert rep.status == "healthy", [f.to_dict() for c in rep.collections for f in c.findings]
    seen = cd.probe(d)
    assert "embeddings_error" not in seen and seen["embeddings"] == seen["count"]


def test_replay_model_pure() -> None:
    """The replay rules of local_hnsw.rs on small cases (ops: 0 ADD 1 UPDATE 2 UPSERT 3 DELETE)."""
    base = {"a": 1, "b": 2}
    out = replay_index(
        base,
        2,
        [(5, "c", 0, True), (6, "a", 3, False), (7, "a", 0, True), (8, "x", 1, True)],
        element_count=2,
        deleted_labels=set(),
    )
    assert out.failure is None and out.ids == {"b", "c", "a"}
    # Deleting an element the files already mark deleted fails, as hnswlib's markDelete does.
    bad = replay_index(base, 2, [(5, "a", 3, False)], element_count=2, deleted_labels={1})
    assert bad.failure is not None and "already deleted" in bad.failure
    # ...unless a write to that label came first (addPoint clears the mark).
    ok = replay_index(
        base, 2, [(5, "a", 1, True), (6, "a", 3, False)], element_count=2, deleted_labels={1}
    )
    assert ok.failure is None and ok.ids == {"b"}
    assert replay_index(None, 0, [(1, "a", 2, False)]).failure is not None
    assert replay_metadata({"a"}, [(3, "b", 1, True), (4, "a", 3, False), (5, "c", 2, True)]) == {
        "c"
    }
