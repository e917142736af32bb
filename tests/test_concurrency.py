"""Many callers at once (issue 10): parallel calls in the worker, and every crash guarantee with
many calls in flight.

Parallelism is shown without a clock: calls meet inside the worker at a barrier (files in a
folder) that they can only pass if they are all in the worker at the same time; calls served one
at a time would wait at it until its bounded wait gave up, and the test would fail. The crash
matrix is the one of tests/test_crash.py, rerun with 8 threads and with 32 asyncio tasks in the
worker when it dies.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
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
    WorkerTimeoutError,
)
from safechroma._policy import default_validator

BARRIER_WAIT = 60.0  # bounded: a serialised worker fails the test instead of hanging it


def _arrive(folder: str, name: str, count: int) -> bool:
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
        if not _arrive(self.folder, f"{input[0]}-{os.getpid()}", self.count):
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


def _meet(_client: Any, folder: str, name: str, count: int) -> bool:
    return _arrive(folder, name, count)


# -- parallel, in order, consistent ----------------------------------------------------------


def test_calls_from_threads_run_in_the_worker_at_the_same_time(db: str, tmp_path: Path) -> None:
    """Eight threads' calls are all inside the worker at once (they pass a barrier of 8)."""
    folder = tmp_path / "barrier"
    folder.mkdir()
    with SafeClient(db, validator=None) as client:
        pid = client.stats().worker_pid
        results: dict[int, Any] = {}

        def call(i: int) -> None:
            results[i] = client.run_in_worker(_meet, str(folder), f"t{i}", 8)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == {i: True for i in range(8)}
        assert client.stats().worker_pid == pid  # one worker served them all


def test_calls_from_tasks_run_in_the_worker_at_the_same_time(db: str, tmp_path: Path) -> None:
    """Sixteen asyncio tasks' calls are all inside the worker at once."""
    folder = tmp_path / "barrier"
    folder.mkdir()

    async def main() -> list[Any]:
        async with AsyncSafeClient(db, validator=None) as client:
            return await asyncio.gather(
                *(client.run_in_worker(_meet, str(folder), f"t{i}", 16) for i in range(16))
            )

    assert asyncio.run(main()) == [True] * 16


def test_one_threads_calls_stay_in_order_and_writes_are_seen_by_later_reads(db: str) -> None:
    """Each thread's calls run in its order (every read sees its own last write), and a write
    that returned before another thread's read started is visible to that read."""
    with SafeClient(db, validator=None) as client:
        col = client.create_collection("order", embedding_function=None)
        errors: list[BaseException] = []
        published: list[str] = []  # ids whose write returned, appended after it returned

        def work(t: int) -> None:
            try:
                for i in range(25):
                    rid = f"{t}-{i % 5}"
                    doc = f"thread {t} step {i}"
                    col.upsert(ids=[rid], embeddings=[embed_text(doc)], documents=[doc])
                    got = col.get(ids=[rid], include=["documents"])
                    assert got["documents"] == [doc]  # its own last write, never an older one
                    published.append(rid)
                    seen = sorted(set(published))
                    present = set(col.get(ids=seen, include=[])["ids"])
                    assert present == set(seen)  # every write that returned before this read
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert col.count() == 8 * 5


# -- the crash matrix with many calls in flight ------------------------------------------------

FAULTS = ["SIGBUS", "SIGSEGV", "SIGABRT", "SIGKILL", "exit", "timeout"]
EXPECTED = {
    "SIGBUS": ("SIGBUS", -7),
    "SIGSEGV": ("SIGSEGV", -11),
    "SIGABRT": ("SIGABRT", -6),
    "SIGKILL": ("SIGKILL", -9),
    "exit": (None, 3),
    "timeout": ("SIGKILL", -9),  # the deadline's kill, as the other callers see it
}


def _fault_when_full(_client: Any, folder: str, count: int, fault: str) -> None:
    """Wait until ``count`` other calls are in the worker, then die (or hang) with them."""
    if not _arrive(folder, "faulter", count + 1):
        raise RuntimeError("the other calls never arrived")
    if fault == "timeout":
        faults.hang()
    faults.FAULTS[fault]()


