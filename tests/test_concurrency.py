"""Many callers at once (issue 10): parallel calls in the worker, and every crash guarantee with
many calls in flight.

Parallelism is shown without a clock: calls meet inside the worker at a barrier (files in a
folder) that they can only pass if they are all in the worker at the same time; calls served one
at a time would wait at it until its bounded wait gave up, and the test would fail. The crash
matrix with 8 threads and with 32 asyncio tasks in the worker when it dies is two rows of the
one crash matrix (tests/crash_matrix.py, run by tests/test_crash.py::test_crash_matrix).
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from pathlib import Path
from typing import Any

from conftest import embed_text
from crash_matrix import arrive

from safechroma import (
    AsyncSafeClient,
    SafeClient,
)


def _meet(_client: Any, folder: str, name: str, count: int) -> bool:
    return arrive(folder, name, count)


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


# -- one death seen by many ---------------------------------------------------------------


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
