"""The crash matrix: where a worker dies x how it dies -> what every caller sees (issue 22).

One table for every test of a worker's death (the shape of loky's
``tests/test_reusable_executor.py`` and CPython's ``test_concurrent_futures/test_deadlock.py``):

- :data:`HOW`: the real faults (tests/faults.py) and what they look like from the caller: the
  signal name and exit status on the error, the key of ``stats().deaths``, and the line
  faulthandler writes to the worker's log.
- :data:`WHERE`: the moment of the death: while the worker starts, during a call, while the
  worker encodes its reply, idle between calls, and with 8 threads or 32 asyncio tasks in flight.
- :func:`expected`: the exception of the call that was running when the worker died (None when
  the caller sees nothing: a death at start or between calls is retried), the respawns counted
  and whether the outcome of that call is unknown.
- :data:`CELLS`: the cells that run, as ``pytest.param`` s; the costly extra ones are marked
  ``slow`` so that the everyday lane keeps the cases it always had.

The runners (:data:`RUNNERS`) make the death really happen and check every fact of the cell;
tests/test_crash.py runs the table, tests/test_leftovers.py kills workers in every way of
:data:`HOW`.
"""

from __future__ import annotations

import asyncio
import functools
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faults
import pytest
from conftest import DIM, HashEmbedding, embed_text

import safechroma
from safechroma import (
    AsyncSafeClient,
    SafeClient,
    WorkerCrashedError,
    WorkerError,
    WorkerStartError,
    WorkerTimeoutError,
)
from safechroma._policy import default_validator

# -- the table -------------------------------------------------------------------------------


@dataclass(frozen=True)
class How:
    """How a worker dies, as the callers see it."""

    signal: str | None  # WorkerError.signal of a caller whose call was in flight
    exitcode: int  # WorkerError.exitcode (negative: the signal's number, as in Popen)
    death: str  # its key in SafeClient.stats().deaths
    logged: str | None  # faulthandler's report in crash_log (None: nothing to report)


HOW: dict[str, How] = {
    "SIGBUS": How("SIGBUS", -signal.SIGBUS, "SIGBUS", "Bus error"),
    "SIGSEGV": How("SIGSEGV", -signal.SIGSEGV, "SIGSEGV", "Segmentation fault"),
    "SIGABRT": How("SIGABRT", -signal.SIGABRT, "SIGABRT", "Aborted"),
    "SIGKILL": How("SIGKILL", -signal.SIGKILL, "SIGKILL", None),
    "exit": How(None, 3, "exit", None),
    # A hang is cut by the call's deadline with SIGKILL: the other callers see that kill; the
    # call that hung raises WorkerTimeoutError.
    "hang": How("SIGKILL", -signal.SIGKILL, "timeout", None),
}

WHERE: dict[str, str] = {
    # A hang while starting is every worker hanging: start_timeout cuts it and the client
    # never opens (one hanging first worker would cost the default start_timeout).
    "starting": "the first worker dies opening the directory (worker_init)",
    "call": "during a call (run_in_worker)",
    "reply": "while the worker encodes its reply (the result's __reduce__)",
    "idle": "idle between calls (a signal from outside)",
    "threads8": "with 8 threads in flight: 4 reads, 3 writes and the faulting call",
    "tasks32": "with 32 asyncio tasks in flight: 16 reads, 15 writes and the faulting call",
}

CALL_DEADLINE = 1.0  # call_timeout() for a hanging call alone
MATRIX_DEADLINE = 3.0  # for a hanging call among many: the others must reach the worker first
START_DEADLINE = 1.5  # start_timeout for a worker that hangs while starting


@dataclass(frozen=True)
class Expect:
    """What the callers see in one cell."""

    error: type[BaseException] | None  # raised by the call that was running (None: nothing)
    respawns: int  # stats().respawns afterwards (None for a client that never opened)
    outcome_unknown: bool  # on that error: a write may or may not have been applied
    # faulthandler's report is in the error's crash_log (the log's tail): with many calls in
    # flight the tail holds the stacks of all their threads, and the report's first line is
    # further up.
    logged: bool = True


