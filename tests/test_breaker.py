"""The crash-loop breaker and poison requests (issue 13, part 1).

A crash loop is workers that die without making progress; a worker killed after serving calls
is bad luck. Everything here runs with real workers, real signals and default options; the pure
``Breaker`` object has its unit tests in tests/runtime/test_breaker.py.
"""

from __future__ import annotations

import ctypes
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import faults
import pytest
from chromadb.api.types import Documents, EmbeddingFunction, Embeddings
from conftest import embed_text

from safechroma import (
    CrashLoopError,
    PoisonRequestError,
    SafeClient,
    WorkerCrashedError,
    WorkerStartError,
)

# -- real workers ---------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_storm_under_four_writers_never_opens_the_breaker(db: str) -> None:
    """The check of issue 13 part 1, on default options: four threads upsert for 25 s while the
    worker is SIGKILLed every 1 to 2.5 s. Every worker served calls before it died, so no
    caller ever gets CrashLoopError; every acknowledged upsert is there afterwards, and a write
    whose outcome is unknown is one of its two possible states."""
    seconds = float(os.environ.get("SAFECHROMA_STORM_SECONDS", "25"))
    ledger: dict[str, set[str]] = {}  # id -> documents it may hold
    errors: list[BaseException] = []
    lock = threading.Lock()
    stop = threading.Event()
    acked = [0]

    with SafeClient(db) as client:
        col = client.create_collection("storm", embedding_function=None)

        def writer(tid: int) -> None:
            rng = random.Random(tid)
            version = 0
            while not stop.is_set():
                version += 1
                rid = f"t{tid}-{rng.randrange(40)}"
                doc = f"{rid} v{version}"
                try:
                    col.upsert(ids=[rid], embeddings=[embed_text(doc, 8)], documents=[doc])
                except WorkerCrashedError as exc:
                    assert exc.outcome_unknown
                    with lock:
                        ledger[rid] = ledger.get(rid, {None}) | {doc}  # type: ignore[arg-type]
                    continue
                except BaseException as exc:  # noqa: BLE001 - anything else is a failure
                    with lock:
                        errors.append(exc)
                    return
                with lock:
                    ledger[rid] = {doc}
                    acked[0] += 1

        threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        kills = 0
        rng = random.Random(99)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(rng.uniform(1.0, 2.5))
            pid = client.stats().worker_pid
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                    kills += 1
                except ProcessLookupError:
                    pass
        stop.set()
        for t in threads:
            t.join()
        assert errors == [], errors
        assert kills >= 8 and sum(client.stats().deaths.values()) >= kills - 1
        assert not client.stats().breaker_open
        got = col.get(ids=sorted(ledger), include=["documents"])
        held = dict(zip(got["ids"], got["documents"], strict=True))
        for rid, allowed in ledger.items():
            assert held.get(rid) in allowed, (rid, held.get(rid), allowed)
        assert acked[0] > 200


class CrashOnBoom(EmbeddingFunction[Documents]):
    """Embeds like the suite's hash embedding, but dereferences NULL on the text "boom": a
    request that deterministically kills the worker on a healthy directory."""

    def __init__(self) -> None:
        pass

    def __call__(self, input: Documents) -> Embeddings:  # noqa: A002 - chromadb's name
        if "boom" in input:
            ctypes.string_at(0)
        return [embed_text(t, 8) for t in input]  # type: ignore[misc]

    @staticmethod
    def name() -> str:
        return "safechroma-test-crash-on-boom"

    def get_config(self) -> dict[str, Any]:
        return {}

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> CrashOnBoom:
        return CrashOnBoom()

    def is_legacy(self) -> bool:
        return False


def test_a_poison_request_is_refused_and_others_are_served(db: str) -> None:
    """The same query kills two workers on a healthy directory: its caller gets
    PoisonRequestError, it is never sent again, and concurrent readers are served throughout
    without an error. reset_breaker() forgets it.

    The readers' calls run in the worker beside the query, so its first death is nobody's
    fault in particular (the readers' calls were in flight too): it strikes no call. Its
    retries run alone, and those two deaths make it poison: three deaths in all."""
    with SafeClient(db) as client:
        col = client.create_collection("poison", embedding_function=CrashOnBoom())
        col.add(ids=["a", "b"], documents=["apple", "bicycle"])
        stop = threading.Event()
        served = [0]
        reader_errors: list[BaseException] = []

        def reader() -> None:
            while not stop.is_set():
                try:
                    assert col.count() == 2
                    assert col.get(ids=["a"])["documents"] == ["apple"]
                    served[0] += 1
                except BaseException as exc:  # noqa: BLE001
                    reader_errors.append(exc)
                    return

        threads = [threading.Thread(target=reader) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            with pytest.raises(PoisonRequestError) as info:
                col.query(query_texts=["boom"], n_results=1)
            assert info.value.sent and info.value.operation == "query"
            assert isinstance(info.value.__cause__, WorkerCrashedError)
            assert info.value.__cause__.signal == "SIGSEGV"
            assert client.stats().deaths == {"SIGSEGV": 3}  # one try beside others, two retries
            before = served[0]
            with pytest.raises(PoisonRequestError) as again:
                col.query(query_texts=["boom"], n_results=1)
            assert not again.value.sent and "was not sent" in str(again.value)
            assert client.stats().deaths == {"SIGSEGV": 3}
            assert col.query(query_texts=["bicycle"], n_results=1)["ids"] == [["b"]]
            deadline = time.monotonic() + 10
            while served[0] <= before and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert reader_errors == [] and served[0] > 0
        client.reset_breaker()  # forgets the poison: the call is sent (and kills) again
        with pytest.raises(PoisonRequestError) as third:
            col.query(query_texts=["boom"], n_results=1)
        # The readers have stopped: alone, one try and one retry make it poison.
        assert third.value.sent and client.stats().deaths == {"SIGSEGV": 5}


def test_sigkills_from_outside_are_bad_luck_never_poison_or_a_crash_loop(db: str) -> None:
    """A SIGKILL (the OOM killer, an operator) says nothing about the worker or the call in
    flight: the same call killed by it at each fresh worker's first call, more often than
    max_deaths, stays a plain crash; never a poison request, never a crash loop."""
    with SafeClient(db) as client:
        for _ in range(7):
            with pytest.raises(WorkerCrashedError) as info:
                client.run_in_worker(faults.sigkill)
            assert type(info.value) is WorkerCrashedError and info.value.signal == "SIGKILL"
        assert client.heartbeat() > 0 and not client.stats().breaker_open


def test_every_worker_dying_at_open_opens_the_breaker_after_five(db: str, tmp_path: Path) -> None:
    """A directory on which every new worker dies while opening, default options: the breaker
    opens after the stated five deaths without progress, as before (the first worker, killed
    after it served the opening call, does not count)."""
    marker = tmp_path / "crash-at-open"

    def init() -> None:
        if os.path.exists(marker):
            faults.sigsegv()

    with SafeClient(db, validator=None, worker_init=init, sleep=lambda _s: None) as client:
        pid = client.stats().worker_pid
        assert pid is not None
        marker.touch()
        os.kill(pid, signal.SIGKILL)
        seen: list[type[BaseException]] = []
        while True:
            try:
                client.heartbeat()
            except CrashLoopError as exc:
                assert "5 workers died without serving a call" in str(exc)
                break
            except WorkerStartError as exc:
                seen.append(type(exc))
                assert len(seen) < 10
        deaths = sum(client.stats().deaths.values())
        assert deaths == 6  # the killed one (progress) and five that died at open
