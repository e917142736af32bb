"""The write-back of salvaged records, on a new worker before any caller uses it.

A repair (the recovery hook, or ``safechroma repair`` interrupted between quarantine and
write-back) leaves the records it saved in salvage files; the supervisor's next worker applies
them through Chroma (:func:`safechroma.storage.recovery.apply_salvage`, run in the worker) and
records what could not come back whole as losses (issue 21), which :func:`losses` reports in
``stats()`` until they are acknowledged.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from .generation import Lease
from .protocol import run_request

if TYPE_CHECKING:
    from .supervisor import Supervisor

__all__ = ["losses", "write_back"]


def write_back(sup: Supervisor, lease: Lease) -> None:
    """Write back through Chroma, in a new worker before any caller uses it, the records a
    repair saved (``sup.pending_salvage``); each file is dropped once it is applied."""
    reembed = sup.options.reembed
    while sup.pending_salvage:
        path = sup.pending_salvage[0]
        fn: Any = "safechroma.storage.recovery:apply_salvage"
        if reembed is not None:
            # Records whose vector exists nowhere are re-embedded from their documents by
            # the caller's embedding function, inside the worker.
            from ..storage.recovery import apply_salvage

            fn = functools.partial(apply_salvage, reembed=reembed)
        summary = sup.exchange(
            lease,
            run_request(sup.primary_handle, fn, (path,)),
            "apply_salvage",
            None,
            reembed is not None,
        )
        sup.pending_salvage.pop(0)
        removed = summary.get("removed") if isinstance(summary, dict) else None
        if removed:
            # Records whose vector exists nowhere were removed (saved beside the backup):
            # losses, as `safechroma repair` reports them.
            from ..storage.recovery import record_losses

            record_losses(sup.path, f"{path}.removed.json", len(removed))
        sup._emit(
            "salvage_applied",
            lease.gen.process.pid,
            file=path,
            summary=summary,
            incomplete_records=len(removed or ()),
        )


def losses(path: str) -> dict[str, Any]:
    """Stats' view of the directory's unacknowledged repair losses (issue 21)."""
    from ..storage.recovery import unacknowledged_losses

    marker = unacknowledged_losses(path)
    if marker is None:
        return {"incomplete_records": 0, "losses_files": []}
    count = marker.get("count")
    return {
        "incomplete_records": int(count) if isinstance(count, int) else -1,
        "losses_files": [str(f) for f in marker.get("files") or []],
    }