def expected(where: str, how: str) -> Expect:
    """The cell's expectation, from the two rules that decide it: a death nobody's call saw is
    retried; a hang is cut by a deadline (WorkerTimeoutError), or at start by start_timeout
    (WorkerStartError, the client never opens)."""
    if where == "starting":
        return Expect(WorkerStartError if how == "hang" else None, 0, False)
    if where == "idle":
        return Expect(None, 1, False)
    alone = where in ("call", "reply")
    return Expect(WorkerTimeoutError if how == "hang" else WorkerCrashedError, 1, False, alone)


# The cells that run. Every one that ran before the table existed runs in the default lane;
# those added with the table cost a worker death each and run in the slow lane.
_DEFAULT = {
    "starting": {"SIGBUS", "SIGSEGV", "SIGABRT", "SIGKILL", "exit", "hang"},
    "call": {"SIGBUS", "SIGSEGV", "SIGABRT", "SIGKILL", "exit", "hang"},
    "reply": {"SIGBUS", "SIGSEGV", "SIGABRT", "SIGKILL", "exit"},
    "idle": {"SIGKILL"},
    "threads8": {"SIGBUS", "SIGSEGV", "SIGABRT", "SIGKILL", "exit", "hang"},
    "tasks32": {"SIGSEGV", "SIGKILL", "hang"},
}
# Not a cell: nothing from outside makes an idle worker exit(3) or hang.
_NONE = {("idle", "exit"), ("idle", "hang")}

CELLS = [
    pytest.param(
        where,
        how,
        id=f"{where}-{how}",
        marks=() if how in _DEFAULT[where] else (pytest.mark.slow,),
    )
    for where in WHERE
    for how in HOW
    if (where, how) not in _NONE
]


# -- checks shared by the runners --------------------------------------------------------------


def check_error(err: BaseException, how: str, expect: Expect, pid: int, operation: str) -> None:
    """The error of the call that was running when the worker died, fact by fact."""
    assert expect.error is not None
    assert type(err) is expect.error, repr(err)
    assert isinstance(err, WorkerError)
    assert (err.pid, err.operation, err.outcome_unknown) == (
        pid,
        operation,
        expect.outcome_unknown,
    )
    if expect.error is WorkerTimeoutError:
        assert isinstance(err, TimeoutError) and err.timeout in (CALL_DEADLINE, MATRIX_DEADLINE)
    else:
        assert isinstance(err, WorkerCrashedError)
        facts = HOW[how]
        assert (err.signal, err.exitcode) == (facts.signal, facts.exitcode)
        if facts.logged and expect.logged:
            assert facts.logged in err.crash_log, err.crash_log[-600:]
            assert "Fatal Python error" in str(err)
    restored = pickle.loads(pickle.dumps(err))
    assert type(restored) is type(err) and str(restored) == str(err)
    assert getattr(restored, "signal", None) == getattr(err, "signal", None)


def check_after(client: SafeClient, how: str, expect: Expect, first: int | None) -> None:
    """One death is one death, and a fresh worker serves the next call."""
    assert client.heartbeat() > 0
    stats = client.stats()
    assert stats.deaths == {HOW[how].death: 1}
    assert stats.respawns == expect.respawns
    assert stats.timeouts == (how == "hang")
    assert not stats.breaker_open
    assert stats.worker_pid not in (None, first)


# -- the runners: one per WHERE --------------------------------------------------------------


def _fault(how: str) -> Callable[..., None]:
    return faults.FAULTS[how]


