"""What a user of ``safechroma run`` sees: one stderr line per worker death and per repair.

Programs run under the launcher were not written for safechroma: they do not pass ``on_event``
and may log with something other than ``logging`` (loguru), so without this line a repair would
go unseen. stdout is never written (an MCP stdio server speaks its protocol there).
``SAFECHROMA_EVENTS=0`` (or ``safechroma run --quiet``) turns the lines off; a user's own
``SAFECHROMA_ON_EVENT`` callback is still called, after the line.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from .options import events_enabled

# The events worth a line: a death, a repair (one line: its outcome), the breaker. Starts,
# attaches, validations and the write-back after a repair stay in logging.
_SHOWN = {
    "worker_died",
    "worker_timeout",
    "protocol_error",
    "recovered",
    "recovery_failed",
    "breaker_open",
}


def line(event: Any) -> str | None:
    """The one line for ``event`` (a :class:`safechroma.Event`), or None if it gets none."""
    kind, detail = event.kind, event.detail
    where = f"{event.path}"
    if kind == "salvage_applied" and detail.get("incomplete_records"):
        return (
            f"safechroma: {detail['incomplete_records']} records of {where} had no vector "
            f"anywhere and were removed; saved in {detail.get('file')}.removed.json "
            "(safechroma reembed puts them back)"
        )
    if kind not in _SHOWN:
        return None
    if kind == "worker_died":
        how = detail.get("signal") or f"exit {detail.get('exitcode')}"
        return (
            f"safechroma: the Chroma worker (pid {event.pid}) for {where} died ({how}) during "
            f"{detail.get('operation')}; your program keeps running, a new worker takes over"
        )
    if kind == "worker_timeout":
        return (
            f"safechroma: {detail.get('operation')} on {where} passed its "
            f"{detail.get('timeout')} s deadline; the worker (pid {event.pid}) was stopped"
        )
    if kind == "protocol_error":
        return f"safechroma: the worker for {where} sent a bad reply ({detail.get('why')})"
    if kind == "recovered":
        lost = detail.get("incomplete_records") or 0
        if lost:
            return (
                f"safechroma: repaired {where} WITH LOSSES: {lost} records incomplete, listed "
                f"in {detail.get('losses_file')}"
            )
        return f"safechroma: repaired {where}: {_summary(detail.get('report'))}"
    if kind == "recovery_failed":
        why = detail.get("error") or _summary(detail.get("report"))
        return f"safechroma: could NOT repair {where}: {why}"
    if kind == "breaker_open":
        return (
            f"safechroma: workers for {where} keep dying ({detail.get('why')}); calls fail fast "
            "for a while"
        )
    return None  # pragma: no cover - every shown kind is handled above


def _summary(report: Any) -> str:
    if report is None:
        return "done"
    for attr in ("summary", "message"):
        value = getattr(report, attr, None)
        if isinstance(value, str) and value:
            return value
    return type(report).__name__


def printer(stream: Any = None) -> Callable[[Any], None]:
    """An ``on_event`` callback that writes :func:`line` to stderr (flushed at once)."""

    def on_event(event: Any) -> None:
        text = line(event)
        if text is not None:
            out = sys.stderr if stream is None else stream
            try:
                out.write(text + "\n")
                out.flush()
            except (OSError, ValueError):  # stderr closed: nothing to tell
                pass

    return on_event


def chain(*callbacks: Callable[[Any], None] | None) -> Callable[[Any], None] | None:
    """One callback that calls each given one in order (None when none is given)."""
    present = [c for c in callbacks if c is not None]
    if not present:
        return None
    if len(present) == 1:
        return present[0]

    def on_event(event: Any) -> None:
        for callback in present:
            callback(event)

    return on_event


def with_stderr_events(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with the stderr line added in front of any ``on_event`` (unless disabled).

    The ``safechroma`` logger then keeps to errors: the program may log warnings to stderr
    (or Python's last-resort handler does), and a death must be one line, not two.
    """
    if events_enabled(os.environ):
        options = {**options, "on_event": chain(printer(), options.get("on_event"))}
        logging.getLogger("safechroma").setLevel(logging.ERROR)
    return options
