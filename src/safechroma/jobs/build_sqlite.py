"""``python -m safechroma.jobs.build_sqlite MANIFEST NEW_DIR``: the rebuild step of the
``chroma.sqlite3`` salvage (:mod:`safechroma.storage.sqlite_salvage`), run as a child process.

It creates every salvaged collection in the new directory through chromadb itself and adds the
records the manifest lists, in batches Chroma accepts. It runs in a child, never in the process
that repairs (FACTS §4: one process owns a directory), and is started with the private
environment so the launcher never patches its chromadb. The storage floor starts it by module
name and never imports it (storage/ imports nothing above it, issue 22).

Protocol: ``MANIFEST`` is the JSON file the salvage wrote (``collections``: name, metadata,
configuration, ids, documents, metadatas and the ``.npy`` file of their vectors). On success
the last line on stdout is ``RESULT <json>``, ``{name: {"id": ..., "count": ...}}``, and the
process exits 0 at once (``os._exit``: nothing of chromadb's teardown can hang or fail after
the result is out).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from safechroma._env import mark_own_process

__all__ = ["build", "main"]


def build(manifest: dict[str, Any], new_dir: str) -> dict[str, Any]:
    """Create the manifest's collections in ``new_dir`` through chromadb.

    Returns:
        ``{name: {"id": <new collection id>, "count": <records in it>}}``.
    """
    import chromadb  # the only import of chromadb on this path: in the child, by design

    client = chromadb.PersistentClient(new_dir)
    out: dict[str, Any] = {}
    for c in manifest["collections"]:
        col = client.create_collection(
            c["name"],
            metadata=c["metadata"],
            configuration=c["configuration"],
            embedding_function=None,
        )
        col.count()
        vecs = np.load(c["vectors"]) if c["ids"] else None
        # Chroma's add takes documents and metadatas for all records of a batch or for none.
        groups: dict[tuple[bool, bool], list[int]] = {}
        for k, (_, d, m) in enumerate(zip(c["ids"], c["documents"], c["metadatas"], strict=False)):
            groups.setdefault((d is None, m is None), []).append(k)
        batch = max(1, min(1000, client.get_max_batch_size()))
        for (no_doc, no_meta), ks in groups.items():
            for s in range(0, len(ks), batch):
                part = ks[s : s + batch]
                assert vecs is not None  # a group exists only when there are records
                col.add(
                    ids=[c["ids"][k] for k in part],
                    embeddings=vecs[part],
                    documents=None if no_doc else [c["documents"][k] for k in part],
                    metadatas=None if no_meta else [c["metadatas"][k] for k in part],
                )
        out[c["name"]] = {"id": str(col.id), "count": col.count()}
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """Run :func:`build` on ``MANIFEST NEW_DIR`` and print its result (see the module doc)."""
    mark_own_process()  # never patched by the launcher, even if the environment says so
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        sys.exit("usage: python -m safechroma.jobs.build_sqlite MANIFEST NEW_DIR")
    with open(args[0]) as f:
        manifest = json.load(f)
    out = build(manifest, args[1])
    print("RESULT " + json.dumps(out), flush=True)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
