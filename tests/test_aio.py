"""The asyncio API (issue 6): chromadb's async shape, the sync policy, a loop that never waits.

Every test drives real chromadb in real worker processes, killed with real signals. Plain test
functions run their own event loop with ``asyncio.run`` (no pytest-asyncio).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import chromadb.errors
import faults
import pytest
from chromadb.api import AsyncClientAPI
from chromadb.api.async_client import AsyncClient
from chromadb.api.models.AsyncCollection import AsyncCollection
from chromadb.api.models.Collection import Collection
from conftest import DIM, HashEmbedding

import safechroma
from safechroma import (
    AsyncSafeClient,
    AsyncSafeCollection,
    BreakerPolicy,
    ClientClosedError,
    CrashLoopError,
    SafeClient,
    SafeCollection,
    WorkerCrashedError,
    WorkerTimeoutError,
)
from safechroma.runtime.supervisor import Supervisor
from safechroma.runtime.transport import Channel

# The loop must keep running while workers crash and respawn. A heartbeat sleeping 5 ms is
# woken late by GIL hand-offs and the scheduler; on this noisy 2-core VM tens of ms are normal,
# a blocked loop would show the length of a call, a crash or a respawn (0.1 s to seconds).
MAX_LATENESS = 0.25


class SlowEmbedding(HashEmbedding):
    """HashEmbedding that takes ``delay`` seconds in the worker, so calls are caught mid-flight.

    A document starting with ``"slow"`` also touches ``marker`` (so a test knows the call is in
    the worker) and takes ``slow_delay`` seconds.
    """

    def __init__(self, delay: float = 0.0, marker: str = "", slow_delay: float = 1.0) -> None:
        super().__init__(DIM)
        self.delay = delay
        self.marker = marker
        self.slow_delay = slow_delay

    def __call__(self, input: Any) -> Any:  # noqa: A002 - chromadb's name
        if self.marker and any(t.startswith("slow") for t in input):
            Path(self.marker).touch()
            time.sleep(self.slow_delay)
        elif self.delay:
            time.sleep(self.delay)
        return super().__call__(input)

    @staticmethod
    def name() -> str:
        return "safechroma-test-slow-hash"

    def get_config(self) -> dict[str, Any]:
        return {"delay": self.delay, "marker": self.marker, "slow_delay": self.slow_delay}

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> SlowEmbedding:
        return SlowEmbedding(**config)


class Heartbeat:
    """Measures event-loop responsiveness: how late a 5 ms sleep wakes up, at worst."""

    def __init__(self) -> None:
        self.max_late = 0.0
        self.beats = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            t = loop.time()
            await asyncio.sleep(0.005)
            self.max_late = max(self.max_late, loop.time() - t - 0.005)
            self.beats += 1

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> float:
        self._stop.set()
        assert self._task is not None
        await self._task
        return self.max_late


def run(coro_fn: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(coro_fn())  # type: ignore[arg-type]


async def wait_for_file(path: Path, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        await asyncio.sleep(0.005)


# -- shape -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    sorted(
        n
        for n in dir(AsyncCollection)
        if not n.startswith("_") and callable(getattr(AsyncCollection, n))
    ),
)
def test_collection_methods_are_chromadbs_async_ones(name: str) -> None:
    """Each AsyncCollection method has chromadb's signature and is awaitable exactly when
    chromadb's is."""
    ours, theirs = getattr(AsyncSafeCollection, name), getattr(AsyncCollection, name)
    assert inspect.signature(ours) == inspect.signature(theirs)
    assert inspect.iscoroutinefunction(ours) == inspect.iscoroutinefunction(theirs)


