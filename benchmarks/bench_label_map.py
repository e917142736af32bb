"""Time and memory of the repair's label-map rebuild and salvage at 100k and 1M records.

    python benchmarks/bench_label_map.py            # 100k and 1M, dim 128

The index is written synthetically in the exact hnswlib layout (``bench_validate.write_index``),
its pickle removed (the battery's "pickle deleted"), and ``chroma.sqlite3`` holds the metadata
segment's ``embeddings`` rows and an empty WAL tail, as after a clean close. Each size runs in a
fresh child process so that its peak RSS is its own. Measured: reading the live elements,
``rebuild_label_map`` (pairing and proof), and ``salvage_vectors`` with the rebuilt map, which
together are the repair's work before Chroma is opened again; the map is checked to be exact.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def _child(n: int, dim: int) -> dict[str, float]:
    from bench_validate import write_index

    from safechroma.storage.hnsw import read_live_elements, salvage_vectors
    from safechroma.storage.recovery import rebuild_label_map
    from safechroma.storage.validate import CollectionReport

    with tempfile.TemporaryDirectory() as root:
        seg_id = "00000000-0000-4000-8000-000000000001"
        seg = os.path.join(root, seg_id)
        os.makedirs(seg)
        write_index(seg, n, dim)
        os.remove(os.path.join(seg, "index_metadata.pickle"))
        db = os.path.join(root, "chroma.sqlite3")
        con = sqlite3.connect(db)
        con.executescript(
            "CREATE TABLE embeddings (id INTEGER PRIMARY KEY, segment_id TEXT, embedding_id TEXT,"
            " seq_id BLOB); CREATE TABLE embeddings_queue (seq_id INTEGER PRIMARY KEY, "
            "operation INTEGER, topic TEXT, id TEXT, vector BLOB, encoding TEXT, metadata TEXT);"
        )
        con.executemany(
            "INSERT INTO embeddings VALUES (?, 'meta', ?, ?)",
            ((k + 1, f"id{k}", k + 1) for k in range(n)),
        )
        con.commit()
        c = CollectionReport(
            id="c0",
            name="bench",
            space="l2",
            dimension=dim,
            segment_id=seg_id,
            segment_path=seg,
            metadata_segment_id="meta",
            index_max_seq_id=n,
        )
        ro = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        t0 = time.perf_counter()
        el = read_live_elements(seg, space="l2", dim=dim)
        t1 = time.perf_counter()
        assert el is not None
        rb = rebuild_label_map(root, ro, c, el)
        t2 = time.perf_counter()
        s = salvage_vectors(seg, space="l2", dim=dim, label_to_id=rb.label_to_id)
        t3 = time.perf_counter()
        assert rb.proven and len(s.ids) == n
        assert all(rb.label_to_id[lab] == f"id{lab - 1}" for lab in (1, n // 2, n))
        ro.close()
        con.close()
    return {
        "read_s": t1 - t0,
        "rebuild_s": t2 - t1,
        "salvage_s": t3 - t2,
        "total_s": t3 - t0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "vectors_mb": n * dim * 4 / 1e6,
    }


def main() -> int:
    if sys.argv[1:2] == ["child"]:
        print("RESULT " + json.dumps(_child(int(sys.argv[2]), int(sys.argv[3]))))
        return 0
    import safechroma

    print(
        f"Python {platform.python_version()}, numpy {np.__version__}, safechroma "
        f"{safechroma.__version__}, {os.cpu_count()} CPUs, {platform.platform()}"
    )
    print("| records | dim | read s | rebuild s | salvage s | total s | peak RSS MB | vectors MB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, dim in ((100_000, 128), (1_000_000, 128)):
        p = subprocess.run(
            [sys.executable, __file__, "child", str(n), str(dim)],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
        print(
            f"| {n:,} | {dim} | {r['read_s']:.2f} | {r['rebuild_s']:.2f} | {r['salvage_s']:.2f} "
            f"| {r['total_s']:.2f} | {r['peak_rss_mb']:.0f} | {r['vectors_mb']:.0f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
