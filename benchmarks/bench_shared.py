"""Throughput of processes sharing one directory's worker against threads of one process.

The check of the sharing issue: 4 processes sharing a directory get at least what one process
with 4 threads gets. Both run against the same shared worker setup (default options), on one
10k x 384 collection, for ``query(1)`` and ``get`` of 10 ids, in one run, side by side:

    python benchmarks/bench_shared.py [--records 10000] [--seconds 3] [--rounds 2]

Writes ``benchmarks/results/shared.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
sys.path.insert(0, str(SRC))

from safechroma import SafeClient  # noqa: E402

DIM = 384

_LOAD = """
import json, sys, threading, time
import numpy as np
sys.path.insert(0, {src!r})
from safechroma import SafeClient
path, op, threads, start, seconds, records = sys.argv[1:7]
threads, start, seconds, records = int(threads), float(start), float(seconds), int(records)
client = SafeClient(path)
col = client.get_collection("bench", embedding_function=None)
col.count()
counts = [0] * threads
def run(k):
    rng = np.random.default_rng(k + 1000 * __import__("os").getpid())
    q = rng.random((64, {dim}), dtype=np.float32)
    while time.time() < start:
        time.sleep(0.001)
    end = start + seconds
    n = 0
    while time.time() < end:
        if op == "query":
            col.query(query_embeddings=q[n % 64 : n % 64 + 1], n_results=1)
        else:
            ids = [str(i) for i in rng.choice(records, 10, replace=False)]
            col.get(ids=ids)
        n += 1
    counts[k] = n
print("ready", flush=True)
ts = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
for t in ts: t.start()
for t in ts: t.join()
print(json.dumps(sum(counts)), flush=True)
client.close()
"""


def _round(path: str, op: str, procs: int, threads: int, seconds: float, records: int) -> float:
    start = time.time() + 3.0 + procs  # every interpreter is up and attached by then
    script = _LOAD.format(src=str(SRC), dim=DIM)
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", script, path, op, str(threads), str(start), str(seconds)]
            + [str(records)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(procs)
    ]
    total = 0
    for r in runs:
        out, err = r.communicate(timeout=120 + seconds)
        assert r.returncode == 0 and "Traceback" not in err, err[-3000:]
        total += int(json.loads(out.strip().splitlines()[-1]))
    return total / seconds


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="bench-shared-")
    path = os.path.join(workdir, "db")
    rng = np.random.default_rng(0)
    # This process keeps the directory's worker alive across rounds: each round's programs
    # attach to it, as web-server workers do to the one that came up first.
    holder = SafeClient(path)
    col = holder.create_collection("bench", embedding_function=None)
    for lo in range(0, args.records, 2000):
        hi = min(args.records, lo + 2000)
        col.add(
            ids=[str(i) for i in range(lo, hi)],
            embeddings=rng.random((hi - lo, DIM), dtype=np.float32),
        )
    rows = []
    for op in ("query", "get"):
        threads_runs, procs_runs = [], []
        for _ in range(args.rounds):  # interleaved, so drift on a shared machine hits both
            threads_runs.append(_round(path, op, 1, 4, args.seconds, args.records))
            procs_runs.append(_round(path, op, 4, 1, args.seconds, args.records))
        t, p = float(np.median(threads_runs)), float(np.median(procs_runs))
        rows.append((op, t, p, p / t))
        print(f"{op}: 1 process x 4 threads {t:.0f}/s, 4 processes {p:.0f}/s, ratio {p / t:.2f}")
    holder.close()
    load = os.getloadavg()[0]
    lines = [
        "# Four processes sharing a directory vs one process with four threads",
        "",
        f"`python benchmarks/bench_shared.py --records {args.records} --seconds "
        f"{args.seconds} --rounds {args.rounds}`, {os.cpu_count()} cores, load {load:.2f} "
        "after the run; medians of the rounds, calls per second over all callers.",
        "",
        "| call | 1 process x 4 threads | 4 processes x 1 thread | ratio |",
        "|---|---|---|---|",
    ]
    names = {"query": "query(1)", "get": "get of 10 ids"}
    lines += [f"| {names[op]} | {t:.0f}/s | {p:.0f}/s | {r:.2f}x |" for op, t, p, r in rows]
    out = HERE / "results" / "shared.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
