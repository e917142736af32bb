"""Frames on a real socket pair (runtime/framing.py): how they are cut, joined and bounded.

Every test sends bytes through a real ``socket.socketpair`` and reads them with
:class:`FrameReader`: split across many writes, several in one read, a header announcing more
than the limit, a peer that closes mid-frame, and a non-blocking socket that has only part of a
frame yet.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from safechroma.runtime.framing import (
    FrameReader,
    PeerDied,
    PeerMisbehaved,
    send_frame,
)
from safechroma.runtime.protocol import HEADER, MAGIC, decode_reply, encode, frame_header

LIMIT = 1 << 20


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def _wire(obj: object) -> bytes:
    """The exact bytes ``send_frame`` puts on the wire for ``obj``."""
    data, buffers = encode(obj)
    return frame_header(data, buffers) + data + b"".join(bytes(b) for b in buffers)


def _decoded(frame: tuple[object, list[object]]) -> object:
    data, buffers = frame
    return decode_reply(data, buffers)  # type: ignore[arg-type]


def test_a_frame_with_buffers_round_trips(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    array = np.arange(100_000, dtype=np.float32)  # 400 kB: bigger than one socket buffer
    data, buffers = encode((0, array, 1.0))
    sender = threading.Thread(target=send_frame, args=(a, data, buffers))
    sender.start()
    reader = FrameReader(b, LIMIT)
    got = _decoded(reader.read_frame())
    sender.join()
    assert isinstance(got, tuple) and got[0] == 0 and got[2] == 1.0
    np.testing.assert_array_equal(got[1], array)
    assert reader.buffered == 0


def test_a_frame_split_across_many_writes(pair: tuple[socket.socket, socket.socket]) -> None:
    """Every byte sent on its own: the header, the lengths and the pickle are each reassembled."""
    a, b = pair
    wire = _wire({"ids": ["x", "y"], "v": np.ones(8, dtype=np.float64)})
    result: list[object] = []
    reader = FrameReader(b, LIMIT)
    t = threading.Thread(target=lambda: result.append(_decoded(reader.read_frame())))
    t.start()
    for i in range(len(wire)):
        a.sendall(wire[i : i + 1])
    t.join(10)
    assert not t.is_alive()
    (got,) = result
    assert isinstance(got, dict) and got["ids"] == ["x", "y"]
    np.testing.assert_array_equal(got["v"], np.ones(8))


def test_several_frames_in_one_read(pair: tuple[socket.socket, socket.socket]) -> None:
    """Three frames written at once: each read_frame returns the next, from what is buffered."""
    a, b = pair
    a.sendall(_wire("one") + _wire(("two", 2)) + _wire(np.arange(3, dtype=np.int64)))
    reader = FrameReader(b, LIMIT)
    assert _decoded(reader.read_frame()) == "one"
    assert reader.buffered > 0  # the other two came in the same recv
    assert _decoded(reader.read_frame()) == ("two", 2)
    np.testing.assert_array_equal(_decoded(reader.read_frame()), [0, 1, 2])
    assert reader.buffered == 0


def test_a_length_over_the_limit_is_refused_before_allocating(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """A 24-byte header announcing a petabyte is refused at once: the reader neither allocates
    it nor waits for bytes that will never come."""
    a, b = pair
    a.sendall(HEADER.pack(MAGIC, 0, 1 << 50))
    with pytest.raises(PeerMisbehaved, match=f"exceeds the limit of {LIMIT}"):
        FrameReader(b, LIMIT).read_frame()


def test_buffer_lengths_over_the_limit_are_refused(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    a.sendall(HEADER.pack(MAGIC, 2, 10) + struct.pack("<2Q", LIMIT, 1 << 40))
    with pytest.raises(PeerMisbehaved, match="exceeds the limit"):
        FrameReader(b, LIMIT).read_frame()


@pytest.mark.parametrize(
    "head",
    [HEADER.pack(b"XXXX", 0, 4), HEADER.pack(MAGIC, 70_000, 4)],
    ids=["bad-magic", "too-many-buffers"],
)
def test_a_bad_header_is_refused(pair: tuple[socket.socket, socket.socket], head: bytes) -> None:
    a, b = pair
    a.sendall(head + b"abcd")
    with pytest.raises(PeerMisbehaved, match="bad frame header"):
        FrameReader(b, LIMIT).read_frame()


@pytest.mark.parametrize("cut", [0, 5, HEADER.size, HEADER.size + 8, -3])
def test_eof_mid_frame_is_the_peer_died(
    pair: tuple[socket.socket, socket.socket], cut: int
) -> None:
    """The peer closes after ``cut`` bytes of a frame (none, in the header, after the header,
    in the buffer lengths ... a few bytes short of the end): PeerDied, never a short frame."""
    a, b = pair
    wire = _wire(np.arange(16, dtype=np.int64))
    a.sendall(wire[:cut])
    a.close()
    with pytest.raises(PeerDied, match="socket closed"):
        FrameReader(b, LIMIT).read_frame()


def test_non_blocking_partial_reads_wait_and_then_complete(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """A non-blocking socket with part of a frame: the reader calls ``wait`` each time nothing
    is there yet, and the frame completes as the rest arrives."""
    a, b = pair
    b.setblocking(False)
    wire = _wire(("partial", np.arange(32, dtype=np.int32)))
    pieces = [wire[:3], wire[3 : HEADER.size + 5], wire[HEADER.size + 5 : -1], wire[-1:]]
    waits: list[int] = []

    def wait() -> None:
        waits.append(1)
        a.sendall(pieces.pop(0))  # the next piece arrives only when the reader waits for it

    reader = FrameReader(b, LIMIT, wait)
    label, array = _decoded(reader.read_frame())  # type: ignore[misc]
    assert label == "partial"
    np.testing.assert_array_equal(array, np.arange(32))
    assert len(waits) == 4 and pieces == []


def test_non_blocking_without_wait_raises_blocking_io(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    _a, b = pair
    b.setblocking(False)
    with pytest.raises(BlockingIOError):
        FrameReader(b, LIMIT).read_frame()


def test_send_frame_waits_when_the_kernel_takes_no_more(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """A non-blocking sender with a frame bigger than the socket buffer calls ``wait`` and
    resumes where the kernel stopped: the receiver gets every byte in order."""
    a, b = pair
    a.setblocking(False)
    array = np.random.default_rng(1).random(300_000)  # 2.4 MB
    data, buffers = encode(array)
    reader = FrameReader(b, 8 << 20)
    received: list[object] = []
    waits: list[int] = []

    def wait() -> None:
        waits.append(1)
        if not threads:  # the receiver starts reading only once the sender is stuck
            t = threading.Thread(target=lambda: received.append(_decoded(reader.read_frame())))
            t.start()
            threads.append(t)
        select.select([], [a], [], 5.0)  # until the socket takes bytes again

    threads: list[threading.Thread] = []
    send_frame(a, data, buffers, wait)
    for t in threads:
        t.join(10)
    assert waits
    np.testing.assert_array_equal(received[0], array)  # type: ignore[arg-type]
