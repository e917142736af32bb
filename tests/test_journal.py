"""The write journal (issue 21, :mod:`safechroma.storage.journal`): its format, its reader's
stop at a torn or corrupt record, replay with Chroma's write semantics, compaction, and a worker
killed right after an acknowledged write. No chromadb in this process (the SIGKILL test runs
a real worker through ``SafeClient``)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from safechroma.storage import journal as jr


def _vecs(n: int, dim: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, dim), dtype=np.float32)


def test_replay_follows_chromas_write_semantics(tmp_path: Path) -> None:
    j = jr.Journal(tmp_path)
    j.collection("c1", "coll", metadata={"m": 1}, created=True)
    v = _vecs(4)
    j.write(
        "add",
        "c1",
        ["a", "b", "c"],
        embeddings=v[:3],
        documents=["A", "B", "C"],
        metadatas=[{"k": 1, "x": "p"}, {"k": 2}, None],
    )
    j.write("add", "c1", ["a"], embeddings=v[3:], documents=["ignored"], metadatas=[{"k": 9}])
    j.write("upsert", "c1", ["b", "d"], embeddings=v[:2], metadatas=[{"k": 5, "y": 1}, {"z": 0}])
    j.write(
        "update",
        "c1",
        ["a", "absent"],
        metadatas=[{"x": None, "n": 1}, {"q": 1}],
        documents=["A2", "no"],
    )
    j.write("delete", "c1", ["c"])
    j.close()
    (col,) = jr.replay(tmp_path).values()
    assert col.name == "coll" and col.metadata == {"m": 1} and col.complete
    assert sorted(col.records) == ["a", "b", "d"]
    a, b, d = (col.records[k] for k in ("a", "b", "d"))
    assert a["document"] == "A2" and a["metadata"] == {"k": 1, "n": 1}
    assert np.array_equal(a["vector"], v[0])  # the add of an existing id was ignored
    assert b["document"] == "B" and b["metadata"] == {"k": 5, "y": 1}
    assert np.array_equal(b["vector"], v[0]) and np.array_equal(d["vector"], v[1])
    assert d["document"] is None and d["metadata"] == {"z": 0}


@pytest.mark.parametrize("damage", ["torn", "flipped"])
def test_reader_stops_at_a_torn_or_corrupt_record_and_reports_it(
    tmp_path: Path, damage: str
) -> None:
    j = jr.Journal(tmp_path)
    v = _vecs(3)
    for k in range(3):
        j.write("upsert", "c", [f"r{k}"], embeddings=v[k : k + 1], documents=[f"d{k}"])
    j.close()
    (seg,) = jr._segments(tmp_path)
    size = os.path.getsize(seg)
    if damage == "torn":  # a crash in the middle of the last append
        os.truncate(seg, size - 7)
    else:  # one flipped bit in the last record's vector
        with open(seg, "r+b") as f:
            f.seek(size - 3)
            byte = f.read(1)
            f.seek(size - 3)
            f.write(bytes([byte[0] ^ 1]))
    # A later writer starts a new segment: its records are read past the damage.
    j2 = jr.Journal(tmp_path)
    j2.write("upsert", "c", ["later"], embeddings=v[:1])
    j2.close()
    rep = jr.ReadReport()
    (col,) = jr.replay(tmp_path, rep).values()
    assert sorted(col.records) == ["later", "r0", "r1"]
    assert rep.records == 3 and len(rep.torn) == 1
    assert rep.torn[0][0] == seg
    assert rep.torn[0][2] == ("torn record" if damage == "torn" else "bad checksum")


def test_compaction_keeps_the_live_state_at_about_the_raw_size(tmp_path: Path) -> None:
    j = jr.Journal(tmp_path)
    j.collection("c1", "coll", created=True)
    dim, n = 64, 500
    v = _vecs(n, dim)
    ids = [f"id-{i}" for i in range(n)]
    for rnd in range(3):  # the same records written three times, then a fifth deleted
        j.write(
            "upsert",
            "c1",
            ids,
            embeddings=v + rnd,
            documents=[f"doc {i}" for i in ids],
            metadatas=[{"i": i, "r": rnd} for i in range(n)],
        )
    j.write("delete", "c1", ids[: n // 5])
    j.close()
    before = jr.replay(tmp_path)["c1"].records
    rep = jr.compact(tmp_path)
    after = jr.replay(tmp_path)["c1"].records
    assert sorted(before) == sorted(after) and len(after) == n - n // 5
    for k, r in after.items():
        assert r["document"] == before[k]["document"]
        assert r["metadata"] == before[k]["metadata"]
        assert np.array_equal(r["vector"], before[k]["vector"])
    raw = sum(
        len(k) + len(r["document"]) + len(str(r["metadata"])) + 4 * dim for k, r in after.items()
    )
    assert rep.bytes_after < rep.bytes_before / 2
    assert jr.journal_bytes(tmp_path) <= 1.2 * raw, (jr.journal_bytes(tmp_path), raw)
    assert len(jr._segments(tmp_path)) == 1
    assert jr.compact(tmp_path).records == 0  # nothing appended since: nothing rewritten
    # A little appended since (under 10% of the compacted size): left for a later compaction.
    j2 = jr.Journal(tmp_path)
    j2.write("upsert", "c1", ["late"], embeddings=v[:1], documents=["late doc"])
    j2.close()
    assert jr.compact(tmp_path).records == 0 and len(jr._segments(tmp_path)) == 2
    assert jr.replay(tmp_path)["c1"].records["late"]["document"] == "late doc"
    j3 = jr.Journal(tmp_path)
    j3.write("upsert", "c1", ids[:200], embeddings=v[:200], documents=["x"] * 200)
    j3.close()
    # the 100 deleted ids among the 200 come back, and "late" stays
    assert jr.compact(tmp_path).records == n - n // 5 + 100 + 1
    assert len(jr._segments(tmp_path)) == 1


def test_acknowledged_write_survives_a_sigkilled_worker(tmp_path: Path) -> None:
    """The journal record is durable before the reply: kill the worker the moment the write
    returned, and it is there, exactly."""
    from safechroma import SafeClient

    d = str(tmp_path / "d")
    client = SafeClient(d, standby=False, keep_warm=0)
    try:
        col = client.create_collection("killed", embedding_function=None)
        v = _vecs(25, 8, seed=3)
        ids = [f"k{i}" for i in range(25)]
        col.add(
            ids=ids,
            embeddings=v,
            documents=[f"doc {i}" for i in ids],
            metadatas=[{"i": i} for i in range(25)],
        )
        col.upsert(ids=ids[:5], embeddings=v[:5] * 2, metadatas=[{"u": 1}] * 5)
        pid = client.stats().worker_pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # reaped by the supervisor
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.02)
        cols = [c for c in jr.replay(d).values() if c.name == "killed"]
        assert len(cols) == 1 and cols[0].complete
        recs = cols[0].records
        assert sorted(recs) == sorted(ids)
        for i, k in enumerate(ids):
            assert recs[k]["document"] == f"doc {k}"
            if i < 5:
                assert recs[k]["metadata"] == {"i": i, "u": 1}
                assert np.array_equal(recs[k]["vector"], v[i] * 2)
            else:
                assert recs[k]["metadata"] == {"i": i}
                assert np.array_equal(recs[k]["vector"], v[i])
    finally:
        client.close()


def test_a_write_chroma_refuses_is_voided_in_the_journal(tmp_path: Path) -> None:
    """The record is written before Chroma is asked; when Chroma refuses the write (here a
    wrong dimension), an abort record voids it."""
    from safechroma import SafeClient

    d = str(tmp_path / "d")
    client = SafeClient(d, standby=False, keep_warm=0)
    try:
        col = client.create_collection("refused", embedding_function=None)
        col.add(ids=["ok"], embeddings=np.ones((1, 3), np.float32), documents=["fine"])
        with pytest.raises(Exception, match="(?i)dimension"):
            col.add(ids=["bad"], embeddings=np.ones((1, 5), np.float32), documents=["no"])
        col.upsert(ids=["after"], embeddings=np.zeros((1, 3), np.float32))
        assert col.count() == 2
        # Before the close compacts it away: the refused write was journaled, then voided.
        ops = [(h["op"], h.get("ids")) for h, _ in jr.read_records(d)]
        assert ("add", ["bad"]) in ops and ops[ops.index(("add", ["bad"])) + 1][0] == "abort"
    finally:
        client.close()
    (state,) = [c for c in jr.replay(d).values() if c.name == "refused"]
    assert sorted(state.records) == ["after", "ok"]


def test_journal_off_writes_nothing(tmp_path: Path) -> None:
    from safechroma import SafeClient

    d = str(tmp_path / "d")
    client = SafeClient(d, standby=False, keep_warm=0, journal=False)
    try:
        col = client.create_collection("off", embedding_function=None)
        col.add(ids=["a"], embeddings=np.ones((1, 2), np.float32))
        assert col.count() == 1
    finally:
        client.close()
    assert jr.journal_bytes(d) == 0 and jr.replay(d) == {}


def test_a_journal_left_by_a_run_with_it_on_is_moved_aside_when_it_is_off(
    tmp_path: Path,
) -> None:
    """Writes made with the journal off would leave it stale, and a repair would then write
    old values back: a worker that opens with it off moves it aside."""
    from safechroma import SafeClient

    d = str(tmp_path / "d")
    for on, value in ((True, "first"), (False, "second")):
        client = SafeClient(d, standby=False, keep_warm=0, journal=on)
        try:
            col = client.get_or_create_collection("toggled", embedding_function=None)
            col.upsert(ids=["a"], embeddings=np.ones((1, 2), np.float32), documents=[value])
        finally:
            client.close()
    assert jr.replay(d) == {}
    aside = [n for n in os.listdir(os.path.join(d, ".safechroma")) if n.startswith("journal-off-")]
    assert len(aside) == 1