def run_starting(db: str, tmp_path: Path, how: str, expect: Expect) -> None:
    if how == "hang":  # every worker hangs: the start is cut by start_timeout
        with pytest.raises(WorkerStartError) as info:
            SafeClient(
                db,
                validator=None,
                worker_init=faults.hang,
                start_timeout=START_DEADLINE,
                read_retries=0,
            )
        assert info.value.signal == "timeout" and info.value.operation == "start"
        return
    marker = tmp_path / "crash-once"
    marker.touch()
    init = functools.partial(faults.fault_once, str(marker), how)
    events: list[safechroma.Event] = []
    with SafeClient(db, validator=None, worker_init=init, on_event=events.append) as client:
        assert not marker.exists()  # the first worker ran the fault
        assert client.heartbeat() > 0  # the constructor's read was retried on a new worker
        stats = client.stats()
        assert stats.deaths == {HOW[how].death: 1}
        assert stats.respawns == expect.respawns
    kinds = [e.kind for e in events]
    assert kinds.count("worker_started") == 1 and kinds.count("worker_died") == 1


def run_call(db: str, tmp_path: Path, how: str, expect: Expect, *, reply: bool = False) -> None:
    with SafeClient(db, validator=None) as client:
        first = client.stats().worker_pid
        assert first is not None
        deadline = CALL_DEADLINE if how == "hang" else None
        start = time.monotonic()
        with safechroma.call_timeout(deadline), pytest.raises(WorkerError) as info:
            if reply:
                client.run_in_worker(faults.crash_in_reply, how)
            else:
                client.run_in_worker(_fault(how))
        if how == "hang":  # cut by its deadline, not before (no upper bound: a shared machine)
            assert time.monotonic() - start >= CALL_DEADLINE
        operation = "crash_in_reply" if reply else _fault(how).__name__
        check_error(info.value, how, expect, first, operation)
        check_after(client, how, expect, first)


def run_reply(db: str, tmp_path: Path, how: str, expect: Expect) -> None:
    run_call(db, tmp_path, how, expect, reply=True)


def run_idle(db: str, tmp_path: Path, how: str, expect: Expect) -> None:
    """Killed from outside between two calls: the next call never notices."""
    with SafeClient(db, validator=None) as client:
        assert client.heartbeat() > 0
        worker = client._sup.worker
        assert worker is not None
        first = worker.pid
        os.kill(first, getattr(signal, how))
        assert worker.proc.wait(10.0) == HOW[how].exitcode  # dead before the next call
        check_after(client, how, expect, first)


# -- many calls in flight ----------------------------------------------------------------------

BARRIER_WAIT = 60.0  # bounded: a serialised worker fails the test instead of hanging it


def arrive(folder: str, name: str, count: int) -> bool:
    """Mark ``name`` as arrived; wait until ``count`` callers have. False if they never do."""
    Path(folder, name).touch()
    give_up = time.monotonic() + BARRIER_WAIT
    while len(os.listdir(folder)) < count:
        if time.monotonic() > give_up:
            return False
        time.sleep(0.002)
    return True


class BarrierEmbedding(HashEmbedding):
    """Embeds like HashEmbedding, but first waits, in the worker, for ``count`` callers, and
    then (when ``hold`` is set) until the file ``hold`` exists: the calls stay in the worker
    until the test lets them go."""

    def __init__(self, folder: str = "", count: int = 0, hold: str = "") -> None:
        super().__init__(DIM)
        self.folder = folder
        self.count = count
        self.hold = hold

    def __call__(self, input: Any) -> Any:  # noqa: A002 - chromadb's name
        if not arrive(self.folder, f"{input[0]}-{os.getpid()}", self.count):
            raise RuntimeError("the barrier was never full: calls did not run at once")
        give_up = time.monotonic() + BARRIER_WAIT
        while self.hold and not os.path.exists(self.hold) and time.monotonic() < give_up:
            time.sleep(0.002)
        return super().__call__(input)

    @staticmethod
    def name() -> str:
        return "safechroma-test-barrier"

    def get_config(self) -> dict[str, Any]:
        return {"folder": self.folder, "count": self.count, "hold": self.hold}

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> BarrierEmbedding:
        return BarrierEmbedding(**config)


