"""The workload: which operations run, on which collection, with which arguments. No I/O here.

Every mode (direct, safechroma, http, process-per-call) builds its call from :func:`make_call`, so
round ``r`` sends the same ids and the same float32 arrays to every mode. Arguments are derived
from ``(SEED, op, round, rep)``; nothing large travels between the benchmark process and the
mode drivers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Final

import numpy as np

SEED: Final = 20240917
DIMS: Final = (384, 1536)
BATCH: Final = 1000  # add/upsert batch size (issue 5)
BULK_IDS: Final = 5000  # ids per bulk get(include=["embeddings"])


def collection_name(dim: int) -> str:
    return f"bench{dim}"


def record_id(i: int) -> str:
    return f"id-{i:07d}"


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """One benchmarked operation."""

    name: str
    label: str  # for tables and the chart
    dim: int  # which collection
    slow: bool  # seconds per call: one call per mode per round
    writes: bool


OPS: Final[tuple[OpSpec, ...]] = (
    # A call into Chroma that does no work: the transport floor (dim 0 = on the client).
    OpSpec("heartbeat", "client.heartbeat()", 0, False, False),
    OpSpec("count", "count()", 384, False, False),
    OpSpec("get_ids10", "get(ids=10)", 384, False, False),
    OpSpec("get_limit100_emb", "get(limit=100, +emb)", 384, False, False),
    OpSpec("query1", "query(1 vec, k=10)", 384, False, False),
    OpSpec("query16", "query(16 vec, k=10)", 384, False, False),
    OpSpec("get_bulk_emb", f"get(ids={BULK_IDS}, +emb)", 384, True, False),
    OpSpec("add384", "add(1000x384)", 384, True, True),
    OpSpec("add1536", "add(1000x1536)", 1536, True, True),
    OpSpec("upsert384", "upsert(1000x384)", 384, True, True),
    OpSpec("upsert1536", "upsert(1000x1536)", 1536, True, True),
)
OP_BY_NAME: Final = {op.name: op for op in OPS}


@dataclasses.dataclass
class Call:
    """A call to make on a collection, and the untimed call that undoes it (for add)."""

    collection: str | None  # None: a method of the client
    method: str
    kwargs: dict[str, Any]
    payload_bytes: int  # float32 array bytes sent to Chroma
    cleanup: tuple[str, dict[str, Any]] | None = None


def _rng(op: str, rnd: int, rep: int) -> np.random.Generator:
    return np.random.default_rng([SEED, sum(op.encode()), len(op), rnd + 1000, rep])


def make_call(op_name: str, records: int, rnd: int, rep: int, tag: str = "") -> Call:
    """The call for ``op_name`` in round ``rnd``, repetition ``rep``.

    ``tag`` keeps the fresh ids of ``add`` apart between warm-up and measured rounds.
    """
    op = OP_BY_NAME[op_name]
    col = collection_name(op.dim)
    rng = _rng(op_name, rnd, rep)
    if op_name == "heartbeat":
        return Call(None, "heartbeat", {}, 0)
    if op_name == "count":
        return Call(col, "count", {}, 0)
    if op_name == "get_ids10":
        idx = rng.choice(records, size=min(10, records), replace=False)
        return Call(col, "get", {"ids": [record_id(int(i)) for i in idx]}, 0)
    if op_name == "get_limit100_emb":
        return Call(col, "get", {"limit": 100, "include": ["embeddings"]}, 0)
    if op_name in ("query1", "query16"):
        n = 1 if op_name == "query1" else 16
        q = rng.standard_normal((n, op.dim), dtype=np.float32)
        return Call(col, "query", {"query_embeddings": q, "n_results": 10}, q.nbytes)
    if op_name == "get_bulk_emb":
        n = min(BULK_IDS, records)
        return Call(
            col, "get", {"ids": [record_id(i) for i in range(n)], "include": ["embeddings"]}, 0
        )
    if op_name.startswith("add"):
        ids = [f"add{tag}-{rnd}-{rep}-{i}" for i in range(BATCH)]
        emb = rng.standard_normal((BATCH, op.dim), dtype=np.float32)
        return Call(
            col, "add", {"ids": ids, "embeddings": emb}, emb.nbytes, ("delete", {"ids": ids})
        )
    if op_name.startswith("upsert"):
        # Fresh ids, deleted afterwards, like add. Upserting 1000 *existing* ids takes HNSW's
        # update path, measured at 5-7 s (384 dims) and 18-24 s (1536) per call on 10k records
        # on this machine: it would eat the time budget and says nothing more about transport.
        ids = [f"ups{tag}-{rnd}-{rep}-{i}" for i in range(BATCH)]
        emb = rng.standard_normal((BATCH, op.dim), dtype=np.float32)
        return Call(
            col, "upsert", {"ids": ids, "embeddings": emb}, emb.nbytes, ("delete", {"ids": ids})
        )
    raise ValueError(f"unknown op {op_name!r}")


# Throughput (issue 10): calls per second with several callers at once.
THROUGHPUT_OPS: Final = ("query1", "get_ids10", "upsert100")
THROUGHPUT_LABELS: Final = {
    "query1": "query(1 vec, k=10)",
    "get_ids10": "get(ids=10)",
    "upsert100": "upsert(100x384, new ids)",
}
THREADS: Final = (1, 2, 4, 8)
TASKS: Final = (8, 64)
UPSERT_BATCH: Final = 100


def throughput_call(op_name: str, records: int, worker: int, k: int, tag: str) -> Call:
    """The ``k``-th call of caller ``worker`` in a throughput run (the same in every mode)."""
    if op_name == "upsert100":
        rng = _rng(op_name, 10_000 + worker, k)
        ids = [f"tp{tag}-{worker}-{k}-{i}" for i in range(UPSERT_BATCH)]
        emb = rng.standard_normal((UPSERT_BATCH, DIMS[0]), dtype=np.float32)
        return Call(collection_name(DIMS[0]), "upsert", {"ids": ids, "embeddings": emb}, emb.nbytes)
    return make_call(op_name, records, 10_000 + worker, k % 64)


def result_bytes(result: Any) -> int:
    """Bytes of embedding arrays in a get() result (what a bulk read moves)."""
    if isinstance(result, dict):
        emb = result.get("embeddings")
        if isinstance(emb, np.ndarray):
            return int(emb.nbytes)
        if isinstance(emb, list):
            return int(sum(np.asarray(e).nbytes for e in emb))
    return 0


def dataset_batches(records: int, dim: int, batch: int = 5000) -> Any:
    """Yield (ids, embeddings, documents, metadatas) to build a collection of ``records``."""
    rng = np.random.default_rng([SEED, dim])
    for start in range(0, records, batch):
        stop = min(records, start + batch)
        emb = rng.standard_normal((stop - start, dim), dtype=np.float32)
        ids = [record_id(i) for i in range(start, stop)]
        docs = [f"document {i}" for i in range(start, stop)]
        metas = [{"i": i, "parity": i % 2} for i in range(start, stop)]
        yield ids, emb, docs, metas
