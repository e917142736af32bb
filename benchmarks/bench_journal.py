"""Cost of the write journal (issue 21), journal on vs off, side by side in one run.

    python benchmarks/bench_journal.py --dim 384 --out benchmarks/results/journal.md

Two ``SafeClient`` directories, identical but for ``journal=True`` (the default) and
``journal=False``; each sample writes the same batch to both, the order alternating. Workloads:
``add`` of new records and ``upsert`` of existing ones, in batches of 1000, 100 and 1 record
(documents, metadata, explicit float32 vectors). Reported: median and p95 seconds per call
after a warm-up call, the on/off ratio of the medians (target: at most 1.15x), and the journal's
disk after compaction (the supervisor compacts it at close) against the raw records: ids +
documents + metadata (JSON) + float32 vectors (target: at most 1.2x). Also the journal's own
append (encode, write, fdatasync) measured alone, which is what the ratio pays for.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np

import safechroma
from safechroma.storage import journal as jr


def _p95(xs: list[float]) -> float:
    return sorted(xs)[max(0, int(round(0.95 * len(xs))) - 1)]


WORKLOADS = (
    ("add", 1000),
    ("upsert", 1000),
    ("add", 100),
    ("upsert", 100),
    ("add", 1),
    ("upsert", 1),
)


def run(root: str, dim: int, reps: dict[int, int]) -> dict[str, Any]:
    modes = {"on": True, "off": False}
    rng = np.random.default_rng(0)
    clients = {
        m: safechroma.SafeClient(os.path.join(root, m), journal=on) for m, on in modes.items()
    }
    cols = {m: c.create_collection("bench", embedding_function=None) for m, c in clients.items()}
    times: dict[str, dict[str, list[float]]] = {m: {} for m in modes}
    written: list[str] = []  # ids added so far (the same in both directories)
    k = 0
    for op, batch in WORKLOADS:
        key = f"{op}_{batch}"
        for m in modes:
            times[m][key] = []
        for _ in range(reps[batch] + 1):  # +1: the warm-up call
            if op == "add":
                ids = [f"r{len(written) + i}" for i in range(batch)]
                written.extend(ids)
            else:
                pick = rng.choice(len(written), size=batch, replace=False)
                ids = [written[i] for i in pick]
            vec = rng.random((batch, dim), dtype=np.float32)
            docs = [f"document {i} written by {op}" for i in ids]
            metas = [{"id": i, "op": op, "n": k} for i in ids]
            k += 1
            order = list(modes) if k % 2 else list(reversed(modes))
            for m in order:
                t0 = time.perf_counter()
                getattr(cols[m], op)(ids=ids, embeddings=vec, documents=docs, metadatas=metas)
                times[m][key].append(time.perf_counter() - t0)
    counts = {m: cols[m].count() for m in modes}
    for c in clients.values():
        c.close()  # the supervisor compacts the journal (and the WAL) at close
    on_dir = os.path.join(root, "on")
    state = jr.replay(on_dir)
    (col,) = state.values()
    raw = sum(
        len(i.encode())
        + len((r["document"] or "").encode())
        + len(json.dumps(r["metadata"]).encode())
        + 4 * int(r["vector"].shape[0])
        for i, r in col.records.items()
    )
    out: dict[str, Any] = {"counts": counts, "raw_bytes": raw}
    out["journal_bytes"] = jr.journal_bytes(on_dir)
    out["journal_off_bytes"] = jr.journal_bytes(os.path.join(root, "off"))
    out["disk_x"] = out["journal_bytes"] / raw
    rows = {}
    for op, batch in WORKLOADS:
        key = f"{op}_{batch}"
        row = {}
        for m in modes:
            xs = times[m][key][1:]
            row[f"{m}_median_s"] = statistics.median(xs)
            row[f"{m}_p95_s"] = _p95(xs)
        row["ratio"] = row["on_median_s"] / row["off_median_s"]
        row["n"] = len(times["on"][key]) - 1
        rows[key] = row
    out["rows"] = rows
    return out


def append_alone(root: str, dim: int) -> dict[str, float]:
    """The journal's own append (encode + write + fdatasync), per record batch size."""
    j = jr.Journal(os.path.join(root, "alone"))
    rng = np.random.default_rng(1)
    out = {}
    for batch in (1, 100, 1000):
        ids = [f"x{i}" for i in range(batch)]
        vec = rng.random((batch, dim), dtype=np.float32)
        docs = [f"document {i}" for i in ids]
        metas = [{"id": i, "op": "add", "n": 1} for i in ids]
        xs = []
        for _ in range(30 if batch < 1000 else 10):
            t0 = time.perf_counter()
            j.write("upsert", "c", ids, embeddings=vec, documents=docs, metadatas=metas)
            xs.append(time.perf_counter() - t0)
        out[f"append_{batch}_median_s"] = statistics.median(xs)
        t0 = time.perf_counter()
        for _ in range(10):
            jr.encode({"op": "upsert", "ids": ids, "documents": docs, "metadatas": metas}, vec)
        out[f"encode_{batch}_median_s"] = (time.perf_counter() - t0) / 10
    j.close()
    return out


