"""A small asyncio search service that keeps answering while its worker is crashed under it.

Run it with ``python -m safechroma._examples.async_service``. It needs no network and no model:
the embedding function is a toy defined here. It:

1. opens a fresh directory with :class:`safechroma.AsyncSafeClient` and indexes 200 documents;
2. runs 20 concurrent "request handlers" that query it in a loop and check every answer, and a
   heartbeat task that measures how late the event loop wakes up;
3. meanwhile crashes the worker three ways: a real SIGSEGV sent with ``os.kill``, a "poison"
   request whose embedding dereferences NULL inside the worker (a genuine segfault), and a
   SIGKILL;
4. prints what happened and exits 0 if every request got the right answer and the service
   kept answering after each crash.

It finishes by itself in a few seconds and removes its temporary directory.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import hashlib
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

import numpy as np
from chromadb.api.types import Documents, EmbeddingFunction, Embeddings

from safechroma import AsyncSafeClient, Event, SafeChromaError

DIM = 32
POISON = "the poison request"
HANDLERS = 20
PAUSE = 0.6  # seconds of normal traffic between crashes


class ToyEmbedding(EmbeddingFunction[Documents]):
    """A deterministic hash embedding; the poison text segfaults the worker once."""

    def __init__(self, poison_marker: str) -> None:
        self.poison_marker = poison_marker

    def __call__(self, input: Documents) -> Embeddings:  # noqa: A002 - chromadb's name
        out: list[Any] = []
        for text in input:
            if text == POISON and os.path.exists(self.poison_marker):
                os.unlink(self.poison_marker)  # only the first worker that sees it dies
                ctypes.string_at(0)  # a genuine SIGSEGV, inside the worker process
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
            out.append(np.random.default_rng(seed).random(DIM, dtype=np.float32))
        return out

    @staticmethod
    def name() -> str:
        return "safechroma-example-toy"

    def get_config(self) -> dict[str, str]:
        return {"poison_marker": self.poison_marker}

    @staticmethod
    def build_from_config(config: dict[str, str]) -> ToyEmbedding:
        return ToyEmbedding(config["poison_marker"])


def say(started: float, text: str) -> None:
    print(f"[{time.monotonic() - started:6.2f}s] {text}", flush=True)


async def service(workdir: str) -> int:
    started = time.monotonic()
    marker = os.path.join(workdir, "poison-armed")

    def on_event(event: Event) -> None:  # called in the client's thread
        if event.kind in ("worker_started", "worker_died", "validated"):
            detail = {
                k: v
                for k, v in event.detail.items()
                if k in ("signal", "operation", "healthy", "reason")
            }
            say(started, f"  event {event.kind} pid={event.pid} {detail}")

    async with AsyncSafeClient(os.path.join(workdir, "db"), on_event=on_event) as client:
        col = await client.get_or_create_collection(
            "articles", embedding_function=ToyEmbedding(marker)
        )
        docs = {f"doc-{i}": f"article number {i} about topic {i % 7}" for i in range(200)}
        await col.add(ids=list(docs), documents=list(docs.values()))
        say(
            started,
            f"indexed {await col.count()} documents; worker pid {client.stats().worker_pid}",
        )

        answered: list[float] = []  # time of each correct answer
        wrong: list[str] = []
        failures: collections.Counter[str] = collections.Counter()
        stop = asyncio.Event()
        lateness = [0.0]

        async def handler(n: int) -> None:
            rng = random.Random(n)
            while not stop.is_set():
                doc_id = rng.choice(list(docs))
                try:
                    res = await col.query(query_texts=[docs[doc_id]], n_results=1)
                except SafeChromaError as exc:  # a precise error, never a dead service
                    failures[type(exc).__name__] += 1
                    continue
                if res["ids"] == [[doc_id]]:
                    answered.append(time.monotonic())
                else:
                    wrong.append(f"{doc_id} -> {res['ids']}")

        async def heartbeat() -> None:
            loop = asyncio.get_running_loop()
            while not stop.is_set():
                t = loop.time()
                await asyncio.sleep(0.005)
                lateness[0] = max(lateness[0], loop.time() - t - 0.005)

        async def wait_for_new_worker(old: int | None) -> int | None:
            for _ in range(1000):
                pid = client.stats().worker_pid
                if pid not in (None, old):
                    return pid
                await asyncio.sleep(0.01)
            return None

        crash_times: list[float] = []

        async def chaos() -> None:
            if sys.platform == "win32":  # it kills the worker with POSIX signals
                raise SystemExit("this example runs on Linux and macOS")
            await asyncio.sleep(PAUSE)
            pid = client.stats().worker_pid
            say(started, f"chaos: os.kill({pid}, SIGSEGV) while {HANDLERS} requests are in flight")
            crash_times.append(time.monotonic())
            assert pid is not None
            os.kill(pid, signal.SIGSEGV)
            say(started, f"chaos: service now served by worker {await wait_for_new_worker(pid)}")
            await asyncio.sleep(PAUSE)

            open(marker, "w").close()
            pid = client.stats().worker_pid
            say(
                started, f"chaos: sending the poison request (its embedding segfaults worker {pid})"
            )
            crash_times.append(time.monotonic())
            res = await col.query(query_texts=[POISON], n_results=1)
            say(
                started,
                f"chaos: poison request answered {res['ids']} by worker "
                f"{client.stats().worker_pid} (the read was retried on a fresh one)",
            )
            await asyncio.sleep(PAUSE)

            pid = client.stats().worker_pid
            say(started, f"chaos: os.kill({pid}, SIGKILL)")
            crash_times.append(time.monotonic())
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            say(started, f"chaos: service now served by worker {await wait_for_new_worker(pid)}")
            await asyncio.sleep(PAUSE)
            stop.set()

        await asyncio.gather(chaos(), heartbeat(), *(handler(n) for n in range(HANDLERS)))

        stats = client.stats()
        after_each = [sum(1 for t in answered if t > c) for c in crash_times]
        say(
            started,
            f"done: {len(answered)} requests answered correctly, {len(wrong)} wrong, "
            f"errors {dict(failures) or 'none'}",
        )
        say(
            started,
            f"worker deaths {stats.deaths}, respawns {stats.respawns}; answers after "
            f"each crash: {after_each}",
        )
        say(started, f"event loop: max lateness {lateness[0] * 1000:.1f} ms")
        ok = not wrong and not failures and all(after_each) and len(stats.deaths) > 0
        say(started, "OK: the service kept answering" if ok else "FAILED")
        return 0 if ok else 1


def main() -> int:
    workdir = tempfile.mkdtemp(prefix="safechroma-example-")
    try:
        return asyncio.run(service(workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
