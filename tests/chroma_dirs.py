"""Build real Chroma persist directories and corrupt them for tests.

Chroma only ever runs in child processes (``python tests/chroma_dirs.py <cmd> <json>``): the
pytest process never imports chromadb, so it stays free of Chroma's threads and fds, and the
library's rule holds that the parent never opens a directory with Chroma. Vectors are explicit
and deterministic (never Chroma's default embedding function: it downloads a model).

API (all paths are ``str``):

* :func:`make_collection_dir` - one collection; :func:`build_dirs` - many directories, one child.
* :func:`corrupt` ``(dest, kind)`` - apply one entry of :data:`KINDS` to a built directory.
* :func:`verify_dir` - open with Chroma in a child and report, per collection, missing ids,
  wrong documents/metadata and records whose own vector does not come back first.
* :func:`vectors` - the deterministic vectors a spec wrote (for expected values).

A spec is a dict: ``{"purge_wal": bool, "collections": [{"name", "n", "dim", "space",
"sync_threshold", "deletes", "updates", "batch"}]}``; missing keys take :data:`DEFAULTS`.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import sqlite3
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

HERE = os.path.abspath(__file__)
HEADER_FORMAT = "<iQQQQQQiIQQQdQ"
DEFAULTS: dict[str, Any] = {
    "name": "coll",
    "n": 300,
    "dim": 8,
    "space": "l2",
    "sync_threshold": 100,
    "deletes": 0,
    "updates": 0,
    "batch": 100,
}


def _coll(spec: dict[str, Any]) -> dict[str, Any]:
    return {**DEFAULTS, **spec}


def vectors(name: str, n: int, dim: int, generation: int = 0) -> np.ndarray:
    """Deterministic float32 vectors ``(n, dim)`` for ``name`` (generation 1 = updates)."""
    rng = np.random.default_rng(zlib.crc32(f"{name}/{generation}".encode()))
    return rng.uniform(-1.0, 1.0, size=(n, dim)).astype(np.float32)


def record_ids(name: str, n: int) -> list[str]:
    """Ids written for collection ``name``."""
    return [f"{name}-{i}" for i in range(n)]


def expected(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Live ids, documents and current vectors per collection after building ``spec``."""
    out: dict[str, dict[str, Any]] = {}
    for c in map(_coll, spec["collections"]):
        n, u, d = c["n"], c["updates"], c["deletes"]
        vec = vectors(c["name"], n, c["dim"]).copy()
        if u:
            vec[:u] = vectors(c["name"], u, c["dim"], 1)
        live = n - d
        ids = record_ids(c["name"], n)[:live]
        out[c["name"]] = {
            "ids": ids,
            "documents": [f"doc {c['name']} {i}" for i in range(live)],
            "vectors": vec[:live],
            "space": c["space"],
        }
    return out


