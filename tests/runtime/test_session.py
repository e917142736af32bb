"""The call path's logic (retry, remote errors, deaths, poison) against an in-process fake worker.

The supervisor takes its worker processes from one starter (``Supervisor(starter=...)``); here
the starter hands it a :class:`FakeWorker` whose channels decode each request with the real
protocol and answer it from a handler in this process. Nothing is killed: a "death" is the fake
closing its channel with an exit status, as a real worker's socket would close. The real-process
crash tests (test_crash.py, test_breaker.py) are the evidence of crash handling; these pin the
decisions taken on top of it.
"""

from __future__ import annotations

import itertools
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import chromadb.errors
import pytest

from safechroma import (
    CrashLoopError,
    Options,
    PoisonRequestError,
    WorkerCrashedError,
    WorkerStartError,
)
from safechroma.runtime.handles import Remote
from safechroma.runtime.protocol import (
    CollectionRef,
    Op,
    Request,
    Status,
    decode_request,
    encode,
    error_info,
)
from safechroma.runtime.replies import RemoteTraceback
from safechroma.runtime.session import Session
from safechroma.runtime.transport import PeerDied

_serials = itertools.count(1_000_000)


class Died(Exception):
    """Raised by a handler: the fake worker dies with ``code`` while serving the request."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


Handler = Callable[["FakeWorker", Op, Any], Any]


class FakeChannel:
    """One channel to a :class:`FakeWorker`: the real encoding both ways, no socket."""

    def __init__(self, worker: FakeWorker) -> None:
        self.worker = worker
        self.closed = False

    def exchange(self, data: bytes, buffers: list[Any], deadline: float | None) -> Any:
        worker = self.worker
        if worker.returncode is not None or self.closed:
            raise PeerDied("the fake worker is gone")
        op, body = decode_request(data, [bytearray(b) for b in buffers])
        try:
            reply: tuple[int, Any, float] = (Status.OK, worker.handler(worker, Op(op), body), 0.0)
        except Died as death:
            worker.returncode = death.code
            raise PeerDied("the fake worker died") from None
        except Exception as exc:  # noqa: BLE001 - a Chroma error, reported as the worker does
            reply = (Status.ERROR, error_info(exc, "Traceback (fake worker)"), 0.0)
        # The worker sends plain ints: an enum member would be refused by the reply unpickler.
        out, out_buffers = encode((int(reply[0]), reply[1], reply[2]))
        return out, [bytearray(b) for b in out_buffers]

    def close(self) -> None:
        self.closed = True


class FakeWorker:
    """Quacks like :class:`safechroma.runtime.transport.WorkerProcess`, in this process."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.serial = next(_serials)
        self.pid = self.serial  # never a real process: nothing is ever signalled
        self.started = time.monotonic()
        self.rss_checked = self.started
        self.served = 0
        self.opened = False
        self.returncode: int | None = None
        self.log_path = ""
        self.requests: list[tuple[Op, Any]] = []

    def open_channel(self) -> FakeChannel:
        if self.returncode is not None:
            raise PeerDied("the fake worker is gone")
        return FakeChannel(self)

    def alive(self) -> bool:
        return self.returncode is None

    def wait(self, timeout: float | None) -> int | None:
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            self.returncode = -9

    def close(self) -> None:
        pass

    def log_tail(self, limit: int = 4000) -> str:
        return ""

    def rss_bytes(self) -> int | None:
        return None


class Target(Remote):
    """A caller-side object with a handle in the worker, as a client is."""

    id = "target"

    def _reopen_request(self, path: str, parent_handle: int) -> Request:
        return Request(Op.OPEN, (path, None, "tenant", "database", None))


def serve(method_handler: Callable[[FakeWorker, str, tuple[Any, ...]], Any]) -> Handler:
    """A handler that opens and exits like a worker and hands calls to ``method_handler``."""

    def handler(worker: FakeWorker, op: Op, body: Any) -> Any:
        worker.requests.append((op, body))
        if op is Op.OPEN:
            return ("client", 1, "fake")
        if op is Op.CALL:
            _handle, method, args, _kwargs = body
            return method_handler(worker, method, args)
        if op is Op.EXIT:
            worker.returncode = 0
            return None
        return None

    return handler


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Callable[..., tuple[Session, list[FakeWorker]]]]:
    opened: list[Session] = []

    def make(
        method_handler: Callable[[FakeWorker, str, tuple[Any, ...]], Any], **options: Any
    ) -> tuple[Session, list[FakeWorker]]:
        workers: list[FakeWorker] = []

        def starter(_sup: Any) -> Any:
            workers.append(FakeWorker(serve(method_handler)))
            return workers[-1]

        slept: list[float] = []
        settings: dict[str, Any] = {
            "validator": lambda ctx: types.SimpleNamespace(healthy=True),
            "sleep": slept.append,  # back-off is recorded, never slept
            **options,
        }
        opts = Options(exclusive=True, **settings)
        sup = Session(str(tmp_path), opts, (None, "tenant", "database"), starter=starter)
        opened.append(sup)
        return sup, workers

    yield make
    for sup in opened:
        sup.close()


def opened(workers: list[FakeWorker]) -> list[FakeWorker]:
    """The workers that opened the directory (a standby spawned ahead of need has not)."""
    return [w for w in workers if w.opened]


def call(sup: Session, method: str, *args: Any, read: bool = True) -> Any:
    return sup.call(Target(), method, args, {}, read=read, replay=False, retries=2, timeout=5.0)


