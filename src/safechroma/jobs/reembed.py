"""``safechroma.reembed``: put back, through a worker, the records a repair could not restore."""

from __future__ import annotations

import os
from typing import Any

from ..api.client import SafeClient
from ..storage.recovery import EmbedFn, restore_saved_records

__all__ = ["reembed"]


def reembed(
    path: str | os.PathLike[str],
    collection: str,
    embedding_function: str | EmbedFn | None = None,
) -> dict[str, Any]:
    """Put back, through a SafeClient worker, the records a repair could not restore.

    ``safechroma reembed PATH --collection NAME --embedding-function module:fn`` does the same
    from the command line. See :func:`safechroma.storage.recovery.restore_saved_records` for
    which function is used and what is returned.
    """
    root = os.path.abspath(os.fspath(path))
    with SafeClient(root) as client:
        result: dict[str, Any] = client.run_in_worker(
            restore_saved_records, root, collection, embedding_function
        )
    return result
