"""``python -m safechroma demo``: make a real Chroma directory, break it, survive, recover.

1. Build a collection of 3,000 records through ``SafeCollection`` (Chroma flushes its HNSW
   index to disk at 1,000) and query it.
2. Break the index the way a torn write does: level-0 neighbour ids past the end of the index.
3. Show plain ``chromadb`` dying on it (in a child process, so this demo survives to tell).
4. Open it with ``SafeCollection``: the validator finds the damage before any worker touches
   it, the recovery hook backs up and salvages the vectors, a fresh worker writes them back,
   and the same query gives the same answer.
5. Kill the live worker with a genuine SIGBUS in the middle of a call: the caller gets
   ``WorkerCrashedError`` and the next call is served by a new worker.

The embeddings are a deterministic toy function of the text defined here: no model download.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

DIM = 64
RECORDS = 3000
TOPICS = ["rust", "python", "sqlite", "vectors", "signals", "pickles", "locks", "disks"]


def _embed(texts: Sequence[str]) -> np.ndarray:
    """A toy embedding: each text's words hashed into a fixed random direction, summed."""
    out = np.zeros((len(texts), DIM), dtype=np.float32)
    for row, text in enumerate(texts):
        for word in text.split():
            seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
            out[row] += np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return out


def _documents() -> list[str]:
    return [
        f"note {i} about {TOPICS[i % len(TOPICS)]} and {TOPICS[(i * 7 + 3) % len(TOPICS)]}"
        for i in range(RECORDS)
    ]


def _break_level0(segment: str) -> int:
    """Point every level-0 neighbour id past the end of the index; returns elements hit."""
    with open(os.path.join(segment, "header.bin"), "rb") as f:
        header = struct.unpack("<iQQQQQQiIQQQdQ", f.read(100))
    cur, sdpe, max_m0 = header[3], header[4], header[10]
    with open(os.path.join(segment, "data_level0.bin"), "r+b") as f:
        for i in range(cur):
            f.seek(i * sdpe)
            count = struct.unpack("<H", f.read(2))[0]
            if count:
                f.seek(i * sdpe + 4)
                f.write(struct.pack(f"<{max_m0}I", *([cur + 1_000_000] * max_m0)))
    return int(cur)


_PLAIN = """
import sys, numpy as np, chromadb
col = chromadb.PersistentClient(sys.argv[1]).get_collection("notes", embedding_function=None)
print("count:", col.count(), flush=True)
col.query(query_embeddings=np.ones((1, {dim}), dtype=np.float32), n_results=3)
print("query returned", flush=True)
"""


