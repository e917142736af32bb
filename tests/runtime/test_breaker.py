"""The crash-loop breaker as a pure object (runtime/breaker.py): no process, no clock.

Times are plain numbers passed in; the real-worker breaker tests (crash loops, SIGKILL storms,
poison requests) are in tests/test_breaker.py.
"""

from __future__ import annotations

import pytest

from safechroma import BreakerPolicy
from safechroma.runtime.breaker import Breaker


def test_only_deaths_without_progress_open_the_breaker() -> None:
    b = Breaker(BreakerPolicy(max_deaths=3, window=60, cooldown=30, max_total_deaths=20))
    for i in range(9):  # workers that served calls: bad luck, however many
        assert not b.record(float(i), f"served {i}", served=50)
    assert b.consecutive == 0 and b.blocked_for(9.0) is None
    assert not b.record(10.0, "start", served=0)
    assert not b.record(11.0, "start", served=0)
    assert b.consecutive == 2
    assert b.record(12.0, "start", served=0)  # the third without progress
    assert b.blocked_for(13.0) == pytest.approx(29.0)
    assert "3 workers died without serving a call" in b.reason(13.0)
    assert b.blocked_for(42.5) is None  # cooldown over: one attempt goes through


def test_a_worker_that_served_ends_the_backoff_and_old_deaths_expire() -> None:
    b = Breaker(BreakerPolicy(max_deaths=3, window=60))
    b.record(0.0, "a", served=0)
    b.record(1.0, "b", served=0)
    assert b.consecutive == 2
    b.served()
    assert b.consecutive == 0
    assert not b.record(70.0, "c", served=0)  # a and b left the window
    assert b.recent(70.0) == ["c"]


def test_the_total_ceiling_stops_workers_that_die_after_a_call_or_two() -> None:
    b = Breaker(BreakerPolicy(max_deaths=5, window=60, max_total_deaths=4))
    assert [b.record(float(i), "x", served=2) for i in range(4)] == [False, False, False, True]
    assert "4 workers died within 60 s" in b.reason(4.0)


def test_poison_needs_two_strikes_and_a_recovery_forgives() -> None:
    b = Breaker(BreakerPolicy())
    assert not b.strike(b"q") and not b.is_poison(b"q")
    assert b.strike(b"q") and b.is_poison(b"q")
    b.forgive()
    assert not b.is_poison(b"q") and not b.strike(b"q")
    b.strike(b"q")
    b.reset()
    assert not b.is_poison(b"q")


def test_a_death_from_outside_counts_as_bad_luck() -> None:
    """SIGKILL/SIGTERM from outside says nothing of the worker: it never opens the breaker by
    itself, however many, until the total ceiling."""
    b = Breaker(BreakerPolicy(max_deaths=2, window=60, max_total_deaths=10))
    assert [b.record(float(i), "killed", served=0, external=True) for i in range(3)] == [False] * 3
    assert b.consecutive == 0 and b.blocked_for(3.0) is None


def test_the_history_survives_dump_and_load_into_another_process() -> None:
    """A shared directory's processes share one death history: what one dumps, another loads;
    entries from the future (an earlier boot's monotonic clock) are dropped."""
    a = Breaker(BreakerPolicy(max_deaths=2, window=60, cooldown=30))
    a.record(10.0, "first", served=0)
    assert a.record(11.0, "second", served=0)
    b = Breaker(BreakerPolicy(max_deaths=2, window=60, cooldown=30))
    b.load(a.dump(), now=12.0)
    assert b.recent(12.0) == ["first", "second"] and b.consecutive == 2
    assert b.blocked_for(12.0) == pytest.approx(29.0)
    c = Breaker(BreakerPolicy(max_deaths=2, window=60, cooldown=30))
    c.load(a.dump(), now=10.5)  # "second" and the open breaker lie in c's future
    assert c.recent(10.5) == ["first"]
    c.load("not a dict", now=10.5)
    assert c.recent(10.5) == ["first"]  # garbage changes nothing