def _fault_when_full(_client: Any, folder: str, count: int, how: str) -> None:
    """Wait until ``count`` other calls are in the worker, then die (or hang) with them."""
    if not arrive(folder, "faulter", count + 1):
        raise RuntimeError("the other calls never arrived")
    _fault(how)()


class InFlight:
    """One case: ``readers`` queries, ``writers`` adds and one faulting call, all in the worker
    when it dies."""

    def __init__(self, db: str, folder: Path, readers: int, writers: int, how: str) -> None:
        self.folder = folder
        self.readers, self.writers, self.how = readers, writers, how
        self.events: list[safechroma.Event] = []
        self.in_flight_at_validation: list[int] = []
        self.docs = {f"r{i}": f"record number {i}" for i in range(readers)}
        # The calls stay in the worker until it died: the first caller to see the death
        # reports it (on_event), which lets the retried reads through on the next worker.
        self.hold = str(folder.parent / "dead")
        self.ef = BarrierEmbedding(str(folder), readers + writers + 1, self.hold)
        self.client = SafeClient(db, validator=self.validator, on_event=self.on_event)
        self.col = self.client.create_collection("matrix", embedding_function=self.ef)
        # Stored with explicit embeddings: no barrier for the set-up.
        self.col.add(
            ids=list(self.docs),
            embeddings=[embed_text(d) for d in self.docs.values()],
            documents=list(self.docs.values()),
        )
        pid = self.client.stats().worker_pid
        assert pid is not None
        self.pid = pid

    def on_event(self, event: safechroma.Event) -> None:
        self.events.append(event)
        if event.kind in ("worker_died", "worker_timeout"):
            Path(self.hold).touch()

    def validator(self, ctx: safechroma.HookContext) -> Any:
        # "Validated once, with no call in flight": count the calls holding a channel.
        from safechroma.runtime import supervisor

        sup = supervisor._registry[ctx.path]  # also during the constructor's first start
        self.in_flight_at_validation.append(sup.calls_in_flight())
        return default_validator(ctx)

    def read(self, i: int) -> Any:
        rid = f"r{i}"
        res = self.col.query(query_texts=[self.docs[rid]], n_results=1, include=["documents"])
        return (res["ids"], res["documents"])

    def write(self, i: int) -> None:
        self.col.add(ids=[f"w{i}"], documents=[f"written {i}"])

    def crash(self) -> None:
        deadline = MATRIX_DEADLINE if self.how == "hang" else None
        with safechroma.call_timeout(deadline):
            self.client.run_in_worker(
                _fault_when_full, str(self.folder), self.readers + self.writers, self.how
            )

    def check(self, outcomes: dict[str, Any], expect: Expect) -> None:
        facts = HOW[self.how]
        for i in range(self.readers):  # reads: retried on the next worker, each its own answer
            rid = f"r{i}"
            assert outcomes[f"read{i}"] == ([[rid]], [[self.docs[rid]]]), outcomes[f"read{i}"]
        for i in range(self.writers):  # writes: their own precise error, outcome unknown
            err = outcomes[f"write{i}"]
            assert type(err) is WorkerCrashedError, repr(err)
            assert (err.pid, err.signal, err.exitcode) == (self.pid, facts.signal, facts.exitcode)
            assert err.operation == "add" and err.outcome_unknown
        check_error(outcomes["crash"], self.how, expect, self.pid, "_fault_when_full")
        # One death is one death.
        stats = self.client.stats()
        assert stats.deaths == {facts.death: 1}
        assert stats.respawns == expect.respawns and stats.timeouts == (self.how == "hang")
        assert not stats.breaker_open
        kinds = [e.kind for e in self.events]
        assert kinds.count("worker_started") == 2  # the first worker and exactly one more
        assert kinds.count("validated") == 2  # at the start and once after the death
        assert kinds.count("worker_died") + kinds.count("worker_timeout") == 1
        assert self.in_flight_at_validation == [0, 0]
        # The next calls are served by the new worker; unknown writes are all or nothing.
        assert stats.worker_pid not in (None, self.pid)
        got = self.col.get(include=["documents"])
        stored = dict(zip(got["ids"], got["documents"], strict=True))
        for i in range(self.writers):
            assert stored.get(f"w{i}") in (None, f"written {i}")
        assert set(stored) - {f"w{i}" for i in range(self.writers)} == set(self.docs)
        self.col.upsert(ids=["after"], embeddings=[embed_text("after")], documents=["after"])
        assert self.col.get(ids=["after"])["ids"] == ["after"]

    def close(self) -> None:
        self.client.close()


