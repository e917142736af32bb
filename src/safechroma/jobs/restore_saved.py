"""``python -m safechroma.jobs.restore_saved PATH COLLECTION [MODULE:FN]``: re-embed saved records.

A repair that found no vector anywhere for some records saved their documents and metadata
and removed them (:mod:`safechroma.storage.recovery`). This job embeds the documents again and
puts the records back through Chroma itself (``safechroma reembed``), in a child of the CLI,
which holds the directory lock meanwhile. An empty or missing ``MODULE:FN`` means the
collection's own recorded embedding function.

Lines on stdout (:mod:`safechroma.jobs.runner`): ``PROGRESS`` per write, then ``RESULT`` with
what :func:`~safechroma.storage.recovery.restore_saved_records` returns.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from safechroma._env import mark_own_process
from safechroma.jobs.runner import Counting, say

__all__ = ["main", "restore"]


def restore(path: str, collection: str, embedding_function: str | None) -> dict[str, Any]:
    """Put back the saved records of ``collection`` in ``path``, through chromadb."""
    import chromadb  # in the job's own process only, by design

    from safechroma.storage import wal
    from safechroma.storage.recovery import restore_saved_records

    wal.take_over(path)  # purge off before Chroma's first read: the WAL is our second copy
    client = Counting(chromadb.PersistentClient(path))
    out: dict[str, Any] = restore_saved_records(client, path, collection, embedding_function)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the job (see the module docstring); returns the exit code."""
    mark_own_process()  # never patched by the launcher, even if the environment says so
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) not in (2, 3):
        print(
            "usage: python -m safechroma.jobs.restore_saved PATH COLLECTION [MODULE:FN]",
            file=sys.stderr,
        )
        return 2
    say("RESULT", restore(args[0], args[1], (args[2:] or [""])[0] or None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
