"""``SafeHttpClient`` / ``AsyncSafeHttpClient`` against real Chroma servers (issue 14).

Servers are a real ``safechroma serve`` or a plain ``chroma run`` on free ports of 127.0.0.1,
hit with real signals. Only the 429/503 backoff uses a small HTTP server written here (Chroma
never answers 429 itself); classification is a pure function and is tested as one.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import pickle
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from chromadb.config import Settings
from chromadb.errors import InvalidArgumentError, NotFoundError

sys.path.insert(0, os.path.dirname(__file__))
import chroma_dirs  # noqa: E402
from servers import PlainChroma, Serve, alive, free_port  # noqa: E402

import safechroma  # noqa: E402
from safechroma import (  # noqa: E402
    AsyncSafeHttpClient,
    CrashLoopError,
    Event,
    SafeChromaError,
    SafeHttpClient,
    ServerTimeoutError,
    ServerUnavailableError,
)
from safechroma.api.http import classify  # noqa: E402

N, DIM = 300, 8


def no_telemetry() -> Settings:
    return Settings(anonymized_telemetry=False)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("http") / "db"
    chroma_dirs.make_collection_dir(str(root), n=N, dim=DIM, sync_threshold=100)
    return str(root)


@pytest.fixture
def served(template: str, tmp_path: Path) -> Iterator[Serve]:
    path = str(tmp_path / "db")
    shutil.copytree(template, path)
    with Serve(path, free_port(), tmp_path) as serve:
        yield serve


def _wait_dead(pid: int) -> None:
    give_up = time.monotonic() + 30
    while alive(pid) and time.monotonic() < give_up:
        time.sleep(0.02)
    assert not alive(pid)


def _first_hits(col: Any) -> list[str]:
    res = col.query(query_embeddings=chroma_dirs.vectors("coll", N, DIM), n_results=1)
    return [hit[0] for hit in res["ids"]]


def test_sigsegv_under_the_client_next_read_answers_and_writes_land(served: Serve) -> None:
    events: list[Event] = []
    client = SafeHttpClient(
        "127.0.0.1", served.port, settings=no_telemetry(), on_event=events.append
    )
    try:
        col = client.get_collection("coll", embedding_function=None)
        assert col.count() == N
        with pytest.raises(NotFoundError):  # Chroma's own errors stay chromadb's types
            client.get_collection("missing")
        with pytest.raises(InvalidArgumentError):
            col.add(ids=["bad"], embeddings=[[0.0] * (DIM + 1)])
        first = served.chroma_pid
        os.kill(first, signal.SIGSEGV)
        _wait_dead(first)
        # The next read: no exception, the right answer (the server is restarting meanwhile).
        assert _first_hits(col) == chroma_dirs.record_ids("coll", N)
        col.add(ids=["after-restart"], embeddings=[[0.25] * DIM], documents=["new"])
        assert col.get(ids=["after-restart"])["documents"] == ["new"]
        assert col.count() == N + 1
        stats = client.stats()
        assert stats.outages == 1 and stats.refused + stats.dropped >= 1 and stats.timeouts == 0
        kinds = [e.kind for e in events]
        assert "reconnected" in kinds and any(k.startswith("connection_") for k in kinds)
        assert served.chroma_pid != first
    finally:
        client.close()
    assert "died: SIGSEGV" in served.stderr()


def test_read_in_flight_when_the_server_dies_is_retried(served: Serve) -> None:
    """A read already sent when the server is killed (connection dropped mid-call) is sent
    again to the restarted server."""
    client = SafeHttpClient("127.0.0.1", served.port, settings=no_telemetry())
    try:
        col = client.get_collection("coll", embedding_function=None)
        chroma = served.chroma_pid
        os.kill(chroma, signal.SIGSTOP)  # the request will be sent and wait for an answer
        result: list[Any] = []
        reader = threading.Thread(target=lambda: result.append(col.count()))
        reader.start()
        time.sleep(0.5)
        os.kill(chroma, signal.SIGKILL)
        reader.join(60)
        assert result == [N]
        assert client.stats().dropped == 1
    finally:
        client.close()


def test_sigstop_read_under_a_deadline_raises_timeout_then_works_after_sigcont(
    served: Serve,
) -> None:
    client = SafeHttpClient("127.0.0.1", served.port, settings=no_telemetry())
    chroma = served.chroma_pid
    try:
        col = client.get_collection("coll", embedding_function=None)
        os.kill(chroma, signal.SIGSTOP)
        started = time.monotonic()
        with safechroma.call_timeout(3.0), pytest.raises(ServerTimeoutError) as info:
            col.query(query_embeddings=[[0.0] * DIM], n_results=1)
        elapsed = time.monotonic() - started
        assert 2.5 < elapsed < 8.0, elapsed
        assert isinstance(info.value, TimeoutError) and isinstance(info.value, SafeChromaError)
        assert info.value.timeout == 3.0 and info.value.operation == "query"
        assert not info.value.outcome_unknown  # a read
        os.kill(chroma, signal.SIGCONT)
        assert col.count() == N
        assert served.chroma_pid == chroma  # slow, not dead: not restarted
        assert client.stats().timeouts == 1
    finally:
        os.kill(chroma, signal.SIGCONT)
        client.close()


def test_writes_are_not_replayed_unless_asked(template: str, tmp_path: Path) -> None:
    """Against a plain ``chroma run``: a write in flight when the server dies raises with
    ``outcome_unknown``; with ``replay_writes=True`` the (idempotent) write is sent again
    once a server answers on the address."""
    path = str(tmp_path / "db")
    shutil.copytree(template, path)
    port = free_port()
    plain = PlainChroma(path, port, tmp_path).start()
    strict = SafeHttpClient("127.0.0.1", port, settings=no_telemetry())
    replaying = SafeHttpClient("127.0.0.1", port, settings=no_telemetry(), replay_writes=True)
    try:
        cols = [c.get_collection("coll", embedding_function=None) for c in (strict, replaying)]
        for c in cols:  # the first write also fetches the server's batch limit (a read)
            c.upsert(ids=["warm"], embeddings=[[0.0] * DIM])
        outcomes: list[Any] = [None, None]

        def write(i: int) -> None:
            try:
                cols[i].upsert(ids=[f"w{i}"], embeddings=[[0.1 * (i + 1)] * DIM])
                outcomes[i] = "ok"
            except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
                outcomes[i] = exc

        os.kill(plain.pid, signal.SIGSTOP)
        writers = [threading.Thread(target=write, args=(i,)) for i in (0, 1)]
        for w in writers:
            w.start()
        time.sleep(0.5)
        plain.kill(signal.SIGKILL)
        writers[0].join(30)
        error = outcomes[0]
        assert isinstance(error, ServerUnavailableError), error
        assert error.outcome_unknown and error.cause == "dropped" and error.operation == "upsert"
        assert "may or may not have been applied" in str(error)
        assert writers[1].is_alive()  # waiting for a server, within reconnect_timeout
        plain = PlainChroma(path, port, tmp_path).start()
        writers[1].join(60)
        assert outcomes[1] == "ok"
        got = cols[1].get(ids=["w1"], include=["embeddings"])
        assert got["ids"] == ["w1"]
        assert got["embeddings"][0][0] == pytest.approx(0.2)
    finally:
        strict.close()
        replaying.close()
        plain.stop()


def test_breaker_opens_after_repeated_outages(template: str, tmp_path: Path) -> None:
    path = str(tmp_path / "db")
    shutil.copytree(template, path)
    port = free_port()
    events: list[Event] = []
    plain = PlainChroma(path, port, tmp_path).start()
    client = SafeHttpClient("127.0.0.1", port, settings=no_telemetry(), on_event=events.append)
    try:
        col = client.get_collection("coll", embedding_function=None)
        outcomes: list[Any] = []
        for _ in range(5):  # BreakerPolicy(): 5 outages within 60 s
            plain.kill(signal.SIGKILL)

            def read() -> None:
                try:
                    outcomes.append(col.count())
                except CrashLoopError as exc:
                    outcomes.append(exc)

            reader = threading.Thread(target=read)
            reader.start()  # sees the refusal: one outage, then waits for the server
            time.sleep(0.3)
            plain = PlainChroma(path, port, tmp_path).start()
            reader.join(30)
        # Four outages were ridden out; the fifth opened the breaker under the waiting read.
        assert outcomes[:4] == [N] * 4 and isinstance(outcomes[4], CrashLoopError), outcomes
        assert client.stats().breaker_open
        with pytest.raises(CrashLoopError) as info:
            col.count()  # the server is up: the breaker fails fast anyway
        assert len(info.value.deaths) == 5 and info.value.retry_after > 0
        assert "breaker_open" in [e.kind for e in events]
        client.reset_breaker()
        assert col.count() == N
    finally:
        client.close()
        plain.stop()


def test_async_client_survives_sigsegv_and_times_out_under_sigstop(served: Serve) -> None:
    async def scenario() -> None:
        client = await AsyncSafeHttpClient("127.0.0.1", served.port, settings=no_telemetry())
        try:
            col = await client.get_collection("coll", embedding_function=None)
            assert await col.count() == N
            chroma = served.chroma_pid
            os.kill(chroma, signal.SIGSTOP)
            started = time.monotonic()
            with safechroma.call_timeout(3.0):
                with pytest.raises(ServerTimeoutError):
                    await col.count()
            assert time.monotonic() - started < 8.0
            os.kill(chroma, signal.SIGCONT)
            assert await col.count() == N
            os.kill(chroma, signal.SIGSEGV)
            _wait_dead(chroma)
            res = await col.query(query_embeddings=chroma_dirs.vectors("coll", N, DIM), n_results=1)
            assert [hit[0] for hit in res["ids"]] == chroma_dirs.record_ids("coll", N)
            await col.add(ids=["async-new"], embeddings=[[0.5] * DIM])
            assert await col.count() == N + 1
            assert client.stats().outages == 1
        finally:
            await client.close()

    asyncio.run(scenario())


def test_unreachable_server_at_construction_names_the_address() -> None:
    port = free_port()
    started = time.monotonic()
    with pytest.raises(ServerUnavailableError) as info:
        SafeHttpClient("127.0.0.1", port, settings=no_telemetry(), reconnect_timeout=0.5)
    assert time.monotonic() - started < 5
    assert info.value.cause == "refused" and not info.value.outcome_unknown
    assert f"127.0.0.1:{port}" in str(info.value)


def test_construction_against_a_hung_server_times_out(served: Serve) -> None:
    """chromadb's HttpClient() would wait forever here (and turn any failure into ValueError)."""
    chroma = served.chroma_pid
    os.kill(chroma, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(ServerTimeoutError) as info:
            SafeHttpClient("127.0.0.1", served.port, settings=no_telemetry(), timeout=2.0)
        assert time.monotonic() - started < 6.0
        assert info.value.operation == "get_user_identity"
    finally:
        os.kill(chroma, signal.SIGCONT)


class _Throttling(http.server.BaseHTTPRequestHandler):
    """Answers the handful of requests a client makes, and throttles some of them."""

    seen: list[str] = []
    throttle: dict[str, list[int]] = {}

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        path = self.path.split("?")[0]
        self.seen.append(f"{self.command} {path}")
        statuses = self.throttle.get(f"{self.command} {path.rsplit('/', 1)[-1]}")
        status = statuses.pop(0) if statuses else 200
        if status != 200:
            body = b'{"error": "busy", "message": "try later"}'
        elif path.endswith("/auth/identity"):
            body = json.dumps(
                {"user_id": "", "tenant": "default_tenant", "databases": ["default_database"]}
            ).encode()
        elif path.endswith("/collections_count"):
            body = b"3"
        else:
            body = json.dumps(
                {
                    "id": "00000000-0000-0000-0000-000000000000",
                    "name": "x",
                    "tenant": "default_tenant",
                }
            ).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        if status == 429:
            self.send_header("retry-after", "0")
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer  # noqa: N815 - http.server's names

    def log_message(self, *args: Any) -> None:
        pass


def test_429_and_503_back_off_and_writes_are_not_resent_on_503() -> None:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Throttling)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    sleeps: list[float] = []
    _Throttling.seen = []
    _Throttling.throttle = {"GET collections_count": [429, 503], "POST collections": [503]}
    try:
        client = SafeHttpClient(
            "127.0.0.1", httpd.server_address[1], settings=no_telemetry(), sleep=sleeps.append
        )
        try:
            assert client.count_collections() == 3
            assert (
                _Throttling.seen.count(
                    "GET /api/v2/tenants/default_tenant/databases/"
                    "default_database/collections_count"
                )
                == 3
            )
            assert client.stats().throttled == 2 and len(sleeps) == 2
            with pytest.raises(Exception) as info:  # noqa: B017 - chromadb raises a bare one
                client.create_collection("abc")
            assert not isinstance(info.value, SafeChromaError)  # the server's answer, as is
            assert sum(s.startswith("POST") for s in _Throttling.seen) == 1  # not resent
        finally:
            client.close()
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.mark.parametrize(
    ("method", "path", "body", "expected"),
    [
        ("GET", "/api/v2/tenants/t/databases/d/collections/c1/count", b"", ("count", "read")),
        ("POST", "/api/v2/tenants/t/databases/d/collections/c1/query", b"{}", ("query", "read")),
        ("POST", "/api/v2/tenants/t/databases/d/collections/c1/get", b"{}", ("get", "read")),
        ("POST", "/api/v2/tenants/t/databases/d/collections/c1/add", b"{}", ("add", "idempotent")),
        ("POST", "/api/v2/x/collections/c1/upsert", b"{}", ("upsert", "idempotent")),
        ("POST", "/api/v2/x/collections/c1/delete", b"{}", ("delete", "idempotent")),
        (
            "POST",
            "/api/v2/tenants/t/databases/d/collections",
            b'{"name": "a", "get_or_create": true}',
            ("get_or_create_collection", "idempotent"),
        ),
        (
            "POST",
            "/api/v2/tenants/t/databases/d/collections",
            b'{"name": "a", "get_or_create": false}',
            ("create_collection", "write"),
        ),
        ("PUT", "/api/v2/t/collections/c1", b"{}", ("modify_collection", "idempotent")),
        ("DELETE", "/api/v2/t/collections/a", b"", ("delete_collection", "write")),
        ("POST", "/api/v2/reset", b"", ("reset", "write")),
        ("GET", "/api/v2/tenants/t/databases/d/collections", b"", ("list_collections", "read")),
        ("GET", "/api/v2/tenants/t/databases/d/collections/c", b"", ("get_collection", "read")),
        ("GET", "/api/v2/tenants/t", b"", ("get_tenant", "read")),
        ("GET", "/api/v2/auth/identity", b"", ("get_user_identity", "read")),
        ("POST", "/api/v2/tenants", b"{}", ("POST /tenants", "write")),
    ],
)
def test_classify(method: str, path: str, body: bytes, expected: tuple[str, str]) -> None:
    assert classify(method, path, body) == expected


def test_new_errors_pickle() -> None:
    for error in (
        ServerUnavailableError(
            "m", url="u", operation="add", outcome_unknown=True, attempts=1, cause="dropped"
        ),
        ServerTimeoutError(
            "m", url="u", operation="get", outcome_unknown=False, attempts=2, timeout=3.0
        ),
        safechroma.ServeError("m", reason="port_in_use", address="http://127.0.0.1:1"),
    ):
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is type(error) and back._facts == error._facts and str(back) == "m"


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [("SafeHttpClient", "HttpClient"), ("AsyncSafeHttpClient", "AsyncHttpClient")],
)
def test_signatures_start_with_chromadbs(ours: str, theirs: str) -> None:
    import inspect

    import chromadb

    mine = list(inspect.signature(getattr(safechroma, ours)).parameters.values())
    base = list(inspect.signature(getattr(chromadb, theirs)).parameters.values())
    assert [(p.name, p.default) for p in mine[: len(base)]] == [(p.name, p.default) for p in base]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in mine[len(base) :])
