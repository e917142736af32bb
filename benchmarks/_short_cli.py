"""A short command-line search, as a tool built on chromadb would run it (bench_short_command.py).

``python _short_cli.py DIR``: opens ``chromadb.PersistentClient(DIR)``, one ``query`` (one
vector, k=10) and one ``get`` of 10 ids on the collection ``bench``, prints what it found, and
exits without closing the client, as most such tools do. On stderr, one JSON line with the
time of each step in this process (the whole-process time is measured by the benchmark).
"""

from __future__ import annotations

import json
import sys
import time

t0 = time.perf_counter()
import chromadb  # noqa: E402
import numpy as np  # noqa: E402
from chromadb.config import Settings  # noqa: E402

t1 = time.perf_counter()
client = chromadb.PersistentClient(sys.argv[1], settings=Settings(anonymized_telemetry=False))
col = client.get_collection("bench", embedding_function=None)
t2 = time.perf_counter()
vector = np.random.default_rng(7).random(384, dtype=np.float32)
found = col.query(query_embeddings=[vector], n_results=10, include=["distances", "documents"])
t3 = time.perf_counter()
got = col.get(ids=[f"id{i}" for i in range(0, 5000, 500)], include=["documents"])
t4 = time.perf_counter()
print("query:", " ".join(found["ids"][0]))
print("get:", " ".join(got["ids"]), len(got["documents"] or []))
print(
    json.dumps(
        {
            "client": type(client).__name__,
            "import_ms": (t1 - t0) * 1e3,
            "open_ms": (t2 - t1) * 1e3,
            "query_ms": (t3 - t2) * 1e3,
            "get_ms": (t4 - t3) * 1e3,
        }
    ),
    file=sys.stderr,
)
