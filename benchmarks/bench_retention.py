"""Cost of the default WAL retention (a second copy of every vector), side by side in one run.

    python benchmarks/bench_retention.py --records 10000 --dim 384 --rounds 3

For each mode of :func:`safechroma.set_wal_retention` (``chroma``: Chroma's own purge, no second
copy; ``compact``: the default; ``full``: every write kept) the same workload runs through a
``SafeClient``: ``add`` all records, then ``rounds - 1`` full ``upsert`` passes, in batches.
Reported: median and p95 seconds per batch for ``add`` and ``upsert`` (after a warm-up batch),
the time of the compaction at close, and the disk cost: WAL payload bytes and ``chroma.sqlite3``
size against the raw size of the live vectors (``records * dim * 4``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

import safechroma
from safechroma.storage.wal import compact_wal, set_wal_retention, wal_bytes


def _p95(xs: list[float]) -> float:
    return sorted(xs)[max(0, int(round(0.95 * len(xs))) - 1)]


def run(mode: str, root: str, n: int, dim: int, rounds: int, batch: int) -> dict[str, float]:
    d = os.path.join(root, mode)
    set_wal_retention(d, mode)
    rng = np.random.default_rng(0)
    ids = [f"r{i}" for i in range(n)]
    times: dict[str, list[float]] = {"add": [], "upsert": []}
    with safechroma.SafeClient(d) as client:
        col = client.create_collection("bench", embedding_function=None)
        for r in range(rounds):
            op = "add" if r == 0 else "upsert"
            for s in range(0, n, batch):
                vec = rng.random((min(batch, n - s), dim), dtype=np.float32)
                docs = [f"document {i} round {r}" for i in range(s, s + len(vec))]
                t0 = time.perf_counter()
                getattr(col, op)(ids=ids[s : s + len(vec)], embeddings=vec, documents=docs)
                times[op].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
    close_s = time.perf_counter() - t0  # includes the worker's exit and the compaction
    rows, payload = wal_bytes(d)
    t1 = time.perf_counter()
    compact_wal(d)  # already compact: the cost of the check at a worker start
    recheck_s = time.perf_counter() - t1
    raw = n * dim * 4
    out = {
        "wal_rows": rows,
        "wal_payload_x": payload / raw,
        "sqlite_x": os.path.getsize(os.path.join(d, "chroma.sqlite3")) / raw,
        "close_s": close_s,
        "start_check_s": recheck_s,
    }
    for op, xs in times.items():
        xs = xs[1:] or xs  # the first batch warms up
        if xs:
            out[f"{op}_median_s"] = statistics.median(xs)
            out[f"{op}_p95_s"] = _p95(xs)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=10000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=500)
    a = ap.parse_args()
    import chromadb

    print(
        f"Python {platform.python_version()}, chromadb {chromadb.__version__}, "
        f"safechroma {safechroma.__version__}, {os.cpu_count()} CPUs, {platform.system()} "
        f"{platform.release()}; {a.records} records x dim {a.dim}, {a.rounds} writes per "
        f"record, batches of {a.batch}"
    )
    res: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="safechroma-retention-") as tmp:
        for mode in ("chroma", "compact", "full"):
            res[mode] = run(mode, tmp, a.records, a.dim, a.rounds, a.batch)
    keys = list(res["chroma"])
    print("| figure | " + " | ".join(res) + " |")
    print("|---|" + "---|" * len(res))
    for k in keys:
        print(f"| {k} | " + " | ".join(f"{res[m].get(k, float('nan')):.4g}" for m in res) + " |")
    base = res["chroma"]
    for op in ("add", "upsert"):
        key = f"{op}_median_s"
        if key in base:
            print(f"{op} median, compact / chroma: {res['compact'][key] / base[key]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