@pytest.mark.parametrize(
    "name",
    sorted(
        n
        for n in dir(AsyncClientAPI)
        if not n.startswith("_") and callable(getattr(AsyncClientAPI, n))
    ),
)
def test_client_methods_are_chromadbs_async_ones(name: str) -> None:
    """Each AsyncClientAPI method: chromadb's parameters and defaults, awaitable like theirs."""
    ours, theirs = getattr(AsyncSafeClient, name), getattr(AsyncClient, name)
    assert inspect.signature(ours) == inspect.signature(theirs)
    assert inspect.iscoroutinefunction(ours) == inspect.iscoroutinefunction(theirs)


def test_async_classes_offer_every_sync_method() -> None:
    """Same methods as SafeClient/SafeCollection; everything that may wait is a coroutine."""
    never_wait = {"get_settings", "clear_system_cache", "stats", "get_model"}
    for sync_cls, async_cls in (
        (SafeClient, AsyncSafeClient),
        (SafeCollection, AsyncSafeCollection),
    ):
        for name in (n for n in dir(sync_cls) if not n.startswith("_")):
            assert hasattr(async_cls, name), (async_cls.__name__, name)
            attr = inspect.getattr_static(async_cls, name)
            if isinstance(attr, property) or name in never_wait:
                continue
            assert inspect.iscoroutinefunction(getattr(async_cls, name)), name
    # Collection methods chromadb's AsyncCollection lacks keep the sync Collection signature.
    for name in ("attach_function", "detach_function", "get_attached_function"):
        assert inspect.signature(getattr(AsyncSafeCollection, name)) == inspect.signature(
            getattr(Collection, name)
        )
    assert issubclass(AsyncSafeClient, AsyncClientAPI)
    assert issubclass(AsyncSafeCollection, AsyncCollection)
    assert {"AsyncSafeClient", "AsyncSafeCollection"} <= set(safechroma.__all__)


# -- the normal path ---------------------------------------------------------------------------


def test_end_to_end_against_real_chromadb(db: str) -> None:
    """The whole surface works through the worker: results, chromadb's error types with the
    remote traceback, live collection model, both construction styles, closed-client error."""

    async def main() -> None:
        client = await AsyncSafeClient.create(db, validator=None, standby=False)
        assert await client.heartbeat() > 0
        col = await client.create_collection(
            "docs", embedding_function=HashEmbedding(), metadata={"a": 1}
        )
        assert isinstance(col, AsyncCollection) and col.metadata == {"a": 1}
        await col.add(
            ids=["a", "b", "c"],
            documents=["apple pie", "bicycle", "cherry"],
            metadatas=[{"n": 1}, {"n": 2}, {"n": 3}],
        )
        assert await col.count() == 3
        got = await col.get(ids=["b"], include=["documents", "metadatas"])
        assert (got["ids"], got["documents"], got["metadatas"]) == (["b"], ["bicycle"], [{"n": 2}])
        assert (await col.query(query_texts=["bicycle"], n_results=1))["ids"] == [["b"]]
        await col.update(ids=["a"], documents=["apricot"])
        await col.upsert(ids=["d"], documents=["date"])
        await col.delete(ids=["c"])
        got = await col.get(include=["documents"])
        assert dict(zip(got["ids"], got["documents"], strict=False)) == {
            "a": "apricot",
            "b": "bicycle",
            "d": "date",
        }
        assert (await col.peek(limit=1))["ids"][0] in {"a", "b", "d"}
        with pytest.raises(chromadb.errors.InvalidArgumentError, match="dimension") as info:
            await col.add(ids=["bad"], embeddings=[[1.0, 2.0]])
        assert "Traceback" in str(info.value.__cause__)
        with pytest.raises(chromadb.errors.NotFoundError):
            await client.get_collection("missing", embedding_function=None)
        await col.modify(name="renamed", metadata={"b": 2})
        assert (col.name, col.metadata) == ("renamed", {"b": 2})
        again = await client.get_collection_by_id(col.id, embedding_function=HashEmbedding())
        assert again.name == "renamed" and await again.count() == 3
        assert [c.name for c in await client.list_collections()] == ["renamed"]
        assert await client.count_collections() == 1
        assert await client.get_version() == chromadb.__version__
        assert client.get_settings().persist_directory == db
        await client.aclose()
        with pytest.raises(ClientClosedError):
            await col.count()
        with pytest.raises(ClientClosedError):
            await client.heartbeat()
        await client.aclose()  # idempotent

        # async with, and a standalone collection that owns its client.
        async with AsyncSafeClient(db, validator=None, standby=False) as c2:
            assert await (await c2.get_collection("renamed", embedding_function=None)).count() == 3
        solo = await AsyncSafeCollection.create(
            db, "renamed", create=False, embedding_function=None, validator=None, standby=False
        )
        async with solo:
            assert await solo.count() == 3
        with pytest.raises(ClientClosedError):
            await solo.count()
        with pytest.raises(chromadb.errors.NotFoundError):
            await AsyncSafeCollection.create(
                db, "absent", create=False, embedding_function=None, validator=None, standby=False
            )
        with pytest.raises(TypeError, match="AsyncSafeCollection.create"):
            AsyncSafeCollection(db, "renamed")

    run(main)


