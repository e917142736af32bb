"""The pool of channels to one worker: callers check a channel out for a call, then back in.

Owns the channels of one worker and nothing else (the shape of httpcore's ``ConnectionPool``):
it opens a channel when every open one is busy, up to :data:`MAX_CHANNELS`, hands idle ones out
most-recently-used first (their threads in the worker are warm), and closes them all with the
worker. A channel that failed in any way is discarded by its caller, never checked back in.

A channel is nothing but a stream socket that a worker thread serves, one exchange at a time:
the worker does not care where it came from. Today every channel is a socket pair handed over
the control socket; a connection accepted on a rendezvous socket from another process would be
served the same way (``_Worker.start_channel``), with its own pool on that process's side.
"""

from __future__ import annotations

import threading
from typing import Final

from .transport import Channel, PeerDied, WorkerProcess

# Calls that run in the worker at the same time, per directory. Chroma's Rust core scales with
# cores; beyond a few calls per core more threads only queue inside Chroma. A channel costs a
# socket pair and an idle thread in the worker.
MAX_CHANNELS: Final = 32


class ChannelPool:
    """The channels to ``worker``; thread-safe."""

    def __init__(self, worker: WorkerProcess, limit: int = MAX_CHANNELS) -> None:
        self.worker = worker
        self._limit = limit
        self._idle: list[Channel] = []
        self._open = 0
        self._cond = threading.Condition(threading.Lock())
        self._closed = False

    def checkout(self) -> Channel:
        """An idle channel, a new one, or (all ``limit`` busy) the next one checked in.

        Raises:
            PeerDied: the pool is closed or the worker is gone.
        """
        with self._cond:
            while True:
                if self._closed:
                    raise PeerDied("the worker's channels are closed")
                if self._idle:
                    return self._idle.pop()
                if self._open < self._limit:
                    self._open += 1
                    break
                self._cond.wait()
        try:
            return self.worker.open_channel()
        except BaseException:
            with self._cond:
                self._open -= 1
                self._cond.notify()
            raise

    def checkin(self, channel: Channel) -> None:
        """Give back a channel whose last exchange completed cleanly."""
        with self._cond:
            if self._closed:
                channel.close()
                self._open -= 1
            else:
                self._idle.append(channel)
            self._cond.notify()

    def discard(self, channel: Channel) -> None:
        """Close a channel that failed; it is never reused."""
        channel.close()
        with self._cond:
            self._open -= 1
            self._cond.notify()

    def close(self) -> None:
        """Close every idle channel; busy ones are closed when they come back."""
        with self._cond:
            self._closed = True
            for channel in self._idle:
                channel.close()
            self._open -= len(self._idle)
            self._idle.clear()
            self._cond.notify_all()