def _say(text: str = "") -> None:
    print(text, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns 0 when every step behaved as promised."""
    parser = argparse.ArgumentParser(prog="safechroma demo", description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="where to build the directory (default: a temp dir)")
    args = parser.parse_args(argv)

    from safechroma import Event, SafeCollection, WorkerCrashedError

    root = args.dir or tempfile.mkdtemp(prefix="safechroma-demo-")
    path = os.path.join(root, "db")
    shutil.rmtree(path, ignore_errors=True)
    ok = True
    try:
        _say(f"1. Building {RECORDS} records in {path} through SafeCollection")
        docs = _documents()
        question = "signals and locks"
        with SafeCollection(path, "notes", embedding_function=None) as col:
            for start in range(0, RECORDS, 1000):
                chunk = docs[start : start + 1000]
                col.add(
                    ids=[f"n{i}" for i in range(start, start + len(chunk))],
                    embeddings=_embed(chunk),
                    documents=chunk,
                    metadatas=[{"n": i} for i in range(start, start + len(chunk))],
                )
            before = col.query(query_embeddings=_embed([question]), n_results=3)
            worker = col._client.stats().worker_pid
            _say(f"   count={col.count()}, worker pid {worker} (this process is {os.getpid()})")
            _say(f"   query {question!r} -> {before['ids'][0]}")
        written = _embed(docs)

        segment = _segment_dir(path)
        hit = _break_level0(segment)
        _say(f"\n2. Broke the index: {hit} elements now point past the end ({segment})")

        _say("\n3. Plain chromadb on the broken directory (in a child process):")
        plain = subprocess.run(
            [sys.executable, "-c", _PLAIN.format(dim=DIM), path],
            capture_output=True,
            text=True,
            timeout=300,
        )
        for line in plain.stdout.splitlines():
            _say(f"   child: {line}")
        if plain.returncode < 0:
            import signal

            _say(
                f"   the child was killed by {signal.Signals(-plain.returncode).name}: "
                "no try/except could have saved it"
            )
        else:
            _say(f"   the child exited with status {plain.returncode}")
        # The child was a second owner of the directory; throw away what it changed by
        # breaking the index again from the same starting point.
        _break_level0(_segment_dir(path))

        _say("\n4. The same directory through SafeCollection:")
        events: list[Event] = []

        def show(event: Event) -> None:
            events.append(event)
            detail = _describe(event)
            if detail:
                _say(f"   [{event.kind}] {detail}")

        with SafeCollection(path, "notes", embedding_function=None, on_event=show) as col:
            after = col.query(query_embeddings=_embed([question]), n_results=3)
            _say(f"   count={col.count()}; query {question!r} -> {after['ids'][0]}")
            # Check every record against what was written, not against the first answer:
            # HNSW is approximate, so the rebuilt graph may rank near-ties differently.
            stored = col.get(
                ids=[f"n{i}" for i in range(RECORDS)], include=["embeddings", "documents"]
            )
            order = [int(i[1:]) for i in stored["ids"]]
            intact = bool(
                np.allclose(np.asarray(stored["embeddings"]), written[order], atol=1e-5)
                and stored["documents"] == [docs[i] for i in order]
            )
            exact = np.argsort(((written - _embed([question])[0]) ** 2).sum(axis=1))[:3]
            _say(
                f"   all {len(order)} records present with their vector and document: "
                + ("yes" if intact and len(order) == RECORDS else "NO")
            )
            found = len(set(after["ids"][0]) & {f"n{i}" for i in exact})
            _say(
                f"   exact nearest neighbours {[f'n{i}' for i in exact]}; the (approximate) "
                f"HNSW query found {found} of them"
            )
            ok &= intact and len(order) == RECORDS and any(e.kind == "recovered" for e in events)

            _say("\n5. A genuine SIGBUS inside the worker, in the middle of a call:")
            # A long-running program has its warm standby worker by now; give this one the
            # second it needs to import chromadb, so the replacement below is the steady state.
            time.sleep(2.0)
            first = col._client.stats().worker_pid
            try:
                col._client.run_in_worker(_sigbus)
                ok = False
            except WorkerCrashedError as exc:
                _say(
                    f"   caught WorkerCrashedError: signal={exc.signal} exitcode={exc.exitcode} "
                    f"pid={exc.pid} operation={exc.operation}"
                )
            t0 = time.perf_counter()
            n = col.count()
            stats = col._client.stats()
            _say(
                f"   next call answered by worker {stats.worker_pid} (was {first}) in "
                f"{(time.perf_counter() - t0) * 1000:.0f} ms: count={n}"
            )
            _say(
                f"   stats: calls={stats.calls} deaths={stats.deaths} "
                f"respawns={stats.respawns} recoveries={stats.recoveries}"
            )
            ok &= stats.worker_pid != first and n == RECORDS
        _say(f"\n{'OK' if ok else 'FAILED'}: this process (pid {os.getpid()}) is still alive.")
        return 0 if ok else 1
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


def _segment_dir(path: str) -> str:
    import sqlite3

    con = sqlite3.connect(f"file:{os.path.join(path, 'chroma.sqlite3')}?mode=ro", uri=True)
    try:
        (seg,) = con.execute(
            "SELECT id FROM segments WHERE type = 'urn:chroma:segment/vector/hnsw-local-persisted'"
        ).fetchone()
    finally:
        con.close()
    return os.path.join(path, str(seg))


def _sigbus(_client: Any) -> None:
    import mmap

    fd, name = tempfile.mkstemp()
    os.write(fd, b"\0" * mmap.PAGESIZE * 2)
    mapped = mmap.mmap(fd, mmap.PAGESIZE * 2)
    os.ftruncate(fd, 0)
    os.unlink(name)
    mapped[mmap.PAGESIZE]


def _describe(event: Any) -> str:
    d = event.detail
    if event.kind == "validated":
        report = d.get("report")
        if d.get("healthy"):
            return ""
        reasons = sorted(
            {
                f.code
                for c in getattr(report, "damaged_collections", [])
                for f in c.findings
                if getattr(f, "severity", "error") == "error"
            }
        )
        return f"validator: DAMAGED ({', '.join(reasons) or 'see report'})"
    if event.kind == "recovered":
        rep = d.get("report")
        cols = getattr(rep, "collections", [])
        salvaged = sum(c.salvaged for c in cols)
        return (
            f"recovery: backup in {getattr(rep, 'backup_dir', '?')}, damaged index "
            f"quarantined, {salvaged} vectors salvaged"
        )
    if event.kind == "salvage_applied":
        s = d.get("summary") or {}
        return (
            f"fresh worker {event.pid} wrote back {s.get('recovered')} vectors; "
            f"not recovered: {len(s.get('not_recovered', []))}"
        )
    if event.kind == "worker_started":
        return f"worker {event.pid} started"
    if event.kind == "worker_died":
        return f"worker {event.pid} died: {d.get('signal')} during {d.get('operation')}"
    return ""


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