def test_lazy_client_opens_on_first_call_and_reports_open_errors_there(db: str) -> None:
    """AsyncSafeClient() opens nothing; the first awaited call opens, and a lock conflict
    surfaces as DirectoryLockedError from that call, not from the constructor."""

    async def main() -> None:
        lazy = AsyncSafeClient(db, validator=None, standby=False)
        with pytest.raises(ClientClosedError, match="not open yet"):
            lazy.stats()
        assert await lazy.heartbeat() > 0
        assert lazy.stats().worker_pid is not None
        await lazy.aclose()
        with pytest.raises(TypeError):
            AsyncSafeClient(db, no_such_option=1)

    run(main)


# -- one policy ------------------------------------------------------------------------------


def test_same_errors_breaker_and_hooks_as_the_sync_client(db: str) -> None:
    """Crashes, the breaker and on_event behave exactly as in the sync API (one policy)."""
    events: list[safechroma.Event] = []

    async def main() -> None:
        policy = BreakerPolicy(max_deaths=2, window=60, cooldown=300)
        async with AsyncSafeClient(
            db, validator=None, breaker=policy, sleep=lambda s: None, on_event=events.append
        ) as client:
            first = client.stats().worker_pid
            with pytest.raises(WorkerCrashedError) as info:
                await client.run_in_worker(faults.sigsegv)
            assert (info.value.signal, info.value.exitcode, info.value.pid) == (
                "SIGSEGV",
                -11,
                first,
            )
            assert "Segmentation fault" in info.value.crash_log
            # The first worker had served the opening call (its death was bad luck); these two
            # die at their first call: a crash loop for max_deaths=2.
            with pytest.raises(WorkerCrashedError):
                await client.run_in_worker(faults.sigbus)
            with pytest.raises(WorkerCrashedError):
                await client.run_in_worker(faults.sigabrt)
            with pytest.raises(CrashLoopError):
                await client.heartbeat()
            assert client.stats().breaker_open
            await client.reset_breaker()
            assert await client.heartbeat() > 0
            assert client.stats().deaths == {"SIGSEGV": 1, "SIGBUS": 1, "SIGABRT": 1}

    run(main)
    kinds = [e.kind for e in events]
    assert kinds.count("worker_died") == 3 and "breaker_open" in kinds
    assert "breaker_reset" in kinds


