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
        # Idle channels: list.pop() and list.append() are atomic, so the common case (an idle
        # channel there, or nobody waiting for one) takes no lock. The lock guards opening
        # channels, closing the pool and waiting when all ``limit`` channels are busy.
        self._idle: list[Channel] = []
        self._open = 0
        self._waiting = 0
        self._cond = threading.Condition(threading.Lock())
        self._closed = False

    def checkout(self) -> Channel:
        """An idle channel, a new one, or (all ``limit`` busy) the next one checked in.

        Raises:
            PeerDied: the pool is closed or the worker is gone.
        """
        if not self._closed:
            try:
                return self._idle.pop()
            except IndexError:
                pass
        with self._cond:
            # Counted before looking at the idle list: checkin() appends, then reads this, so
            # a channel checked in meanwhile is either seen here or followed by a notify.
            self._waiting += 1
            try:
                while True:
                    if self._closed:
                        raise PeerDied("the worker's channels are closed")
                    if self._idle:
                        return self._idle.pop()
                    if self._open < self._limit:
                        self._open += 1
                        break
                    self._cond.wait()
            finally:
                self._waiting -= 1
        try:
            return self.worker.open_channel()
        except BaseException:
            with self._cond:
                self._open -= 1
                self._cond.notify()
            raise

    def checkin(self, channel: Channel) -> None:
        """Give back a channel whose last exchange completed cleanly."""
        if not self._closed:
            self._idle.append(channel)
            if not self._waiting and not self._closed:
                return
            with self._cond:
                if not self._closed:
                    self._cond.notify()
                    return
                # close() ran meanwhile: it may not have seen this channel.
                try:
                    self._idle.remove(channel)
                except ValueError:
                    return  # close() closed it and counted it
        with self._cond:
            channel.close()
            self._open -= 1
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
