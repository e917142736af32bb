"""The crash cycle (issue 3): real faults inside the worker, at every phase.

Each case makes the worker really die (a genuine SIGBUS from a truncated mapping, a genuine
SIGSEGV, abort, kill, exit) or hang, and checks that the caller survives, gets the precise error,
and that the next call is served by a new worker. Where and how it dies, and what each caller
then sees, is one table (tests/crash_matrix.py), run by :func:`test_crash_matrix`; the tests
after it pin what the table does not (writes in flight, replays, the breaker, backoff).
"""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path
from typing import Any

import crash_matrix
import faults
import pytest
from conftest import HashEmbedding

from safechroma import (
    BreakerPolicy,
    ChromaPanicError,
    CrashLoopError,
    SafeClient,
    WorkerCrashedError,
    WorkerStartError,
    WorkerTimeoutError,
)
from safechroma.runtime import platform


@pytest.mark.parametrize(("where", "how"), crash_matrix.CELLS)
def test_crash_matrix(db: str, tmp_path: Path, where: str, how: str) -> None:
    """One cell of the crash matrix (tests/crash_matrix.py): the worker really dies ``how``,
    ``where``; every caller gets its result or the precise error of the table, the death is
    counted once, and the next call is served by a fresh worker."""
    crash_matrix.RUNNERS[where](db, tmp_path, how, crash_matrix.expected(where, how))


def test_worker_that_always_dies_while_starting_gives_start_error(db: str) -> None:
    with pytest.raises(WorkerStartError) as info:
        SafeClient(db, validator=None, worker_init=faults.sigsegv, read_retries=1)
    assert info.value.signal == "SIGSEGV" and info.value.operation == "start"


def test_client_timeout_option_applies_per_client(db: str) -> None:
    with SafeClient(db, validator=None, timeout=0.5) as client:
        with pytest.raises(WorkerTimeoutError):
            client.run_in_worker(faults.hang)


def _crashing_ef(marker: str) -> HashEmbedding:
    class CrashingEmbedding(HashEmbedding):
        def __call__(self, input: Any) -> Any:  # noqa: A002
            faults.fault_once(marker, "SIGSEGV")
            return super().__call__(input)

    return CrashingEmbedding()


def test_write_in_flight_reports_unknown_outcome_and_is_not_replayed(
    db: str, tmp_path: Path
) -> None:
    marker = tmp_path / "m"
    with SafeClient(db, validator=None) as client:
        col = client.create_collection("writes", embedding_function=_crashing_ef(str(marker)))
        marker.touch()
        with pytest.raises(WorkerCrashedError) as info:
            col.add(ids=["a"], documents=["hello"])
        assert info.value.outcome_unknown and info.value.operation == "add"
        assert info.value.signal == "SIGSEGV"
        assert col.count() == 0  # not replayed; the next call reopened the collection
        col.add(ids=["a"], documents=["hello"])
        assert col.count() == 1


def test_write_replayed_when_the_caller_opted_in(db: str, tmp_path: Path) -> None:
    marker = tmp_path / "m"
    with SafeClient(db, validator=None, replay_writes=True) as client:
        col = client.create_collection("writes", embedding_function=_crashing_ef(str(marker)))
        marker.touch()
        col.add(ids=["a", "b"], documents=["hello", "world"])
        assert col.count() == 2
        assert client.stats().deaths == {"SIGSEGV": 1}


def test_read_is_retried_transparently_on_a_fresh_worker(db: str, tmp_path: Path) -> None:
    marker = tmp_path / "m"
    with SafeClient(db, validator=None) as client:
        col = client.create_collection("reads", embedding_function=_crashing_ef(str(marker)))
        col.add(ids=["a", "b"], documents=["apple", "bicycle"])
        marker.touch()
        assert col.query(query_texts=["bicycle"], n_results=1)["ids"] == [["b"]]
        assert client.stats().deaths == {"SIGSEGV": 1}