def test_call_timeout_is_per_task(db: str) -> None:
    """call_timeout() set in one task bounds that task's call only (the context travels with
    the call to the thread); the loop keeps running while the hung worker is killed. The other
    task's read was in the worker at the same time: the kill is a death like any other for it,
    so it is retried on the next worker and answered, under its own 30 s deadline."""

    async def main() -> tuple[float, float]:
        async with AsyncSafeClient(db, validator=None, timeout=30) as client:
            col = await client.create_collection(
                "slow", embedding_function=SlowEmbedding(delay=1.0)
            )
            await col.add(ids=["a"], embeddings=[[0.5] * DIM], documents=["apple"])
            beat = Heartbeat()
            beat.start()

            async def long_but_fine() -> list[list[str]]:
                return (await col.query(query_texts=["apple"], n_results=1))["ids"]

            async def bounded_hang() -> None:
                with safechroma.call_timeout(0.5):
                    await client.run_in_worker(faults.hang)

            fine = asyncio.create_task(long_but_fine())
            await asyncio.sleep(0.05)  # started before the hang: must not inherit 0.5 s
            hung = asyncio.create_task(bounded_hang())
            start = time.monotonic()
            with pytest.raises(WorkerTimeoutError) as info:
                await hung
            assert await fine == [["a"]]
            elapsed = time.monotonic() - start
            assert info.value.timeout == 0.5 and isinstance(info.value, TimeoutError)
            assert await client.heartbeat() > 0  # a fresh worker
            stats = client.stats()
            assert stats.timeouts == 1 and stats.deaths == {"timeout": 1}  # one death
            return elapsed, await beat.stop()

    elapsed, late = run(main)
    print(f"\ncall_timeout test: max loop lateness {late * 1000:.1f} ms")
    assert elapsed < 10
    assert late < MAX_LATENESS


def _sleep_then_pid(_client: Any, seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


# -- many tasks, real signals --------------------------------------------------------------


def test_fifty_tasks_survive_signals_and_the_loop_never_waits(db: str) -> None:
    """50 concurrent tasks while the worker is killed mid-call with SIGKILL and SIGSEGV (and
    each time validated and respawned): every call gets the exact right result or a precise
    WorkerCrashedError, acknowledged writes are all there, and the loop stays responsive."""
    docs = {f"doc{i}": f"document number {i}" for i in range(40)}
    signals = [signal.SIGKILL, signal.SIGSEGV, signal.SIGKILL]

    async def main() -> dict[str, Any]:
        client = await AsyncSafeClient.create(db)
        col = await client.create_collection("busy", embedding_function=SlowEmbedding(0.005))
        await col.add(ids=list(docs), documents=list(docs.values()))
        killed: dict[int, str] = {}
        outcomes: list[tuple[str, str]] = []
        acked: dict[str, str] = {}
        unknown: dict[str, str] = {}
        stop = asyncio.Event()
        beat = Heartbeat()
        beat.start()

        def check_error(exc: BaseException, method: str, write: bool) -> None:
            assert isinstance(exc, WorkerCrashedError), repr(exc)
            assert exc.pid in killed and exc.signal == killed[exc.pid], (exc.pid, killed)
            assert exc.exitcode == -signal.Signals[exc.signal].value
            assert exc.operation in (method, "open", "release")
            assert exc.outcome_unknown == (write and exc.operation == method)

        async def task(n: int) -> None:
            rng = random.Random(n)
            i = 0
            while not stop.is_set() or i < 6:
                i += 1
                doc_id = rng.choice(list(docs))
                op = ("query", "get", "add")[i % 3]
                try:
                    if op == "query":
                        res = await col.query(query_texts=[docs[doc_id]], n_results=1)
                        assert res["ids"] == [[doc_id]] and res["documents"] == [[docs[doc_id]]]
                    elif op == "get":
                        res = await col.get(ids=[doc_id])
                        assert res["ids"] == [doc_id] and res["documents"] == [docs[doc_id]]
                    else:
                        new_id, text = f"t{n}-{i}", f"written by task {n} step {i}"
                        try:
                            await col.add(ids=[new_id], documents=[text])
                        except BaseException:
                            unknown[new_id] = text
                            raise
                        acked[new_id] = text
                    outcomes.append((op, "ok"))
                except WorkerCrashedError as exc:
                    check_error(exc, op, write=op == "add")
                    outcomes.append((op, exc.signal or "exit"))

        async def killer() -> None:
            for sig in signals:
                await asyncio.sleep(0.3)
                pid = client.stats().worker_pid
                assert pid is not None
                killed[pid] = sig.name
                os.kill(pid, sig)
                deadline = time.monotonic() + 30
                while client.stats().worker_pid in (None, pid):  # respawned (validated first)
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.005)
            await asyncio.sleep(0.3)
            stop.set()

        await asyncio.gather(killer(), *(task(n) for n in range(50)))
        late = await beat.stop()
        stats = client.stats()
        got = await col.get(include=["documents"])
        await client.aclose()
        return {
            "late": late,
            "beats": beat.beats,
            "stats": stats,
            "outcomes": outcomes,
            "acked": acked,
            "unknown": unknown,
            "got": dict(zip(got["ids"], got["documents"], strict=False)),
        }

    r = run(main)
    stats, outcomes = r["stats"], r["outcomes"]
    errors = [o for o in outcomes if o[1] != "ok"]
    print(
        f"\n50 tasks: {len(outcomes)} calls, {len(errors)} precise errors {errors}, "
        f"deaths {stats.deaths}, respawns {stats.respawns}, "
        f"max loop lateness {r['late'] * 1000:.1f} ms over {r['beats']} beats"
    )
    assert stats.deaths == {"SIGKILL": 2, "SIGSEGV": 1}
    assert stats.respawns == 3
    assert len(outcomes) >= 50 * 6
    # Reads are retried on a fresh worker, so every read was answered (and exactly, above).
    assert all(res == "ok" for op, res in outcomes if op != "add")
    got = r["got"]
    for new_id, text in r["acked"].items():
        assert got.get(new_id) == text  # no acknowledged write lost
    for new_id, text in r["unknown"].items():
        assert got.get(new_id) in (None, text)  # applied in full or absent
    expected = set(docs) | set(r["acked"]) | (set(r["unknown"]) & set(got))
    assert set(got) == expected
    assert r["late"] < MAX_LATENESS