class _Matrix:
    """One case: ``readers`` queries, ``writers`` adds and one faulting call, all in the worker
    when it dies."""

    def __init__(self, db: str, folder: Path, readers: int, writers: int, fault: str) -> None:
        self.folder = folder
        self.readers, self.writers, self.fault = readers, writers, fault
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
        self.pid = self.client.stats().worker_pid

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
        timeout = 3.0 if self.fault == "timeout" else None
        with safechroma.call_timeout(timeout):
            self.client.run_in_worker(
                _fault_when_full, str(self.folder), self.readers + self.writers, self.fault
            )

    def check(self, outcomes: dict[str, Any]) -> None:
        sig, code = EXPECTED[self.fault]
        for i in range(self.readers):  # reads: retried on the next worker, each its own answer
            rid = f"r{i}"
            assert outcomes[f"read{i}"] == ([[rid]], [[self.docs[rid]]]), outcomes[f"read{i}"]
        for i in range(self.writers):  # writes: their own precise error, outcome unknown
            err = outcomes[f"write{i}"]
            assert type(err) is WorkerCrashedError, repr(err)
            assert (err.pid, err.signal, err.exitcode) == (self.pid, sig, code)
            assert err.operation == "add" and err.outcome_unknown
        err = outcomes["crash"]
        if self.fault == "timeout":
            assert type(err) is WorkerTimeoutError and err.timeout == 3.0
        else:
            assert type(err) is WorkerCrashedError
            assert (err.signal, err.exitcode) == (sig, code)
            assert err.operation == "_fault_when_full" and not err.outcome_unknown
        assert err.pid == self.pid
        # One death is one death.
        stats = self.client.stats()
        kind = "timeout" if self.fault == "timeout" else (sig or "exit")
        assert stats.deaths == {kind: 1}
        assert stats.respawns == 1 and stats.timeouts == (self.fault == "timeout")
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


@pytest.mark.parametrize("fault", FAULTS)
def test_worker_dies_with_eight_threads_in_flight(db: str, tmp_path: Path, fault: str) -> None:
    """4 reads, 3 writes and the faulting call, each in its own thread, all in the worker when
    it dies: every caller gets its result or its own precise error, the death is counted once,
    validated once with no call in flight, one new worker serves the next calls."""
    folder = tmp_path / "barrier"
    folder.mkdir()
    case = _Matrix(db, folder, readers=4, writers=3, fault=fault)
    try:
        outcomes: dict[str, Any] = {}
        jobs = {f"read{i}": (case.read, i) for i in range(4)}
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
        case.check(outcomes)
    finally:
        case.close()


@pytest.mark.parametrize("fault", ["SIGSEGV", "SIGKILL", "timeout"])
def test_worker_dies_with_thirty_two_tasks_in_flight(db: str, tmp_path: Path, fault: str) -> None:
    """The same with asyncio: 16 reading tasks, 15 writing tasks and the faulting one, all in
    the worker when it dies."""
    folder = tmp_path / "barrier"
    folder.mkdir()
    case = _Matrix(db, folder, readers=16, writers=15, fault=fault)
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
                    timeout = 3.0 if fault == "timeout" else None
                    with safechroma.call_timeout(timeout):
                        await aclient.run_in_worker(_fault_when_full, str(folder), count - 1, fault)

                jobs = {f"read{i}": read(i) for i in range(case.readers)}
                jobs |= {f"write{i}": write(i) for i in range(case.writers)}
                jobs["crash"] = crash()
                results = await asyncio.gather(*(_aoutcome(c) for c in jobs.values()))
                return dict(zip(jobs, results, strict=True))

        case.check(asyncio.run(main()))
    finally:
        case.close()


async def _aoutcome(coro: Any) -> Any:
    try:
        return await coro
    except Exception as exc:  # noqa: BLE001 - the outcome under test
        return exc


def test_threads_that_see_one_exit_at_once_all_get_its_status(db: str) -> None:
    """Pins: eight threads asking a killed worker's process for its status at the same moment
    (what eight channels in flight do when it dies) all get SIGKILL's status; none gets
    "unknown" because another thread had already taken the template's one report."""
    with SafeClient(db) as client:
        client.heartbeat()
        worker = client._sup.worker
        assert worker is not None
        os.kill(worker.pid, signal.SIGKILL)
        start = threading.Barrier(8)
        codes: list[int | None] = []

        def ask() -> None:
            start.wait()
            codes.append(worker.proc.wait(10.0))

        threads = [threading.Thread(target=ask) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert codes == [-signal.SIGKILL] * 8
        assert client.heartbeat() > 0  # and the next call is served by a new worker
        assert client.stats().deaths == {"SIGKILL": 1}
