"""``python -m safechroma.jobs.apply_salvage PATH SALVAGE...``: write back a repair's salvage.

A repair (:mod:`safechroma.storage.recovery`) moves a damaged index aside and saves the vectors
it could read in salvage files; Chroma rebuilds the index from SQLite and the WAL, and this job
writes the salvaged vectors back through Chroma itself. It runs in a short-lived child of the
CLI (``safechroma repair``) or of ``safechroma serve``, before anyone else opens the directory:
the supervising process never opens it with Chroma (FACTS §4: one owner per directory; a fresh
process is the clean reset after a repair).

Lines on stdout (:mod:`safechroma.jobs.runner`): ``TOTAL`` records to write, ``PROGRESS`` per
upsert, then ``RESULT`` with one :func:`~safechroma.storage.recovery.apply_salvage` summary per
file.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from safechroma._env import mark_own_process
from safechroma.jobs.runner import Counting, say

__all__ = ["main", "write_back"]


def write_back(path: str, files: Sequence[str]) -> list[dict[str, Any]]:
    """Apply every salvage file in ``files`` to the directory ``path`` through chromadb."""
    import chromadb  # in the job's own process only, by design

    from safechroma.storage import wal
    from safechroma.storage.recovery import apply_salvage

    total = 0
    for f in files:
        with open(f[: -len(".npz")] + ".json", "rb") as side:
            total += len(json.loads(side.read())["ids"])
    say("TOTAL", total)
    wal.take_over(path)  # purge off before Chroma's first read: the WAL is our second copy
    client = Counting(chromadb.PersistentClient(path))
    return [apply_salvage(client, f) for f in files]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the job on ``PATH SALVAGE...`` (see the module docstring); returns the exit code."""
    mark_own_process()  # never patched by the launcher, even if the environment says so
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print("usage: python -m safechroma.jobs.apply_salvage PATH SALVAGE...", file=sys.stderr)
        return 2
    say("RESULT", write_back(args[0], args[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