# -- cancellation ----------------------------------------------------------------------------


class MarkingEmbedding(HashEmbedding):
    """Touches ``<folder>/<first document>`` in the worker, then takes ``delay`` seconds: a test
    sees exactly which calls reached the worker."""

    def __init__(self, folder: str = "", delay: float = 0.0) -> None:
        super().__init__(DIM)
        self.folder = folder
        self.delay = delay

    def __call__(self, input: Any) -> Any:  # noqa: A002 - chromadb's name
        if self.folder:
            Path(self.folder, input[0]).touch()
            time.sleep(self.delay)
        return super().__call__(input)

    @staticmethod
    def name() -> str:
        return "safechroma-test-marking-hash"

    def get_config(self) -> dict[str, Any]:
        return {"folder": self.folder, "delay": self.delay}

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> MarkingEmbedding:
        return MarkingEmbedding(**config)


def test_cancelled_calls_in_flight_complete_queued_one_is_never_sent(
    db: str, tmp_path: Path
) -> None:
    """Cancelling is immediate for the callers. The client's pool is full of writes that are
    inside the worker (all at once: they run in parallel); one more write waits in the queue.
    All are cancelled: the writes in the worker are applied and their replies consumed (later
    callers get their own replies), the queued write never reaches the worker."""
    from safechroma.runtime.channels import MAX_CHANNELS

    seen = tmp_path / "seen"
    seen.mkdir()

    async def main() -> None:
        async with AsyncSafeClient(db, validator=None, standby=False) as client:
            col = await client.create_collection(
                "cancel", embedding_function=MarkingEmbedding(str(seen), delay=0.6)
            )
            beat = Heartbeat()
            beat.start()
            running = [
                asyncio.create_task(col.add(ids=[f"slow{i}"], documents=[f"slow{i}"]))
                for i in range(MAX_CHANNELS)
            ]
            deadline = time.monotonic() + 30
            while len(list(seen.iterdir())) < MAX_CHANNELS:  # every thread is in the worker
                assert time.monotonic() < deadline, sorted(p.name for p in seen.iterdir())
                await asyncio.sleep(0.005)
            queued = asyncio.create_task(col.add(ids=["queued"], documents=["queued"]))
            await asyncio.sleep(0.05)
            start = time.monotonic()
            for t in [*running, queued]:
                t.cancel()
            done, _ = await asyncio.wait([*running, queued])
            assert time.monotonic() - start < 0.2  # the callers are not held by the worker
            assert all(t.cancelled() for t in done)
            # The writes in the worker complete on their own; each later call gets its own reply.
            slow = [f"slow{i}" for i in range(MAX_CHANNELS)]
            while await col.count() < MAX_CHANNELS:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            got = await col.get(ids=[*slow, "queued", "nothing"], include=["documents"])
            assert sorted(zip(got["ids"], got["documents"], strict=True)) == sorted(
                (s, s) for s in slow
            )
            answers = await asyncio.gather(*(col.get(ids=[s], include=[]) for s in slow))
            assert [a["ids"] for a in answers] == [[s] for s in slow]
            assert not (seen / "queued").exists()  # withdrawn before it reached the worker
            assert await col.count() == MAX_CHANNELS
            assert await beat.stop() < MAX_LATENESS

    run(main)


