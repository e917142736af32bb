"""The channel pool of one worker (runtime/channels.py), against a stand-in worker whose channels
are real :class:`~safechroma.runtime.transport.Channel` objects over real socket pairs.

Pinned: checkout opens a channel only when none is idle and the limit allows, idle ones come
back most-recently-used first, a discarded channel is closed and frees its slot, many threads
never share a channel, and a closed pool refuses checkouts and closes what comes back.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from safechroma.runtime.channels import MAX_CHANNELS, ChannelPool
from safechroma.runtime.transport import Channel, PeerDied


class StandInWorker:
    """What the pool needs of a worker: ``open_channel``. Each channel is one end of a real
    socket pair; the other end is kept so the test can close it."""

    def __init__(self, fail: Callable[[], bool] = lambda: False) -> None:
        self.opened: list[Channel] = []
        self.peers: list[socket.socket] = []
        self.fail = fail
        self._lock = threading.Lock()

    def open_channel(self) -> Channel:
        if self.fail():
            raise PeerDied("the worker is gone")
        ours, theirs = socket.socketpair()
        channel = Channel(ours, None, 1 << 20)
        with self._lock:
            self.opened.append(channel)
            self.peers.append(theirs)
        return channel

    def close(self) -> None:
        for channel in self.opened:
            channel.close()
        for peer in self.peers:
            peer.close()


@pytest.fixture
def worker() -> Iterator[StandInWorker]:
    w = StandInWorker()
    yield w
    w.close()


def _until(condition: Callable[[], bool]) -> None:
    """Wait (in steps of a millisecond, up to 5 s) for another thread to get somewhere."""
    give_up = time.monotonic() + 5.0
    while not condition():
        assert time.monotonic() < give_up, "the other thread never got there"
        time.sleep(0.001)


def test_checkout_opens_only_when_nothing_is_idle(worker: StandInWorker) -> None:
    pool = ChannelPool(worker)  # type: ignore[arg-type]
    first = pool.checkout()
    assert worker.opened == [first]
    pool.checkin(first)
    assert pool.checkout() is first  # reused, not a second channel
    second = pool.checkout()  # the first is busy: a new one
    assert worker.opened == [first, second] and second is not first
    pool.close()


def test_idle_channels_come_back_most_recently_used_first(worker: StandInWorker) -> None:
    pool = ChannelPool(worker)  # type: ignore[arg-type]
    a, b, c = pool.checkout(), pool.checkout(), pool.checkout()
    pool.checkin(a)
    pool.checkin(c)
    pool.checkin(b)
    assert [pool.checkout(), pool.checkout(), pool.checkout()] == [b, c, a]
    assert len(worker.opened) == 3
    pool.close()


def test_a_discarded_channel_is_closed_and_frees_its_slot(worker: StandInWorker) -> None:
    pool = ChannelPool(worker, limit=1)  # type: ignore[arg-type]
    first = pool.checkout()
    got: list[Channel] = []
    waiter = threading.Thread(target=lambda: got.append(pool.checkout()))
    waiter.start()
    _until(lambda: pool._waiting == 1)  # blocked: the one slot is taken
    assert got == []
    pool.discard(first)
    waiter.join(5)
    assert first.closed and first.sock.fileno() == -1
    assert len(got) == 1 and got[0] is not first and not got[0].closed
    assert worker.opened == [first, got[0]]
    pool.close()


def test_at_the_limit_a_caller_waits_for_the_next_checkin(worker: StandInWorker) -> None:
    pool = ChannelPool(worker, limit=2)  # type: ignore[arg-type]
    a, b = pool.checkout(), pool.checkout()
    got: list[Channel] = []
    waiter = threading.Thread(target=lambda: got.append(pool.checkout()))
    waiter.start()
    _until(lambda: pool._waiting == 1)
    pool.checkin(b)
    waiter.join(5)
    assert got == [b] and len(worker.opened) == 2  # handed over, nothing new opened
    pool.checkin(a)
    pool.close()


def test_threads_never_share_a_channel(worker: StandInWorker) -> None:
    """16 threads check channels out and in 300 times each from a pool of 4: no channel is ever
    held by two threads at once, and no more than 4 are ever opened."""
    pool = ChannelPool(worker, limit=4)  # type: ignore[arg-type]
    holders: dict[int, int] = {}
    lock = threading.Lock()
    clashes: list[tuple[int, int, int]] = []
    start = threading.Barrier(16)

    def work(me: int) -> None:
        start.wait()
        for _ in range(300):
            channel = pool.checkout()
            with lock:
                other = holders.get(id(channel))
                if other is not None:
                    clashes.append((id(channel), other, me))
                holders[id(channel)] = me
            time.sleep(0)  # let another thread run while this one holds it
            with lock:
                del holders[id(channel)]
            pool.checkin(channel)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert clashes == []
    assert 1 <= len(worker.opened) <= 4
    assert all(not c.closed for c in worker.opened)
    pool.close()
    assert all(c.closed for c in worker.opened)


def test_a_closed_pool_refuses_and_closes_what_comes_back(worker: StandInWorker) -> None:
    pool = ChannelPool(worker)  # type: ignore[arg-type]
    idle, busy = pool.checkout(), pool.checkout()
    pool.checkin(idle)
    pool.close()
    assert idle.closed  # idle ones at once
    assert not busy.closed  # a busy one is its caller's until it comes back
    with pytest.raises(PeerDied, match="closed"):
        pool.checkout()
    pool.checkin(busy)
    assert busy.closed
    assert pool._idle == [] and pool._open == 0
    assert len(worker.opened) == 2  # the refused checkout opened nothing


def test_close_wakes_a_caller_waiting_for_a_channel(worker: StandInWorker) -> None:
    pool = ChannelPool(worker, limit=1)  # type: ignore[arg-type]
    held = pool.checkout()
    errors: list[BaseException] = []

    def wait_for_one() -> None:
        try:
            pool.checkout()
        except PeerDied as exc:
            errors.append(exc)

    waiter = threading.Thread(target=wait_for_one)
    waiter.start()
    _until(lambda: pool._waiting == 1)
    pool.close()
    waiter.join(5)
    assert not waiter.is_alive() and len(errors) == 1
    pool.discard(held)


def test_a_failed_open_gives_its_slot_back() -> None:
    """The worker died as a channel was being opened: the error reaches the caller, and the
    slot it reserved is free again (a pool of one still opens a channel afterwards)."""
    failures = [True]
    worker = StandInWorker(fail=lambda: bool(failures and failures.pop()))
    try:
        pool = ChannelPool(worker, limit=1)  # type: ignore[arg-type]
        with pytest.raises(PeerDied, match="gone"):
            pool.checkout()
        assert pool._open == 0
        channel = pool.checkout()
        assert worker.opened == [channel]
        pool.close()
        pool.discard(channel)
    finally:
        worker.close()


def test_the_default_limit() -> None:
    assert ChannelPool(StandInWorker())._limit == MAX_CHANNELS == 32  # type: ignore[arg-type]
