"""Time the HNSW segment check on 10k and 1M elements (issue 4: milliseconds for 10k, well
under a second per million with the deep checks).

The indexes are written synthetically with numpy in the exact hnswlib layout of FACTS §1
(valid header, random in-range level-0 links never to the element itself, a geometric level
distribution with upper-level lists, unique labels, a matching pickle): building 1M elements
through Chroma would take far longer than the check itself.
Run: ``.venv/bin/python benchmarks/bench_validate.py``.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import struct
import sys
import tempfile
import time

import numpy as np

from safechroma.storage.hnsw import HEADER_FORMAT, check_segment

M = 16


def write_index(d: str, n: int, dim: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    max_m0 = 2 * M
    off = max_m0 * 4 + 4
    lab = off + 4 * dim
    sdpe = lab + 8
    levels = np.minimum((-np.log(rng.random(n)) / math.log(M)).astype(np.int64), 6)
    ep = int(np.argmax(levels))
    hdr = struct.pack(
        HEADER_FORMAT,
        1,
        0,
        n,
        n,
        sdpe,
        lab,
        off,
        int(levels.max()),
        ep,
        M,
        max_m0,
        M,
        1 / math.log(M),
        100,
    )
    with open(os.path.join(d, "header.bin"), "wb") as f:
        f.write(hdr)
    with open(os.path.join(d, "data_level0.bin"), "wb") as f:
        for s in range(0, n, 65536):
            k = min(65536, n - s)
            buf = np.zeros((k, sdpe), np.uint8)
            buf[:, 0:2] = np.full((k, 1), max_m0, "<u2").view(np.uint8)
            nbr = rng.integers(0, n, (k, max_m0), dtype="<u4")
            own = np.arange(s, s + k, dtype="<u4")[:, None]
            nbr = np.where(nbr == own, (own + 1) % n, nbr).astype("<u4")  # hnswlib never self-links
            buf[:, 4:off] = nbr.view(np.uint8)
            buf[:, off:lab] = rng.random((k, dim), dtype=np.float32).view(np.uint8)
            buf[:, lab:sdpe] = np.arange(s + 1, s + k + 1, dtype="<u8")[:, None].view(np.uint8)
            f.write(buf.tobytes())
    np.ones(n, "<f4").tofile(os.path.join(d, "length.bin"))
    slpe = M * 4 + 4
    parts = []
    for lv in levels:
        if lv == 0:
            parts.append(b"\0\0\0\0")
        else:
            blk = np.zeros((lv, M + 1), "<u4")
            blk[:, 0] = M
            blk[:, 1:] = rng.integers(0, n, (lv, M))
            parts.append(struct.pack("<I", lv * slpe) + blk.tobytes())
    with open(os.path.join(d, "link_lists.bin"), "wb") as f:
        f.write(b"".join(parts))
    # Chroma's key order is its Rust HashMap's: arbitrary.
    order = rng.permutation(n)
    with open(os.path.join(d, "index_metadata.pickle"), "wb") as f:
        f.write(chroma_pickle(n, [f"id{i}" for i in order], (order + 1).tolist()))


def chroma_pickle(n: int, ids: list[str], labels: list[int]) -> bytes:
    """index_metadata.pickle byte for byte as chromadb 1.5.9 writes it: protocol 3, no memo
    (each id string is stored twice), BININT labels, SETITEMS batches of 1000 and a trailing
    empty batch, an empty id_to_seq_id (checked against a real 3000-record directory)."""

    def s(x: str) -> bytes:
        b = x.encode()
        return b"X" + struct.pack("<I", len(b)) + b

    def i(v: int) -> bytes:
        return b"J" + struct.pack("<i", v)

    def items(pairs: list[bytes]) -> bytes:
        out = [b"}("]
        for k in range(0, len(pairs), 1000):
            out.append(b"".join(pairs[k : k + 1000]) + b"u(")
        return b"".join(out) + b"u"

    i2l = items([s(x) + i(v) for x, v in zip(ids, labels, strict=False)])
    l2i = items([i(v) + s(x) for x, v in zip(ids, labels, strict=False)])
    return (
        b"\x80\x03}("
        + s("dimensionality")
        + b"N"
        + s("total_elements_added")
        + i(n)
        + s("max_seq_id")
        + b"N"
        + s("id_to_label")
        + i2l
        + s("label_to_id")
        + l2i
        + s("id_to_seq_id")
        + b"}u."
    )


def bench(n: int, dim: int, repeats: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(dir=os.path.join(os.path.dirname(__file__), "results")) as d:
        write_index(d, n, dim)
        size = sum(os.path.getsize(os.path.join(d, x)) for x in os.listdir(d))
        rep = check_segment(d)
        assert rep.healthy and not rep.findings, rep.to_dict()
        out = {}
        for deep in (False, True):
            check_segment(d, deep=deep)  # warm-up (page cache, imports)
            ts = []
            cpu = []
            for _ in range(repeats):
                c = time.process_time()
                t = time.perf_counter()
                check_segment(d, deep=deep)
                ts.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
            ts.sort()
            key = "deep" if deep else "shallow"
            out[f"{key}_median_ms"] = statistics.median(ts) * 1e3
            out[f"{key}_p95_ms"] = ts[min(len(ts) - 1, int(0.95 * len(ts)))] * 1e3
            # CPU time of this process: on a shared 2-core VM wall time also counts the
            # time other processes held the CPU.
            out[f"{key}_cpu_median_ms"] = statistics.median(cpu) * 1e3
        out["size_mb"] = size / 1e6
        return out


def main() -> None:
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    env = (
        f"Python {platform.python_version()}, numpy {np.__version__}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, {platform.platform()}"
    )
    rows = []
    for n, dim, reps in ((10_000, 384, 30), (1_000_000, 128, 9), (1_000_000, 384, 5)):
        r = bench(n, dim, reps)
        rows.append((n, dim, reps, r))
        print(
            f"n={n:>9,} dim={dim:>3} files={r['size_mb']:8.1f} MB  shallow median "
            f"{r['shallow_median_ms']:.2f} ms p95 {r['shallow_p95_ms']:.2f} ms  "
            f"deep median {r['deep_median_ms']:.1f} ms p95 {r['deep_p95_ms']:.1f} ms cpu "
            f"{r['deep_cpu_median_ms']:.1f} ms",
            flush=True,
        )
    load = os.getloadavg()
    lines = [
        "# check_segment timings",
        "",
        env,
        "",
        f"Command: `{sys.executable} benchmarks/bench_validate.py` (synthetic hnswlib files, "
        "page cache warm, 1 warm-up run; the pickle is laid out byte for byte as chromadb 1.5.9 "
        "writes it).",
        "",
        f"Load average at the end of the run: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (wall "
        "times include time "
        "other processes held the CPU; the CPU column is this process's CPU time).",
        "",
        "| elements | dim | files MB | runs | shallow median ms | shallow p95 ms | deep median "
        "ms | deep p95 ms | deep CPU median ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, dim, reps, r in rows:
        lines.append(
            f"| {n:,} | {dim} | {r['size_mb']:.1f} | {reps} | {r['shallow_median_ms']:.2f} | "
            f"{r['shallow_p95_ms']:.2f} "
            f"| {r['deep_median_ms']:.1f} | {r['deep_p95_ms']:.1f} | "
            f"{r['deep_cpu_median_ms']:.1f} |"
        )
    with open(os.path.join(os.path.dirname(__file__), "results", "validate.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
