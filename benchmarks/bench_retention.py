"""Cost of the default WAL retention (a second copy of every vector), side by side in one run.

    python benchmarks/bench_retention.py --records 10000 --dim 384 --rounds 3

For each mode of :func:`safechroma.set_wal_retention` (``chroma``: Chroma's own purge, no second
copy; ``compact``: the default; ``full``: every write kept) the same workload runs through a
``SafeClient``: ``add`` all records, then ``rounds - 1`` full ``upsert`` passes, in batches, each
batch written to the three directories in turn. ``sqlite_file_x`` is the file's size: SQLite keeps
the pages the compaction freed and reuses them for later writes, so it is the high-water mark of
the live rows plus one session's writes (``VACUUM`` returns them).
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


def run(root: str, n: int, dim: int, rounds: int, batch: int) -> dict[str, dict[str, float]]:
    """All modes side by side: each batch is written to every mode's directory in turn (the
    order rotates), so that the machine's load hits every mode alike."""
    modes = ("chroma", "compact", "full")
    rng = np.random.default_rng(0)
    ids = [f"r{i}" for i in range(n)]
    times: dict[str, dict[str, list[float]]] = {m: {"add": [], "upsert": []} for m in modes}
    clients = {}
    cols = {}
    for m in modes:
        d = os.path.join(root, m)
        set_wal_retention(d, m)
        clients[m] = safechroma.SafeClient(d)
        cols[m] = clients[m].create_collection("bench", embedding_function=None)
    k = 0
    for r in range(rounds):
        op = "add" if r == 0 else "upsert"
        for s in range(0, n, batch):
            vec = rng.random((min(batch, n - s), dim), dtype=np.float32)
            docs = [f"document {i} round {r}" for i in range(s, s + len(vec))]
            k += 1
            for m in modes[k % 3 :] + modes[: k % 3]:
                t0 = time.perf_counter()
                getattr(cols[m], op)(ids=ids[s : s + len(vec)], embeddings=vec, documents=docs)
                times[m][op].append(time.perf_counter() - t0)
    out: dict[str, dict[str, float]] = {}
    raw = n * dim * 4
    for m in modes:
        d = os.path.join(root, m)
        t0 = time.perf_counter()
        clients[m].close()  # the worker's exit, then (compact) the compaction
        close_s = time.perf_counter() - t0
        rows, payload = wal_bytes(d)
        t1 = time.perf_counter()
        compact_wal(d)  # already compact: what a worker start pays
        recheck_s = time.perf_counter() - t1
        res = {
            "wal_rows": float(rows),
            "wal_payload_x": payload / raw,
            "sqlite_file_x": os.path.getsize(os.path.join(d, "chroma.sqlite3")) / raw,
            "close_s": close_s,
            "start_check_s": recheck_s,
        }
        for op, xs in times[m].items():
            xs = xs[1:] or xs  # the first batch warms up
            if xs:
                res[f"{op}_median_s"] = statistics.median(xs)
                res[f"{op}_p95_s"] = _p95(xs)
        out[m] = res
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
    with tempfile.TemporaryDirectory(prefix="safechroma-retention-") as tmp:
        res = run(tmp, a.records, a.dim, a.rounds, a.batch)
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