def _run_child(cmd: str, payload: Any, timeout: float = 600) -> Any:
    env = {**os.environ, "ANONYMIZED_TELEMETRY": "False"}
    p = subprocess.run(
        [sys.executable, HERE, cmd, json.dumps(payload)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if p.returncode != 0:
        raise RuntimeError(f"child {cmd} failed rc={p.returncode}\n{p.stderr[-3000:]}")
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    return json.loads(lines[-1][7:]) if lines else None


def build_dirs(specs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Build several directories in one child process (one chromadb import).

    Args:
        specs: destination path -> spec.

    Returns:
        destination -> info (``collections``: name -> ``{"id", "segment"}``).
    """
    cache = os.environ.get(BUILD_CACHE_ENV)
    if not cache:
        result: dict[str, Any] = _run_child("build", specs)
        return result
    return _build_through_cache(cache, specs)


# The test processes of one run (pytest-xdist) share built directories: each spec is built once
# per run, by whichever process asks first, and copied from there (tests/conftest.py names the
# folder; a run without xdist builds in place, as before).
BUILD_CACHE_ENV = "SAFECHROMA_TEST_BUILD_CACHE"


def _build_through_cache(cache: str, specs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    import fcntl
    import hashlib
    import shutil

    os.makedirs(cache, exist_ok=True)
    keys = {
        dest: hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]
        for dest, spec in specs.items()
    }
    locks = []
    try:
        for key in sorted(set(keys.values())):  # one order for every process: no deadlock
            fd = os.open(os.path.join(cache, key + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
            locks.append(fd)
            fcntl.flock(fd, fcntl.LOCK_EX)
        missing = {
            os.path.join(cache, key, "dir"): specs[dest]
            for dest, key in keys.items()
            if not os.path.exists(os.path.join(cache, key, "info.json"))
        }
        if missing:
            built: dict[str, Any] = _run_child("build", missing)
            for where, info in built.items():
                with open(os.path.join(os.path.dirname(where), "info.json"), "w") as f:
                    json.dump(info, f)
        out: dict[str, Any] = {}
        for dest, key in keys.items():
            shutil.copytree(os.path.join(cache, key, "dir"), dest)
            with open(os.path.join(cache, key, "info.json")) as f:
                out[dest] = json.load(f)
        return out
    finally:
        for fd in locks:
            os.close(fd)


def make_collection_dir(
    dest: str,
    *,
    n: int = 300,
    dim: int = 8,
    space: str = "l2",
    sync_threshold: int = 100,
    purge_wal: bool = True,
    deletes: int = 0,
    updates: int = 0,
    name: str = "coll",
) -> dict[str, Any]:
    """Build a directory with one collection; returns its info (see :func:`build_dirs`)."""
    spec = {
        "purge_wal": purge_wal,
        "collections": [
            dict(
                name=name,
                n=n,
                dim=dim,
                space=space,
                sync_threshold=sync_threshold,
                deletes=deletes,
                updates=updates,
            )
        ],
    }
    info: dict[str, Any] = build_dirs({dest: spec})[dest]
    info["spec"] = spec
    return info


def verify_dir(path: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Open ``path`` with Chroma in a child; compare with what ``spec`` wrote.

    Returns:
        name -> ``{"count", "missing", "bad_document", "not_first", "wrong_vector"}`` (lists of
        ids; ``not_first``: the id's own vector does not find it first, an approximate-search
        property; ``wrong_vector``: its stored vector is not the one written, exact), or
        ``{"error": ...}`` / ``{"crash": returncode}`` when Chroma fails.
    """
    try:
        res: dict[str, Any] = _run_child("verify", {"path": path, "spec": spec}, timeout=300)
        return res
    except RuntimeError as e:
        return {"crash": str(e)[:500]}


def segment_dir(path: str, collection: str = "coll") -> str:
    """The vector segment directory of ``collection`` (read from SQLite, no Chroma)."""
    con = sqlite3.connect(f"file:{path}/chroma.sqlite3?mode=ro", uri=True)
    try:
        row = con.execute(
            "SELECT s.id FROM segments s JOIN collections c ON s.collection = c.id "
            "WHERE c.name = ? AND s.scope = 'VECTOR'",
            (collection,),
        ).fetchone()
    finally:
        con.close()
    return os.path.join(path, row[0])


# ---------------------------------------------------------------------------------------------
# Corruptions: each takes the persist dir and the segment dir; pure file edits unless noted.


def _header(seg: str) -> list[Any]:
    with open(os.path.join(seg, "header.bin"), "rb") as f:
        return list(struct.unpack(HEADER_FORMAT, f.read()))


def _write_header(seg: str, h: list[Any]) -> None:
    with open(os.path.join(seg, "header.bin"), "wb") as f:
        f.write(struct.pack(HEADER_FORMAT, *h))


def _patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _set_header_field(idx: int, fn: Callable[[list[Any]], Any]) -> Callable[[str, str], None]:
    def apply(root: str, seg: str) -> None:
        h = _header(seg)
        h[idx] = fn(h)
        _write_header(seg, h)

    return apply


def _truncate(name: str, frac: float) -> Callable[[str, str], None]:
    def apply(root: str, seg: str) -> None:
        p = os.path.join(seg, name)
        os.truncate(p, int(os.path.getsize(p) * frac))

    return apply


def _overwrite(name: str, how: str) -> Callable[[str, str], None]:
    def apply(root: str, seg: str) -> None:
        p = os.path.join(seg, name)
        size = os.path.getsize(p)
        rnd = random.Random(1234)
        if name == "data_level0.bin" and how == "random":
            # Random bytes over the region of the first live elements (FACTS §3: SIGSEGV).
            h = _header(seg)
            size = min(size, h[3] * h[4])
        data = bytes(size) if how == "zero" else bytes(rnd.getrandbits(8) for _ in range(size))
        _patch(p, 0, data)

    return apply


def _level0(field: str) -> Callable[[str, str], None]:
    def apply(root: str, seg: str) -> None:
        h = _header(seg)
        cur, sdpe = h[3], h[4]
        el = cur // 2
        p = os.path.join(seg, "data_level0.bin")
        if field == "count":
            _patch(p, el * sdpe, struct.pack("<H", 65535))
        else:
            _patch(p, el * sdpe, struct.pack("<H", 1))
            _patch(p, el * sdpe + 4, struct.pack("<I", cur + 1000))

    return apply


def _upper_oob(root: str, seg: str) -> None:
    p = os.path.join(seg, "link_lists.bin")
    with open(p, "rb") as f:
        words = np.frombuffer(f.read(), dtype="<u4")
    first = int(np.flatnonzero(words)[0])  # header word of the first element with level > 0
    h = _header(seg)
    _patch(p, (first + 1) * 4, struct.pack("<I", 1))  # count 1 at level 1
    _patch(p, (first + 2) * 4, struct.pack("<I", h[3] + 77))


def _pickle(how: str) -> Callable[[str, str], None]:
    def apply(root: str, seg: str) -> None:
        p = os.path.join(seg, "index_metadata.pickle")
        if how == "delete":
            os.remove(p)
        elif how == "garble":
            _overwrite("index_metadata.pickle", "random")(root, seg)
        elif how == "truncate":
            os.truncate(p, os.path.getsize(p) // 2)
        elif how == "missing_ids":
            # Readable, but half of the ids are gone from both maps (a partial rewrite).
            with open(p, "rb") as f:
                meta = pickle.loads(f.read())
            drop = sorted(meta["id_to_label"])[::2]
            for ident in drop:
                meta["label_to_id"].pop(meta["id_to_label"].pop(ident), None)
            with open(p, "wb") as f:
                f.write(pickle.dumps(meta))
        elif how == "malicious":
            marker = os.path.join(root, "PWNED")
            with open(p, "wb") as f:
                f.write(malicious_pickle(marker))

    return apply


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def malicious_pickle(marker: str) -> bytes:
    """A pickle that runs ``touch marker`` when loaded with plain ``pickle.load``."""
    return pickle.dumps({"label_to_id": _Evil(marker), "id_to_label": {}})


def _delete_segment(root: str, seg: str) -> None:
    import shutil

    shutil.rmtree(seg)


def _sqlite_pages(root: str, seg: str) -> None:
    db = os.path.join(root, "chroma.sqlite3")
    con = sqlite3.connect(db)
    page = con.execute("PRAGMA page_size").fetchone()[0]
    root_page = con.execute(
        "SELECT rootpage FROM sqlite_master WHERE name = 'embeddings'"
    ).fetchone()[0]
    con.close()
    rnd = random.Random(7)
    _patch(db, (root_page - 1) * page, bytes(rnd.getrandbits(8) for _ in range(page)))


def _sqlite_header(root: str, seg: str) -> None:
    _patch(os.path.join(root, "chroma.sqlite3"), 0, b"garbage!" * 12)


@dataclass(frozen=True)
class Kind:
    """One corruption: what it does, whether Chroma suffers from it, the finding codes expected."""

    description: str
    apply: Callable[[str, str], None]
    harmful: bool = True
    codes: tuple[str, ...] = ()


KINDS: dict[str, Kind] = {
    "header_truncated": Kind(
        "header.bin cut to 50 bytes", _truncate("header.bin", 0.5), codes=("header_size",)
    ),
    "header_zeroed": Kind(
        "header.bin all zero", _overwrite("header.bin", "zero"), codes=("header_version",)
    ),
    "header_random": Kind("header.bin random bytes", _overwrite("header.bin", "random")),
    "data_truncated": Kind(
        "data_level0.bin cut in half", _truncate("data_level0.bin", 0.5), codes=("data_truncated",)
    ),
    "data_zeroed": Kind("data_level0.bin all zero", _overwrite("data_level0.bin", "zero")),
    "data_random": Kind(
        "random bytes over the live elements", _overwrite("data_level0.bin", "random")
    ),
    "level0_neighbor_oob": Kind(
        "a level-0 neighbour id past the end",
        _level0("nbr"),
        codes=("level0_neighbor_out_of_range",),
    ),
    "level0_count_huge": Kind(
        "a level-0 link count of 65535", _level0("count"), codes=("level0_link_count",)
    ),
    "upper_neighbor_oob": Kind(
        "an upper-level neighbour id past the end",
        _upper_oob,
        codes=("upper_neighbor_out_of_range",),
    ),
    "links_truncated": Kind("link_lists.bin cut in half", _truncate("link_lists.bin", 0.5)),
    "entry_point_oob": Kind(
        "entry point past the end",
        _set_header_field(8, lambda h: h[3] + 5),
        codes=("header_entry_point",),
    ),
    "max_elements_lt_count": Kind(
        "max_elements < cur_element_count",
        _set_header_field(2, lambda h: h[3] - 1),
        codes=("header_capacity",),
    ),
    "sdpe_too_small": Kind(
        "size_data_per_element too small",
        _set_header_field(4, lambda h: h[4] - 4),
        codes=("header_size_data_per_element",),
    ),
    "pickle_deleted": Kind(
        "index_metadata.pickle removed", _pickle("delete"), codes=("pickle_missing",)
    ),
    "pickle_garbled": Kind("index_metadata.pickle random bytes", _pickle("garble")),
    "pickle_truncated": Kind(
        "index_metadata.pickle cut in half", _pickle("truncate"), codes=("pickle_unreadable",)
    ),
    "pickle_malicious": Kind(
        "index_metadata.pickle runs os.system", _pickle("malicious"), codes=("pickle_unsafe",)
    ),
    "segment_deleted": Kind(
        "vector segment dir removed (WAL purged)", _delete_segment, codes=("segment_missing",)
    ),
    "sqlite_pages": Kind(
        "embeddings table root page overwritten", _sqlite_pages, codes=("sqlite_corrupt",)
    ),
    "sqlite_header": Kind(
        "SQLite file header overwritten", _sqlite_header, codes=("sqlite_corrupt",)
    ),
}


# Damage that only the deep check sees, used by the repair tests (kept out of KINDS, whose
# every entry the shallow check must also catch).
REPAIR_KINDS: dict[str, Kind] = {
    "pickle_missing_ids": Kind(
        "index_metadata.pickle lost half of its ids",
        _pickle("missing_ids"),
        codes=("pickle_labels",),
    ),
}


def corrupt(root: str, kind: str, collection: str = "coll") -> str:
    """Apply ``KINDS[kind]`` (or ``REPAIR_KINDS[kind]``) to ``root``; returns the segment dir."""
    seg = segment_dir(root, collection)
    (KINDS.get(kind) or REPAIR_KINDS[kind]).apply(root, seg)
    return seg


def make_torn_dir(dest: str, *, n: int = 400, dim: int = 8) -> dict[str, Any]:
    """A torn flush, exactly as a SIGKILL between the header and data writes leaves it.

    FACTS §2: a flush writes header, then data, then links, then the pickle, with no fsync. A
    kill after the header leaves the new header over the previous flush's data/links/pickle.
    We build the state in two real flushes and keep the old files with the new header, which is
    deterministic (a timed SIGKILL lands in the microsecond window only by chance).
    """
    import shutil

    info = make_collection_dir(dest, n=n - 100, dim=dim, sync_threshold=100)
    seg = segment_dir(dest)
    old = dest + ".old-seg"
    shutil.copytree(seg, old)
    _run_child("extend", {"path": dest, "name": "coll", "start": n - 100, "stop": n, "dim": dim})
    shutil.copy(os.path.join(seg, "header.bin"), os.path.join(old, "header.bin"))
    shutil.rmtree(seg)
    os.rename(old, seg)
    info["spec"]["collections"][0]["n"] = n
    return info


def make_two_writers_dir(dest: str, *, n: int = 300, dim: int = 8) -> dict[str, Any]:
    """Two live processes write one directory (FACTS §4): the stale one overwrites the index.

    Writer A opens and loads the index, writer B adds and flushes records, then A adds its own
    and flushes its stale in-memory index over B's files. The WAL is purged (the default).
    """
    info = make_collection_dir(dest, n=n, dim=dim, sync_threshold=100)
    env = {**os.environ, "ANONYMIZED_TELEMETRY": "False"}
    a = subprocess.Popen(
        [
            sys.executable,
            HERE,
            "slow_writer",
            json.dumps({"path": dest, "start": n, "stop": n + 200, "dim": dim}),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert a.stdout is not None and a.stdin is not None
    assert a.stdout.readline().strip() == "READY"
    _run_child(
        "extend", {"path": dest, "name": "coll", "start": n + 200, "stop": n + 400, "dim": dim}
    )
    a.stdin.write("GO\n")
    a.stdin.close()
    a.wait(timeout=120)
    a.stdout.close()
    info["spec"]["collections"][0]["n"] = n + 400
    return info


def make_torn_flush_dir(
    dest: str, *, seed: int = 1, snapshot: bool = True, ids: int = 150
) -> dict[str, Any]:
    """A kill during an index flush that tore ``index_metadata.pickle``, as the soak saw it.

    chromadb 1.5.9 flushes the index (files, then the pickle rewritten in place) and only then
    records the flush's ``max_seq_id``; Chroma purges the WAL below the recorded one. A kill
    while the pickle is being written leaves: index files of the new flush ``T``, an empty
    pickle, ``max_seq_id`` of the previous flush ``V`` and the WAL from ``V`` on. We build it
    for real and deterministically: a mixed workload (add, upsert, update, delete; ``add`` of
    existing ids included) through plain chromadb with the purge off, stopped right after a
    flush; then ``max_seq_id`` is set back to ``V``, the WAL purged below ``V`` as Chroma would
    have, the purge switched back on, and the pickle truncated. With ``snapshot`` the pickle of
    the first flush is kept as safechroma's label-map snapshot (taken at an earlier worker
    start), so records flushed between it and ``V`` are known to nothing but the index.

    Returns:
        ``{"expected": {id: [document, vector]}, "V": int, "T": int, "segment": str}``.
    """
    info: dict[str, Any] = _run_child(
        "torn_flush", {"path": dest, "seed": seed, "snapshot": snapshot, "ids": ids}
    )
    seg = os.path.join(dest, info["segment"])
    con = sqlite3.connect(os.path.join(dest, "chroma.sqlite3"))
    with con:
        con.execute(
            "UPDATE max_seq_id SET seq_id = ? WHERE segment_id = ?", (info["V"], info["segment"])
        )
        con.execute("DELETE FROM embeddings_queue WHERE seq_id < ?", (info["V"],))
        con.execute(
            "UPDATE embeddings_queue_config SET config_json_str = ?",
            (
                json.dumps(
                    {"automatically_purge": True, "_type": "EmbeddingsQueueConfigurationInternal"}
                ),
            ),
        )
    con.close()
    os.truncate(os.path.join(seg, "index_metadata.pickle"), 0)
    return info


# ---------------------------------------------------------------------------------------------
# Child side: the only code that imports chromadb.


def _child_client(path: str) -> Any:
    import chromadb

    return chromadb.PersistentClient(path)


def _child_build(specs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dest, spec in specs.items():
        client = _child_client(dest)
        client.heartbeat()
        if not spec.get("purge_wal", True):
            # keep_full_wal before the first write (FACTS §2): Chroma reads this row.
            con = sqlite3.connect(os.path.join(dest, "chroma.sqlite3"))
            con.execute(
                "INSERT OR REPLACE INTO embeddings_queue_config (id, config_json_str) VALUES (1, "
                "?)",
                (
                    json.dumps(
                        {
                            "automatically_purge": False,
                            "_type": "EmbeddingsQueueConfigurationInternal",
                        }
                    ),
                ),
            )
            con.commit()
            con.close()
        info: dict[str, Any] = {"collections": {}}
        for c in map(_coll, spec["collections"]):
            st = c["sync_threshold"]
            col = client.create_collection(
                c["name"],
                configuration={
                    "hnsw": {"space": c["space"], "sync_threshold": st, "batch_size": min(100, st)}
                },
                embedding_function=None,
            )
            vec = vectors(c["name"], c["n"], c["dim"])
            ids = record_ids(c["name"], c["n"])
            for s in range(0, c["n"], c["batch"]):
                e = min(c["n"], s + c["batch"])
                col.add(
                    ids=ids[s:e],
                    embeddings=vec[s:e],
                    documents=[f"doc {c['name']} {i}" for i in range(s, e)],
                    metadatas=[{"i": i, "name": c["name"]} for i in range(s, e)],
                )
            if c["updates"]:
                u = c["updates"]
                col.update(ids=ids[:u], embeddings=vectors(c["name"], u, c["dim"], 1))
            if c["deletes"]:
                col.delete(ids=ids[c["n"] - c["deletes"] :])
            info["collections"][c["name"]] = {"id": str(col.id)}
        out[dest] = info
    return out


def _child_extend(p: dict[str, Any]) -> None:
    col = _child_client(p["path"]).get_collection(p["name"], embedding_function=None)
    name, start, stop = p["name"], p["start"], p["stop"]
    vec = vectors(name, stop, p["dim"])
    ids = record_ids(name, stop)
    col.add(
        ids=ids[start:stop],
        embeddings=vec[start:stop],
        documents=[f"doc {name} {i}" for i in range(start, stop)],
        metadatas=[{"i": i, "name": name} for i in range(start, stop)],
    )


def _child_readd(p: dict[str, Any]) -> None:
    """``add`` ids that exist already, with other vectors and documents: Chroma ignores it."""
    col = _child_client(p["path"]).get_collection(p["name"], embedding_function=None)
    name, start, stop = p["name"], p["start"], p["stop"]
    vec = vectors(name, stop, p["dim"], generation=7)
    ids = record_ids(name, stop)
    col.add(
        ids=ids[start:stop],
        embeddings=vec[start:stop],
        documents=[f"ignored {name} {i}" for i in range(start, stop)],
    )


def readd_existing(dest: str, start: int, stop: int, *, dim: int = 8) -> None:
    """Re-``add`` existing ids ``[start, stop)`` (ignored by Chroma; the WAL keeps the rows)."""
    _run_child("readd", {"path": dest, "name": "coll", "start": start, "stop": stop, "dim": dim})


def _child_slow_writer(p: dict[str, Any]) -> None:
    col = _child_client(p["path"]).get_collection("coll", embedding_function=None)
    col.count()  # loads the index into this process (FACTS §2 backfill)
    print("READY", flush=True)
    sys.stdin.readline()
    p = {**p, "name": "coll"}
    _child_extend(p)


def _child_grow(p: dict[str, Any]) -> dict[str, Any]:
    """Add ``batches`` x ``batch`` new records under an optional ``RLIMIT_FSIZE``.

    SIGXFSZ gets its default action back (Python ignores it at start-up, so a write past the
    limit would only fail with EFBIG and hnswlib does not check its writes): a write past the
    limit kills the process, as it must kill a worker.
    """
    import resource
    import signal

    if p.get("fsize_limit"):
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
        lim = int(p["fsize_limit"])
        resource.setrlimit(resource.RLIMIT_FSIZE, (lim, lim))
    col = _child_client(p["path"]).get_collection("coll", embedding_function=None)
    rng = np.random.default_rng(5)
    for k in range(p["batches"]):
        ids = [f"grow-{k}-{i}" for i in range(p["batch"])]
        col.add(ids=ids, embeddings=rng.uniform(-1, 1, (p["batch"], p["dim"])).astype("f4"))
    return {"count": col.count()}


def grow(dest: str, *, batches: int, batch: int, dim: int = 8, fsize_limit: int = 0) -> int:
    """Run :func:`_child_grow` in a plain chromadb child; returns its exit status."""
    env = {**os.environ, "ANONYMIZED_TELEMETRY": "False"}
    arg = {"path": dest, "batches": batches, "batch": batch, "dim": dim}
    arg["fsize_limit"] = fsize_limit
    proc = subprocess.run(
        [sys.executable, HERE, "grow", json.dumps(arg)],
        capture_output=True,
        timeout=300,
        env=env,
    )
    return proc.returncode


def _child_script(p: dict[str, Any]) -> dict[str, Any]:
    """Run ``p["ops"]`` on collection ``coll``: each ``[op, ids, generation]``.

    ``op`` is add / upsert / update / delete; vectors are ``vectors("ops", ...)`` of the given
    generation, one per id number (ids are ``"coll-<n>"``), so the caller knows them.
    """
    col = _child_client(p["path"]).get_collection("coll", embedding_function=None)
    col.count()  # read first: the write-before-read bug of chromadb 1.5.9 (issue 13 part 3)
    top = max((max(ids) for _op, ids, _g in p["ops"] if ids), default=0) + 1
    for op, nums, gen in p["ops"]:
        ids = [f"coll-{n}" for n in nums]
        vec = vectors("ops", top, p["dim"], gen)[nums] if nums else None
        if op == "delete":
            col.delete(ids=ids)
        else:
            getattr(col, op)(
                ids=ids, embeddings=vec, documents=[f"doc {op} {gen} {n}" for n in nums]
            )
    return {"count": col.count()}


def run_ops(dest: str, ops: list[Any], *, dim: int = 8) -> dict[str, Any]:
    """Apply ``ops`` (see :func:`_child_script`) with plain chromadb in a child."""
    res: dict[str, Any] = _run_child("script", {"path": dest, "ops": ops, "dim": dim})
    return res


def _child_probe(p: dict[str, Any]) -> dict[str, Any]:
    """What plain chromadb says about ``coll``: each call's result or its error."""
    out: dict[str, Any] = {}

    def attempt(name: str, fn: Callable[[], Any]) -> None:
        try:
            out[name] = fn()
        except Exception as e:  # noqa: BLE001 - reported to the test
            out[name + "_error"] = f"{type(e).__name__}: {e}"

    col = _child_client(p["path"]).get_collection("coll", embedding_function=None)
    attempt("count", col.count)
    attempt("ids", lambda: sorted(col.get(include=[])["ids"]))
    attempt("embeddings", lambda: len(col.get(include=["embeddings"])["ids"]))
    if p.get("near"):
        attempt("near", lambda: col.query(query_embeddings=[p["near"]], n_results=1)["ids"][0])
    return out


def probe(dest: str, near: list[float] | None = None) -> dict[str, Any]:
    """Run :func:`_child_probe` in a plain chromadb child (on ``dest`` itself: it may write)."""
    res: dict[str, Any] = _run_child("probe", {"path": dest, "near": near})
    return res


def _wrong_vectors(exp: dict[str, Any], ids: list[str], embeddings: Any) -> list[str]:
    """Expected ids whose stored vector is not the one written (exact, unlike ``not_first``).

    Cosine collections store unit vectors, so directions are compared there.
    """
    got = dict(zip(ids, embeddings if embeddings is not None else [], strict=False))
    cosine = exp["space"] == "cosine"
    wrong = []
    for i, want in zip(exp["ids"], exp["vectors"], strict=False):
        if i not in got:
            continue  # reported as missing
        have = np.asarray(got[i], dtype=np.float32)
        w = np.asarray(want, dtype=np.float32)
        if cosine:
            have, w = have / np.linalg.norm(have), w / np.linalg.norm(w)
        if have.shape != w.shape or not np.allclose(have, w, atol=1e-5):
            wrong.append(i)
    return wrong


def _child_verify(p: dict[str, Any]) -> dict[str, Any]:
    client = _child_client(p["path"])
    out: dict[str, Any] = {}
    for name, exp in expected(p["spec"]).items():
        try:
            col = client.get_collection(name, embedding_function=None)
            got = col.get(include=["documents", "metadatas"])
            docs = dict(zip(got["ids"], got["documents"] or [], strict=False))
            missing = [i for i in exp["ids"] if i not in docs]
            bad_doc = [
                i
                for i, d in zip(exp["ids"], exp["documents"], strict=False)
                if i in docs and docs[i] != d
            ]
            not_first: list[str] = []
            if exp["ids"]:
                r = col.query(query_embeddings=exp["vectors"], n_results=1)
                not_first = [
                    i
                    for i, hit in zip(exp["ids"], r["ids"], strict=False)
                    if not hit or hit[0] != i
                ]
            # A live id with no vector makes every get that includes embeddings fail ("Error
            # finding id"); a repair must not leave one behind (issue 7).
            wrong_vector: list[str] = []
            try:
                stored = col.get(include=["embeddings"])
                emb_error = None
                wrong_vector = _wrong_vectors(exp, stored["ids"], stored["embeddings"])
            except Exception as e:  # noqa: BLE001 - reported to the test
                emb_error = f"{type(e).__name__}: {e}"
            out[name] = {
                "count": col.count(),
                "missing": missing,
                "bad_document": bad_doc,
                "not_first": not_first,
                "wrong_vector": wrong_vector,
                "get_embeddings_error": emb_error,
            }
        except Exception as e:  # noqa: BLE001 - reported to the test, which decides
            out[name] = {"error": f"{type(e).__name__}: {e}"}
    return out


def _child_torn_flush(p: dict[str, Any]) -> dict[str, Any]:
    dest = p["path"]
    client = _child_client(dest)
    client.heartbeat()
    con = sqlite3.connect(os.path.join(dest, "chroma.sqlite3"))
    con.execute(
        "INSERT OR REPLACE INTO embeddings_queue_config (id, config_json_str) VALUES (1, ?)",
        (
            json.dumps(
                {"automatically_purge": False, "_type": "EmbeddingsQueueConfigurationInternal"}
            ),
        ),
    )
    con.commit()
    col = client.create_collection(
        "coll",
        configuration={"hnsw": {"sync_threshold": 50, "batch_size": 50}},
        embedding_function=None,
    )
    col.count()  # read before the first write (issue 13: a first read after writes re-applies)
    seg = con.execute(
        "SELECT id FROM segments WHERE collection = ? AND scope = 'VECTOR'", (str(col.id),)
    ).fetchone()[0]

    def flushed() -> int:
        row = con.execute("SELECT seq_id FROM max_seq_id WHERE segment_id = ?", (seg,)).fetchone()
        return int(row[0]) if row else 0

    rng = random.Random(p["seed"])
    n_ids = p["ids"]

    def vec(i: int, v: int) -> list[float]:
        r = np.random.default_rng(zlib.crc32(f"{i}/{v}".encode()))
        return [float(x) for x in r.uniform(-1, 1, 8).astype(np.float32)]

    flushes: list[int] = []
    v = 0
    snap = os.path.join(dest, ".safechroma", "labelmaps", f"{seg}.pickle")
    while len(flushes) < 4:
        v += 1
        op = rng.choices(["add", "upsert", "update", "delete"], [4, 3, 2, 1])[0]
        batch = rng.sample(range(n_ids), rng.randint(1, 8))
        rid = [f"r{i}" for i in batch]
        if op == "delete":
            col.delete(ids=rid)
        else:
            getattr(col, op)(
                ids=rid,
                embeddings=[vec(i, v) for i in batch],
                documents=[f"r{i} v{v}" for i in batch],
            )
        f = flushed()
        if not flushes or f != flushes[-1]:
            if f:
                flushes.append(f)
                if len(flushes) == 1 and p["snapshot"]:
                    os.makedirs(os.path.dirname(snap), exist_ok=True)
                    with open(os.path.join(dest, seg, "index_metadata.pickle"), "rb") as src:
                        data = src.read()
                    with open(snap, "wb") as out:
                        out.write(data)
    got = col.get(include=["documents", "embeddings"])
    expected = {
        i: [d, [float(x) for x in e]]
        for i, d, e in zip(got["ids"], got["documents"], got["embeddings"], strict=True)
    }
    con.close()
    return {"expected": expected, "V": flushes[-2], "T": flushes[-1], "segment": seg}


if __name__ == "__main__":
    cmd, arg = sys.argv[1], json.loads(sys.argv[2])
    fn = {
        "build": _child_build,
        "extend": _child_extend,
        "slow_writer": _child_slow_writer,
        "readd": _child_readd,
        "verify": _child_verify,
        "grow": _child_grow,
        "script": _child_script,
        "probe": _child_probe,
        "torn_flush": _child_torn_flush,
    }[cmd]
    res = fn(arg)
    print("RESULT " + json.dumps(res), flush=True)
    sys.stdout.flush()
    # Skip interpreter teardown of Chroma's runtime: faster, and nothing is left unflushed
    # that Chroma would flush at exit (FACTS §2: no flush on close).
    os._exit(0)