def test_aclose_waits_for_a_cancelled_write_in_flight(db: str, tmp_path: Path) -> None:
    """aclose() right after cancelling a write that is in the worker does not kill it: the
    write is durable when a new client opens the directory; later calls get ClientClosedError."""
    marker = tmp_path / "in-flight"

    async def main() -> float:
        client = await AsyncSafeClient.create(db, validator=None, standby=False)
        col = await client.create_collection(
            "closing", embedding_function=SlowEmbedding(marker=str(marker), slow_delay=0.6)
        )
        write = asyncio.create_task(col.add(ids=["slow"], documents=["slow but acknowledged"]))
        await wait_for_file(marker)
        write.cancel()
        start = time.monotonic()
        closing = asyncio.create_task(client.aclose())
        await asyncio.sleep(0)
        with pytest.raises(ClientClosedError):
            await col.count()  # closing has begun: no new calls
        await closing
        assert write.cancelled()
        return time.monotonic() - start

    waited = run(main)
    assert waited > 0.3  # it waited for the write (0.6 s in the worker)
    with SafeClient(db, validator=None, standby=False) as sync:
        got = sync.get_collection("closing", embedding_function=None).get(include=["documents"])
        assert (got["ids"], got["documents"]) == (["slow"], ["slow but acknowledged"])


def test_cancelling_aclose_still_closes(db: str) -> None:
    """The close runs to the end in the background even if its awaiting task is cancelled."""

    async def main() -> int:
        client = await AsyncSafeClient.create(db, validator=None, standby=False)
        pid = client.stats().worker_pid
        assert pid is not None
        task = asyncio.create_task(client.aclose())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await client.aclose()  # waits for the close already under way
        return pid

    pid = run(main)
    assert not Path(f"/proc/{pid}").exists()  # the worker was stopped and reaped


