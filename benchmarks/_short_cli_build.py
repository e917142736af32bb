"""Builds the collection that ``_short_cli.py`` searches, with plain chromadb, in its own process.

``python _short_cli_build.py DIR RECORDS DIM``: a collection ``bench`` of RECORDS random float32
vectors (seeded), ids ``id0``.., a short document each, no embedding function.
"""

from __future__ import annotations

import sys

import chromadb
import numpy as np
from chromadb.config import Settings


def main() -> None:
    path, records, dim = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    client = chromadb.PersistentClient(path, settings=Settings(anonymized_telemetry=False))
    col = client.create_collection("bench", embedding_function=None)
    rng = np.random.default_rng(0)
    for start in range(0, records, 1000):
        n = min(1000, records - start)
        col.add(
            ids=[f"id{i}" for i in range(start, start + n)],
            embeddings=rng.random((n, dim), dtype=np.float32),
            documents=[f"document {i}" for i in range(start, start + n)],
        )


if __name__ == "__main__":
    main()