def markdown(res: dict[str, Any], alone: dict[str, float], env: str, cmd: str) -> str:
    lines = [
        "# Write journal cost (issue 21)",
        "",
        f"`{cmd}`",
        "",
        env,
        "",
        "Journal on (the default) vs off, same workload, alternating order per call; seconds per",
        "call after one warm-up call. Target: on/off at most 1.15x.",
        "",
        "| workload | calls | off median | on median | ratio | off p95 | on p95 |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, r in res["rows"].items():
        lines.append(
            f"| {key} | {r['n']} | {r['off_median_s'] * 1e3:.2f} ms | "
            f"{r['on_median_s'] * 1e3:.2f} ms | **{r['ratio']:.3f}x** | "
            f"{r['off_p95_s'] * 1e3:.2f} ms | {r['on_p95_s'] * 1e3:.2f} ms |"
        )
    lines += [
        "",
        f"Disk after compaction: journal {res['journal_bytes']:,} bytes for "
        f"{res['counts']['on']:,} live records whose raw size (ids + documents + metadata JSON + "
        f"float32 vectors) is {res['raw_bytes']:,} bytes: **{res['disk_x']:.3f}x** "
        "(target at most 1.2x). Journal off: "
        f"{res['journal_off_bytes']} bytes.",
        "",
        "The journal's own append, measured alone (encode + one write + fdatasync):",
        "",
        "| records per append | append median | of which encode |",
        "|---|---|---|",
    ]
    for batch in (1, 100, 1000):
        lines.append(
            f"| {batch} | {alone[f'append_{batch}_median_s'] * 1e3:.2f} ms | "
            f"{alone[f'encode_{batch}_median_s'] * 1e3:.2f} ms |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--reps-1000", type=int, default=8)
    ap.add_argument("--reps-100", type=int, default=30)
    ap.add_argument("--reps-1", type=int, default=100)
    ap.add_argument("--out", default=None, help="write the markdown report here")
    a = ap.parse_args()
    import chromadb

    env = (
        f"Python {platform.python_version()}, chromadb {chromadb.__version__}, "
        f"safechroma {safechroma.__version__}, {os.cpu_count()} CPUs, {platform.system()} "
        f"{platform.release()}, dim {a.dim}, load average at start "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(env)
    reps = {1000: a.reps_1000, 100: a.reps_100, 1: a.reps_1}
    with tempfile.TemporaryDirectory(prefix="safechroma-journal-", dir=os.getcwd()) as tmp:
        res = run(tmp, a.dim, reps)
        alone = append_alone(tmp, a.dim)
    cmd = "python benchmarks/bench_journal.py " + " ".join(sys.argv[1:])
    md = markdown(res, alone, env, cmd)
    print(md)
    if a.out:
        with open(a.out, "w") as f:
            f.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