def test_a_reply_is_the_result_and_a_collection_comes_back_named(session: Any) -> None:
    def methods(worker: FakeWorker, method: str, args: tuple[Any, ...]) -> Any:
        if method == "get_collection":
            return ("collection", 7, {"name": args[0]})
        return 42

    sup, workers = session(methods)
    assert call(sup, "count") == 42
    ref = call(sup, "get_collection", "docs")
    assert isinstance(ref, CollectionRef)
    assert (ref.handle, ref.model, ref.serial) == (7, {"name": "docs"}, workers[0].serial)
    assert sup.stats().calls >= 2 and opened(workers) == workers[:1]


def test_a_chroma_error_arrives_as_chromas_type_with_the_remote_traceback(session: Any) -> None:
    def methods(worker: FakeWorker, method: str, args: tuple[Any, ...]) -> Any:
        raise chromadb.errors.NotFoundError("Collection [docs] does not exist")

    sup, workers = session(methods)
    with pytest.raises(chromadb.errors.NotFoundError, match="does not exist") as info:
        call(sup, "get_collection", "docs")
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert opened(workers) == workers[:1]  # an error is an answer: the worker stays
    assert sup.stats().errors == 1


def test_a_death_during_a_write_leaves_its_outcome_unknown_and_is_not_retried(
    session: Any,
) -> None:
    def methods(worker: FakeWorker, method: str, args: tuple[Any, ...]) -> Any:
        if method == "add" and worker is workers[0]:
            raise Died(-11)
        return None

    sup, workers = session(methods)
    with pytest.raises(WorkerCrashedError) as info:
        call(sup, "add", "a", read=False)
    assert info.value.outcome_unknown is True
    assert info.value.signal == "SIGSEGV" and info.value.operation == "add"
    assert len(opened(workers)) == 1  # not replayed
    assert call(sup, "add", "b", read=False) is None  # the next call gets a fresh worker
    assert len(opened(workers)) == 2
    assert sup.stats().deaths == {"SIGSEGV": 1}


def test_a_read_is_retried_on_a_fresh_worker(session: Any) -> None:
    def methods(worker: FakeWorker, method: str, args: tuple[Any, ...]) -> Any:
        if worker is workers[0]:
            raise Died(-7)
        return 3

    sup, workers = session(methods)
    assert call(sup, "count") == 3
    assert len(opened(workers)) == 2 and sup.stats().respawns == 1


def test_a_call_that_kills_every_worker_becomes_poison_and_is_refused(session: Any) -> None:
    def methods(worker: FakeWorker, method: str, args: tuple[Any, ...]) -> Any:
        if method == "query" and args == ("deadly",):
            raise Died(-11)
        return "fine"

    sup, workers = session(methods)
    with pytest.raises(PoisonRequestError) as struck:
        call(sup, "query", "deadly")
    assert struck.value.sent is True and struck.value.pid == workers[-1].pid
    assert len(opened(workers)) == 2  # the first try and its retry, alone
    with pytest.raises(PoisonRequestError) as refused:
        call(sup, "query", "deadly")
    assert refused.value.sent is False
    live = opened(workers)[-1]
    assert live.alive() and (Op.CALL, (1, "query", ("deadly",), {})) not in live.requests
    assert call(sup, "query", "harmless") == "fine"  # other calls are served
    sup.reset_breaker()
    with pytest.raises(WorkerCrashedError):
        call(sup, "query", "deadly", read=False)  # forgotten: sent again


def test_without_a_validator_no_call_is_poison(session: Any) -> None:
    def methods(worker: FakeWorker, method: str, args: tuple[Any, ...]) -> Any:
        raise Died(-11)

    sup, workers = session(methods, validator=None)
    with pytest.raises(WorkerCrashedError):
        call(sup, "query", "deadly")
    assert len(opened(workers)) == 3  # the first try and two retries


def test_workers_dying_at_open_back_off_then_open_the_breaker(tmp_path: Path) -> None:
    """Every worker after the first dies while opening: the respawns back off (recorded, not
    slept) and the breaker opens after five deaths without progress; reset_breaker() lets the
    next call start a worker at once."""
    workers: list[FakeWorker] = []
    slept: list[float] = []
    healthy = [False]

    def handler(worker: FakeWorker, op: Op, body: Any) -> Any:
        if op is Op.OPEN and len(workers) > 1 and not healthy[0]:
            raise Died(-11)
        return serve(lambda w, method, args: 1)(worker, op, body)

    def starter(_sup: Any) -> Any:
        workers.append(FakeWorker(handler))
        return workers[-1]

    opts = Options(exclusive=True, validator=None, standby=False, sleep=slept.append)
    sup = Session(str(tmp_path), opts, (None, "tenant", "database"), starter=starter)
    try:
        assert call(sup, "count") == 1
        workers[0].returncode = -11  # it dies between calls, after serving one: progress
        starts = 0
        with pytest.raises(CrashLoopError, match="5 workers died without serving a call"):
            while True:
                try:
                    call(sup, "count")
                except WorkerStartError:
                    starts += 1
                    assert starts < 10
        stats = sup.stats()
        assert stats.breaker_open and starts >= 1
        assert stats.deaths == {"SIGSEGV": 6}  # the first worker (progress) and five at open
        # Back-off after the second death in a row without progress, growing.
        assert len(slept) == 3 and slept == sorted(slept) and slept[0] > 0, slept
        healthy[0] = True
        sup.reset_breaker()
        assert call(sup, "count") == 1
    finally:
        sup.close()
