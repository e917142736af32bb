"""Handles: caller-side objects that stand for a client or a collection inside the worker.

A ``SafeClient`` or ``SafeCollection`` is a :class:`Remote`: it holds the handle its object has
in one worker, and the serial of that worker. When the worker is replaced, the session reopens
the object in the new one (:meth:`.session.Session.handle_of`) from the request the object
describes (:meth:`Remote._reopen_request`); a collection names its client as its parent, which
is reopened first. The API objects are never called back for anything else.

Handles whose caller-side object was garbage-collected are queued in :class:`Released` and sent
to their worker with the next call.
"""

from __future__ import annotations

import collections

from .protocol import Request

__all__ = ["Released", "Remote"]


class Remote:
    """A caller-side object that has a handle in the worker (a client or a collection)."""

    _handle: int = 0
    _handle_serial: int = -1  # the worker the handle lives in (-1: none yet)

    def _reopen_parent(self) -> Remote | None:
        """The object whose handle :meth:`_reopen_request` needs (a collection's client)."""
        return None

    def _reopen_request(self, path: str, parent_handle: int) -> Request:
        """The request that opens this object in a fresh worker (it carries embedding
        functions by value)."""
        raise NotImplementedError


class Released(collections.deque[tuple[int, int]]):
    """Handles released by garbage collection, waiting for their worker's next call: a deque
    of (worker serial, handle), so that "any?" is a C-level check on every call."""

    def add(self, serial: int, handle: int) -> None:
        """Called from garbage collection, in any thread: it only appends to a deque."""
        self.append((serial, handle))

    def take(self, serial: int) -> list[int]:
        """Every queued handle; those of worker ``serial`` (others died with their worker)."""
        mine: list[int] = []
        while True:
            try:
                owner, handle = self.popleft()
            except IndexError:
                return mine
            if owner == serial:
                mine.append(handle)
