"""Frames on a socket: sending one without copying its buffers, reading one within a bound.

What it owns: the bytes of a frame on a stream socket (the layout is :mod:`.protocol`'s) and the
three ways an exchange with a peer fails (:class:`PeerDied`, :class:`PeerTimedOut`,
:class:`PeerMisbehaved`). Both ends use it: the caller's channels (:mod:`.transport`) and the
worker's channel threads (:mod:`.worker`). It knows nothing of processes.
"""

from __future__ import annotations

import mmap
import socket
import sys
from collections.abc import Callable
from typing import Any, Final

from . import platform
from .protocol import HEADER, MAGIC, MAX_BUFFERS, frame_header

_IOV_MAX: Final = 1024
_LAZY_ABOVE: Final = 64 << 20
_SCRATCH: Final = 1 << 16


class PeerDied(Exception):
    """The worker closed the socket or exited."""


class PeerTimedOut(Exception):
    """The deadline passed before the worker answered."""


class PeerMisbehaved(Exception):
    """The worker sent bytes that are not a valid frame."""


def send_frame(
    sock: socket.socket,
    data: bytes,
    buffers: list[memoryview],
    wait: Callable[[], None] | None = None,
) -> None:
    """Send one frame; large buffers go to the kernel without being copied first.

    ``wait``: for a non-blocking socket, called when the kernel takes no more bytes for now; it
    returns when the socket is writable again (or raises).
    """
    if sys.platform == "win32":  # no Unix sockets: SafeClient refuses to start there
        raise platform.unsupported()
    parts: list[Any] = [frame_header(data, buffers), data]
    if buffers:
        parts.extend(b for b in buffers if b.nbytes)
    i, count = 0, len(parts)
    while i < count:
        try:
            sent = sock.sendmsg(parts[i : i + _IOV_MAX])
        except BlockingIOError:
            if wait is None:
                raise
            wait()
            continue
        while sent:  # skip what went out; the parts are bytes or 1-D byte views: len == size
            size = len(parts[i])
            if sent >= size:
                sent -= size
                i += 1
            else:
                parts[i] = memoryview(parts[i])[sent:]
                sent = 0


class FrameReader:
    """Reads frames from a socket: one ``recv`` for a small frame, direct reads for big buffers.

    Args:
        sock: the socket: blocking, or non-blocking with ``wait``.
        max_bytes: frames announcing more than this are refused before any allocation.
        wait: for a non-blocking socket, called when no bytes are there yet; returns when the
            socket is readable (or raises).
    """

    def __init__(
        self, sock: socket.socket, max_bytes: int, wait: Callable[[], None] | None = None
    ) -> None:
        self._sock = sock
        self._max = max_bytes
        self._wait = wait
        self._buf = bytearray(_SCRATCH)
        self._view = memoryview(self._buf)
        self._pos = 0
        self._end = 0

    @property
    def buffered(self) -> int:
        """Bytes received but not yet consumed."""
        return self._end - self._pos

    def read_frame(self) -> tuple[Any, list[Any]]:
        """Read one frame and return its pickle stream and its out-of-band buffers."""
        if self._pos == self._end:  # nothing buffered: the usual start of a frame
            self._pos = self._end = 0
            self._end = self._recv_into(self._view)
        # The common case, a small frame with no buffers that one read brought in whole.
        pos, end = self._pos, self._end
        if end - pos >= HEADER.size:
            magic, n, plen = HEADER.unpack_from(self._view, pos)
            start = pos + HEADER.size
            if not n and magic == MAGIC and end - start >= plen and plen <= self._max:
                self._pos = start + plen
                return self._view[start : start + plen].tobytes(), []
        magic, n, plen = HEADER.unpack(self._read(HEADER.size))
        if magic != MAGIC or n > MAX_BUFFERS:
            raise PeerMisbehaved(f"bad frame header (magic={magic!r}, buffers={n})")
        lengths = list(memoryview(self._read(8 * n)).cast("Q")) if n else []
        if plen + sum(lengths) > self._max:
            raise PeerMisbehaved(
                f"frame of {plen + sum(lengths)} bytes exceeds the limit of {self._max}"
            )
        data = self._read(plen)
        return data, [self._read(size) for size in lengths]

    def _read(self, n: int) -> Any:
        out = _allocate(n)
        target = memoryview(out)
        have = min(self._end - self._pos, n)
        if have:
            target[:have] = self._view[self._pos : self._pos + have]
            self._pos += have
        while have < n:
            if n - have >= _SCRATCH:
                have += self._recv_into(target[have:])
                continue
            self._pos = 0
            self._end = 0
            self._end = self._recv_into(self._view)
            take = min(self._end, n - have)
            target[have : have + take] = self._view[:take]
            self._pos = take
            have += take
        return out

    def _recv_into(self, view: memoryview) -> int:
        while True:
            try:
                got = self._sock.recv_into(view)
            except BlockingIOError:
                if self._wait is None:
                    raise
                self._wait()
                continue
            if not got:
                raise PeerDied("socket closed")
            return got


def _allocate(n: int) -> Any:
    """A writable buffer of ``n`` bytes; above 64 MiB one that costs memory only as data arrives.

    ``bytearray(n)`` zero-fills, so every page is resident at once: a 24-byte header announcing
    a gigabyte would make the caller commit it before a byte of it arrived. An anonymous mapping
    is backed lazily, page by page, as ``recv_into`` writes it, but its page faults make it
    several times slower to fill (measured: 15 MiB frames at ~1 GB/s into a fresh mapping,
    ~3.5 GB/s into a fresh bytearray), so only frames too big to commit blindly use it.
    """
    if n <= _LAZY_ABOVE:
        return bytearray(n)
    return mmap.mmap(-1, n)