def test_cancellation_storm_then_every_result_is_exact(
    db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tasks cancelled at random points: every uncancelled call returns exactly its own data,
    every acknowledged add is present, every cancelled add is fully applied or fully absent,
    the count adds up, and calls after the storm are answered in step. The event loop never
    waits on the worker: no exchange with it, and no wait for a channel or a worker, runs in
    the loop's thread (checked by thread, not by a clock: with three test processes on two
    cores the loop's lateness measured up to 0.69 s from CPU and GIL contention alone)."""
    rng = random.Random(6)
    waited_in: set[int] = set()
    for cls, name in ((Channel, "exchange"), (Supervisor, "lease")):
        original = getattr(cls, name)

        def recorded(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            waited_in.add(threading.get_ident())
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, name, recorded)
    loop_thread: list[int] = []

    async def main() -> dict[str, Any]:
        loop_thread.append(threading.get_ident())
        client = await AsyncSafeClient.create(db, validator=None, standby=False)
        col = await client.create_collection("storm", embedding_function=SlowEmbedding(0.003))
        batches: dict[int, dict[str, str]] = {}
        acked: set[int] = set()
        verified: set[int] = set()
        beat = Heartbeat()
        beat.start()

        async def task(n: int) -> None:
            batch = {f"s{n}-{j}": f"storm task {n} record {j}" for j in range(3)}
            batches[n] = batch
            await col.add(ids=list(batch), documents=list(batch.values()))
            acked.add(n)
            got = await col.get(ids=list(batch), include=["documents"])
            assert dict(zip(got["ids"], got["documents"], strict=False)) == batch
            res = await col.query(query_texts=[batch[f"s{n}-0"]], n_results=1)
            assert res["ids"] == [[f"s{n}-0"]]
            assert await col.count() >= len(batch)
            verified.add(n)

        cancelled = 0
        for wave in range(4):
            tasks = [asyncio.create_task(task(wave * 40 + i)) for i in range(40)]
            for t in tasks:
                if rng.random() < 0.5:
                    asyncio.get_running_loop().call_later(rng.uniform(0, 0.25), t.cancel)
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for res in results:
                if isinstance(res, BaseException) and not isinstance(res, asyncio.CancelledError):
                    raise res  # a wrong result or an error: the storm broke something
            cancelled += sum(t.cancelled() for t in tasks)

        # After the storm: every call is answered with its own reply.
        probes = [f"s{n}-1" for n in sorted(acked)][:30]
        answers = await asyncio.gather(*(col.get(ids=[p], include=[]) for p in probes))
        assert [a["ids"] for a in answers] == [[p] for p in probes]
        got = await col.get(include=["documents"])
        count = await col.count()
        await client.aclose()
        return {
            "batches": batches,
            "acked": acked,
            "verified": verified,
            "count": count,
            "cancelled": cancelled,
            "late": await beat.stop(),
            "got": dict(zip(got["ids"], got["documents"], strict=False)),
        }

    r = run(main)
    got, batches = r["got"], r["batches"]
    applied_unacked = absent = 0
    for n, batch in batches.items():
        present = {k: got[k] for k in batch if k in got}
        if n in r["acked"]:
            assert present == batch
        elif present:
            assert present == batch  # all or nothing
            applied_unacked += 1
        else:
            absent += 1
    assert set(got) == {k for n, b in batches.items() for k in b if k in got}
    assert r["count"] == len(got) == 3 * (len(r["acked"]) + applied_unacked)
    assert r["cancelled"] >= 40 and r["verified"]  # the storm really hit, and work got done
    print(
        f"\nstorm: {len(batches)} tasks, {r['cancelled']} cancelled, {len(r['acked'])} adds "
        f"acknowledged, {applied_unacked} cancelled adds applied, {absent} absent, "
        f"max loop lateness {r['late'] * 1000:.1f} ms"
    )
    assert waited_in and loop_thread[0] not in waited_in


# -- the example -----------------------------------------------------------------------------


@pytest.mark.slow
def test_example_service_keeps_answering_through_crashes(tmp_path: Path) -> None:
    """python -m safechroma._examples.async_service runs by itself, survives a SIGSEGV, a
    segfaulting embedding and a SIGKILL, exits 0 and removes its temporary directory."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "safechroma._examples.async_service"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert time.monotonic() - start < 30
    text = out.stdout
    assert "OK: the service kept answering" in text
    assert "0 wrong, errors none" in text
    assert "worker deaths {'SIGSEGV': 2, 'SIGKILL': 1}, respawns 3" in text
    assert "poison request answered [['doc-" in text
    # Its temporary directory is gone; this user's rendezvous folder is left, empty.
    left = list(tmp_path.iterdir())
    assert [p.name for p in left] in ([], [f"safechroma-{os.getuid()}"])
    assert [list(p.iterdir()) for p in left] in ([], [[]])