def _outcome(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - the outcome under test
        return exc


async def _aoutcome(coro: Any) -> Any:
    try:
        return await coro
    except Exception as exc:  # noqa: BLE001 - the outcome under test
        return exc


def run_threads8(db: str, tmp_path: Path, how: str, expect: Expect) -> None:
    """4 reads, 3 writes and the faulting call, each in its own thread, all in the worker when
    it dies: every caller gets its result or its own precise error, the death is counted once,
    validated once with no call in flight, one new worker serves the next calls."""
    folder = tmp_path / "barrier"
    folder.mkdir()
    case = InFlight(db, folder, readers=4, writers=3, how=how)
    try:
        outcomes: dict[str, Any] = {}
        jobs: dict[str, tuple[Any, ...]] = {f"read{i}": (case.read, i) for i in range(4)}
        jobs |= {f"write{i}": (case.write, i) for i in range(3)}
        jobs["crash"] = (case.crash,)

        def run(name: str) -> None:
            fn, *args = jobs[name]
            outcomes[name] = _outcome(fn, *args)

        threads = [threading.Thread(target=run, args=(name,)) for name in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        case.check(outcomes, expect)
    finally:
        case.close()


def run_tasks32(db: str, tmp_path: Path, how: str, expect: Expect) -> None:
    """The same with asyncio: 16 reading tasks, 15 writing tasks and the faulting one, all in
    the worker when it dies (an AsyncSafeClient sharing the directory's worker)."""
    folder = tmp_path / "barrier"
    folder.mkdir()
    case = InFlight(db, folder, readers=16, writers=15, how=how)
    count = case.readers + case.writers + 1
    try:

        async def main() -> dict[str, Any]:
            async with AsyncSafeClient(db) as aclient:  # shares the directory's worker
                assert aclient.stats().worker_pid == case.pid
                acol = await aclient.get_collection("matrix", embedding_function=case.ef)

                async def read(i: int) -> Any:
                    rid = f"r{i}"
                    res = await acol.query(
                        query_texts=[case.docs[rid]], n_results=1, include=["documents"]
                    )
                    return (res["ids"], res["documents"])

                async def write(i: int) -> None:
                    await acol.add(ids=[f"w{i}"], documents=[f"written {i}"])

                async def crash() -> None:
                    deadline = MATRIX_DEADLINE if how == "hang" else None
                    with safechroma.call_timeout(deadline):
                        await aclient.run_in_worker(_fault_when_full, str(folder), count - 1, how)

                jobs = {f"read{i}": read(i) for i in range(case.readers)}
                jobs |= {f"write{i}": write(i) for i in range(case.writers)}
                jobs["crash"] = crash()
                results = await asyncio.gather(*(_aoutcome(c) for c in jobs.values()))
                return dict(zip(jobs, results, strict=True))

        case.check(asyncio.run(main()), expect)
    finally:
        case.close()


RUNNERS: dict[str, Callable[[str, Path, str, Expect], None]] = {
    "starting": run_starting,
    "call": run_call,
    "reply": run_reply,
    "idle": run_idle,
    "threads8": run_threads8,
    "tasks32": run_tasks32,
}