def test_breaker_opens_after_repeated_deaths_and_resets(db: str) -> None:
    """Workers that die at their first call (each a different call, so none is poison) are a
    crash loop: the third such death opens a max_deaths=3 breaker. The first worker had served
    the client's opening call, so its death is bad luck and does not count."""
    sleeps: list[float] = []
    policy = BreakerPolicy(max_deaths=3, window=60, cooldown=300)
    with SafeClient(db, validator=None, breaker=policy, sleep=sleeps.append) as client:
        for i in range(4):
            with pytest.raises(WorkerCrashedError):
                client.run_in_worker(faults.sigsegv, i)
        with pytest.raises(CrashLoopError) as info:
            client.heartbeat()
        assert len(info.value.deaths) == 4 and info.value.retry_after > 200
        assert "3 workers died without serving a call" in str(info.value)
        assert info.value.path == os.path.realpath(db)
        assert client.stats().breaker_open
        # Consecutive respawns backed off, growing (first respawn immediate).
        assert len(sleeps) == 1 and sleeps[0] > 0
        client.reset_breaker()
        assert client.heartbeat() > 0


def test_breaker_lets_a_call_through_after_cooldown(db: str) -> None:
    policy = BreakerPolicy(max_deaths=2, window=60, cooldown=0.3)
    with SafeClient(db, validator=None, breaker=policy, sleep=lambda s: None) as client:
        for i in range(3):  # the first worker served the opening call: bad luck, not counted
            with pytest.raises(WorkerCrashedError):
                client.run_in_worker(faults.sigabrt, i)
        with pytest.raises(CrashLoopError):
            client.heartbeat()
        time.sleep(0.4)
        assert client.heartbeat() > 0


def test_backoff_grows_between_consecutive_respawns(db: str) -> None:
    """Default options: after the first worker (which served the opening call), four workers in
    a row die at their first call (different calls); the respawns after the first of those back
    off, growing, and the breaker (5) stays closed."""
    sleeps: list[float] = []
    with SafeClient(db, validator=None, sleep=sleeps.append) as client:
        for i in range(5):
            with pytest.raises(WorkerCrashedError):
                client.run_in_worker(faults.sigabrt, i)
        client.heartbeat()
    assert len(sleeps) == 3
    assert sleeps[0] < sleeps[1] < sleeps[2]


@pytest.mark.skipif(
    platform.PORTABLE, reason="RLIMIT_AS is Linux's: the portable RSS watchdog ends the worker"
)
def test_memory_ceiling_turns_runaway_allocation_into_an_error(db: str) -> None:
    with SafeClient(db, validator=None, memory_limit=2 << 30) as client:
        pid = client.stats().worker_pid
        with pytest.raises(MemoryError):
            client.run_in_worker(lambda _c: len(bytearray(3 << 30)))
        assert client.stats().worker_pid == pid  # an error, not a death


def test_panic_in_the_worker_becomes_an_error_and_retires_the_worker(db: str) -> None:
    """pyo3_runtime.PanicException derives from BaseException; it must not kill the loop."""

    def panic(_c: Any) -> None:
        cls = type("PanicException", (BaseException,), {"__module__": "pyo3_runtime"})
        raise cls("called `Option::unwrap()` on a `None` value")

    with SafeClient(db, validator=None) as client:
        pid = client.stats().worker_pid
        with pytest.raises(ChromaPanicError, match="unwrap"):
            client.run_in_worker(panic)
        assert client.heartbeat() > 0
        assert client.stats().worker_pid != pid


def test_crash_is_detected_within_milliseconds(db: str) -> None:
    with SafeClient(db, validator=None) as client:
        start = time.monotonic()
        with pytest.raises(WorkerCrashedError):
            client.run_in_worker(faults.sigkill)
        assert time.monotonic() - start < 1.0  # generous: the machine is shared


def test_errors_pickle_with_their_facts() -> None:
    err = WorkerCrashedError(
        "boom",
        pid=1,
        exitcode=-7,
        signal="SIGBUS",
        operation="query",
        crash_log="tail",
        outcome_unknown=False,
    )
    again = pickle.loads(pickle.dumps(err))
    assert (again.pid, again.signal, again.operation, str(again)) == (1, "SIGBUS", "query", "boom")
