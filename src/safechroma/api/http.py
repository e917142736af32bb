"""``SafeHttpClient`` and ``AsyncSafeHttpClient``: chromadb's HTTP clients, made safe.

chromadb's ``HttpClient`` talks to a Chroma server through httpx with ``timeout=None`` and no
retries (CHROMA_FACTS.md section 6): a hung server hangs the caller forever, and a restarted one
surfaces as a raw ``httpx.ConnectError`` or ``httpx.RemoteProtocolError``. These clients keep
chromadb's own ``Client``, ``Collection`` and ``FastAPI`` server class untouched and wrap the
layer underneath them, the httpx transport that every request passes through::

    Collection.query -> FastAPI._make_request -> httpx.Client -> GuardedTransport -> HTTPTransport

This module owns what happens to one request there: its deadline, whether it may be sent again
(reads yes; writes only when nothing was sent, or when ``replay_writes=True`` and the write is
idempotent), backoff on ``429``/``503``, the crash-loop breaker, stats and events. The decisions
live in :class:`_Call` and :class:`_Guard`, which do no I/O; the sync and async transports only
send, sleep and ask them. It does not touch processes or the persist directory (that is
``safechroma serve``, in ``safechroma.server``).
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import dataclasses
import functools
import re
import threading
import time
from collections.abc import Callable
from typing import Any, Final

import httpx
import orjson
import tenacity
from chromadb.api.async_client import AsyncClient
from chromadb.api.client import Client
from chromadb.api.shared_system_client import SharedSystemClient
from chromadb.auth import UserIdentity
from chromadb.config import DEFAULT_DATABASE, DEFAULT_TENANT, Component, Settings
from chromadb.errors import ChromaError

from .._errors import CrashLoopError, SafeChromaError, ServerTimeoutError, ServerUnavailableError
from .._policy import BreakerPolicy, Event, effective_timeout

__all__ = ["AsyncSafeHttpClient", "HttpStats", "SafeHttpClient"]

# Record writes Chroma applies idempotently: a duplicate id in ``add`` is ignored, ``upsert``,
# ``update`` and ``delete`` converge (CHROMA_FACTS.md section 3). Replayed only on request.
_IDEMPOTENT_WRITES: Final = frozenset({"add", "upsert", "update", "delete"})
# POSTs that only read.
_READ_POSTS: Final = frozenset({"get", "query", "search"})
_NAMED: Final = frozenset(
    {
        "count",
        "collections_count",
        "fork",
        "fork_count",
        "indexing_status",
        "heartbeat",
        "version",
        "identity",
        "reset",
        "pre-flight-checks",
        "attach",
        "detach",
    }
    | _IDEMPOTENT_WRITES
    | _READ_POSTS
)
_ID = re.compile(r"/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

_DEFAULT_BREAKER: Final = BreakerPolicy()
DEFAULT_BACKOFF: Final = tenacity.wait_exponential(multiplier=0.05, max=1.0) + tenacity.wait_random(
    0, 0.05
)


@dataclasses.dataclass(frozen=True)
class HttpStats:
    """A snapshot of one ``SafeHttpClient``'s life.

    Attributes:
        url: the server's API address.
        calls: requests the server answered (any status).
        errors: answers with an error status (Chroma's errors; raised as chromadb's types).
        retries: requests tried again (after a refused or dropped connection, or a 429/503).
        refused: attempts whose connection was refused (server down or restarting).
        dropped: attempts whose connection closed before the answer (server died mid-call).
        throttled: ``429``/``503`` answers.
        timeouts: calls that passed their deadline.
        outages: times the server went from answering to not answering (the breaker counts
            these).
        breaker_open: whether the crash-loop breaker is open.
        last_error: the last error this client raised for a server failure, or None.
        last_call_seconds: wall time of the last answered call, retries included.
    """

    url: str
    calls: int
    errors: int
    retries: int
    refused: int
    dropped: int
    throttled: int
    timeouts: int
    outages: int
    breaker_open: bool
    last_error: BaseException | None
    last_call_seconds: float


@dataclasses.dataclass(frozen=True)
class _Settings:
    url: str
    timeout: float | None
    reconnect_timeout: float
    read_retries: int
    replay_writes: bool
    throttle_retries: int
    breaker: BreakerPolicy
    backoff: Any
    on_event: Callable[[Event], None] | None


def classify(method: str, path: str, body: bytes) -> tuple[str, str]:
    """Name a request and say what may be done with it: ``(operation, kind)``.

    ``kind`` is ``"read"`` (safe to send again), ``"idempotent"`` (a write that converges when
    sent twice) or ``"write"`` (never sent twice).
    """
    method = method.upper()
    path = path.split("/api/v2", 1)[-1].rstrip("/")
    last = path.rsplit("/", 1)[-1]
    op = last if last in _NAMED else f"{method} {_ID.sub('/{id}', path) or '/'}"
    if last == "identity":
        op = "get_user_identity"
    if method in ("GET", "HEAD"):
        parts = path.strip("/").split("/")
        if op.startswith(("GET ", "HEAD ")) and parts:
            # /tenants/T[/databases[/D[/collections[/NAME | /by-id/ID]]]]
            named = {2: "get_tenant", 3: "list_databases", 4: "get_database"}
            named.update({5: "list_collections", 6: "get_collection", 7: "get_collection"})
            op = named.get(len(parts), op) if parts[0] == "tenants" else op
        return op, "read"
    if method == "POST" and last in _READ_POSTS:
        return op, "read"
    if method == "POST" and last in _IDEMPOTENT_WRITES:
        return op, "idempotent"
    if method == "POST" and last == "collections":
        try:
            get_or_create = bool(orjson.loads(body).get("get_or_create"))
        except (orjson.JSONDecodeError, AttributeError):
            get_or_create = False
        return (
            ("get_or_create_collection", "idempotent")
            if get_or_create
            else (
                "create_collection",
                "write",
            )
        )
    if method == "PUT" and "/collections/" in path:
        return "modify_collection", "idempotent"  # sets name/metadata: converges
    if method == "DELETE" and "/collections/" in path:
        return "delete_collection", "write"  # a second one raises NotFoundError
    return op, "write"


class _Guard:
    """The state shared by every request of one client: stats, breaker, events."""

    def __init__(self, settings: _Settings) -> None:
        self.s = settings
        self.lock = threading.Lock()
        self.calls = self.errors = self.retries = self.refused = 0
        self.dropped = self.throttled = self.timeouts = self.outages = 0
        self.last_error: BaseException | None = None
        self.last_call_seconds = 0.0
        self.up = True  # the last attempt reached the server
        self.down_since = 0.0
        self.outage_times: collections.deque[tuple[float, str]] = collections.deque()
        self.breaker_until = 0.0

    def emit(self, kind: str, **detail: Any) -> None:
        if self.s.on_event is not None:
            self.s.on_event(Event(kind, self.s.url, None, detail))

    def check_breaker(self, operation: str) -> None:
        with self.lock:
            if not self.breaker_until:
                return
            now = time.monotonic()
            if now < self.breaker_until:
                error = CrashLoopError(
                    f"the Chroma server at {self.s.url} went away {len(self.outage_times)} "
                    f"times in {self.s.breaker.window:.0f} s, so calls fail fast for "
                    f"{self.breaker_until - now:.1f} s more (the breaker is open). Check the "
                    "server's log; call reset_breaker() to try at once.",
                    path=self.s.url,
                    deaths=[d for _, d in self.outage_times],
                    retry_after=self.breaker_until - now,
                )
                self.last_error = error
                raise error
            self.breaker_until = 0.0  # cooldown over: let calls through
            self.outage_times.clear()
        self.emit("breaker_reset", why="cooldown", operation=operation)

    def reset_breaker(self) -> None:
        with self.lock:
            was_open = bool(self.breaker_until)
            self.breaker_until = 0.0
            self.outage_times.clear()
        if was_open:
            self.emit("breaker_reset", why="manual")

    def server_lost(self, how: str, operation: str) -> None:
        """An attempt did not reach the server or lost it: count one outage per run."""
        opened = False
        with self.lock:
            if how == "refused":
                self.refused += 1
            else:
                self.dropped += 1
            if not self.up:
                return
            self.up = False
            now = time.monotonic()
            self.down_since = now
            self.outages += 1
            self.outage_times.append((now, f"{how} during {operation}"))
            while self.outage_times and now - self.outage_times[0][0] > self.s.breaker.window:
                self.outage_times.popleft()
            if len(self.outage_times) >= self.s.breaker.max_deaths and not self.breaker_until:
                self.breaker_until = now + self.s.breaker.cooldown
                opened = True
        self.emit(f"connection_{how}", operation=operation)
        if opened:
            self.emit("breaker_open", deaths=[d for _, d in self.outage_times])

    def answered(self, status: int, started: float) -> None:
        back = None
        with self.lock:
            self.calls += 1
            if status >= 400:
                self.errors += 1
            if status in (429, 503):
                self.throttled += 1
            self.last_call_seconds = time.monotonic() - started
            if not self.up:
                self.up = True
                back = time.monotonic() - self.down_since
        if back is not None:
            self.emit("reconnected", downtime=round(back, 3))

    def failed(self, error: BaseException) -> BaseException:
        with self.lock:
            self.last_error = error
            if isinstance(error, ServerTimeoutError):
                self.timeouts += 1
        return error

    def stats(self) -> HttpStats:
        with self.lock:
            return HttpStats(
                url=self.s.url,
                calls=self.calls,
                errors=self.errors,
                retries=self.retries,
                refused=self.refused,
                dropped=self.dropped,
                throttled=self.throttled,
                timeouts=self.timeouts,
                outages=self.outages,
                breaker_open=bool(self.breaker_until) and time.monotonic() < self.breaker_until,
                last_error=self.last_error,
                last_call_seconds=self.last_call_seconds,
            )


class _Call:
    """The decisions about one request; the transports do the I/O and ask this what next."""

    def __init__(self, guard: _Guard, request: httpx.Request) -> None:
        self.g = guard
        self.operation, self.kind = classify(request.method, request.url.path, request.content)
        self.timeout = effective_timeout(guard.s.timeout)
        self.started = time.monotonic()
        self.deadline = None if self.timeout is None else self.started + self.timeout
        self.attempts = 0
        self.refused_since: float | None = None
        self.drops = 0
        self.throttles = 0
        self.sent = False  # some attempt may have reached the server's handler
        guard.check_breaker(self.operation)

    def _remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def prepare(self, request: httpx.Request) -> None:
        """Set this attempt's timeouts to what is left of the deadline."""
        if self.attempts:
            self.g.check_breaker(self.operation)
            with self.g.lock:
                self.g.retries += 1
        self.attempts += 1
        left = self._remaining()
        if left is not None and left <= 0:
            raise self.g.failed(self._timeout())
        # httpx reads per-request timeouts from this extension (``Client.build_request``).
        request.extensions["timeout"] = {"connect": left, "read": left, "write": left, "pool": left}

    def _timeout(self) -> ServerTimeoutError:
        assert self.timeout is not None
        unknown = self.sent and self.kind != "read"
        return ServerTimeoutError(
            f"the Chroma server at {self.g.s.url} did not answer {self.operation} within "
            f"{self.timeout:g} s"
            + (
                "; the write may or may not have been applied (check with get before retrying)"
                if unknown
                else ""
            )
            + ". A stopped or hung server, or a locked SQLite, looks like this; "
            "`safechroma serve` restarts a server that stays hung.",
            url=self.g.s.url,
            operation=self.operation,
            outcome_unknown=unknown,
            attempts=self.attempts,
            timeout=self.timeout,
        )

    def _sleep_for(self, delay: float) -> float:
        left = self._remaining()
        if left is not None and delay >= left:
            raise self.g.failed(self._timeout())
        return delay

    def _backoff(self, attempt: int) -> float:
        state = tenacity.RetryCallState(None, None, (), {})  # type: ignore[arg-type]
        state.attempt_number = max(1, attempt)
        return float(self.g.s.backoff(state))

    def transport_error(self, exc: httpx.TransportError) -> float:
        """An attempt failed below HTTP: return the delay before the next one, or raise."""
        if isinstance(exc, httpx.TimeoutException):
            if isinstance(exc, httpx.WriteTimeout | httpx.ReadTimeout):
                self.sent = True
            raise self.g.failed(self._timeout()) from exc
        now = time.monotonic()
        if isinstance(exc, httpx.ConnectError):
            # Nothing was sent, so any request may go again: the server is down or restarting.
            self.g.server_lost("refused", self.operation)
            if self.refused_since is None:
                self.refused_since = now
            waited = now - self.refused_since
            if waited >= self.g.s.reconnect_timeout:
                raise self.g.failed(self._unavailable("refused", exc, waited)) from exc
            delay = min(self._backoff(self.attempts), self.g.s.reconnect_timeout - waited)
            return self._sleep_for(max(delay, 0.0))
        if not isinstance(exc, httpx.NetworkError | httpx.RemoteProtocolError):
            raise exc  # a bad URL, a proxy, a local protocol error: httpx's own, unchanged
        # The connection closed (or broke) after the request went out: the server died mid-call
        # or was restarted. A read can go again; a write only if it is idempotent and allowed.
        self.sent = True
        self.refused_since = None
        self.g.server_lost("dropped", self.operation)
        self.drops += 1
        may_resend = self.kind == "read" or (self.kind == "idempotent" and self.g.s.replay_writes)
        if not may_resend or self.drops > self.g.s.read_retries:
            raise self.g.failed(self._unavailable("dropped", exc, None)) from exc
        return self._sleep_for(self._backoff(self.drops))

    def _unavailable(
        self, cause: str, exc: BaseException, waited: float | None
    ) -> ServerUnavailableError:
        unknown = self.sent and self.kind != "read"
        if cause == "refused":
            what = f"refused the connection for {waited:.1f} s"
        elif self.kind == "read":
            what = f"dropped the connection {self.drops} times"
        else:
            what = "dropped the connection before answering"
        advice = (
            "; the write may or may not have been applied, so it was not sent again (check with "
            "get before retrying, or build the client with replay_writes=True to resend "
            "idempotent writes)"
            if unknown
            else ""
        )
        return ServerUnavailableError(
            f"the Chroma server at {self.g.s.url} {what} during {self.operation} "
            f"({type(exc).__name__}: {exc}){advice}. Is it running (`safechroma serve PATH`)?",
            url=self.g.s.url,
            operation=self.operation,
            outcome_unknown=unknown,
            attempts=self.attempts,
            cause=cause,
        )

    def response(self, status: int, headers: httpx.Headers) -> float | None:
        """The server answered: None to hand the answer to chromadb, or a delay to retry."""
        self.g.answered(status, self.started)
        self.refused_since = None
        retry = status == 429 or (
            status == 503
            and (self.kind == "read" or (self.kind == "idempotent" and self.g.s.replay_writes))
        )
        if not retry or self.throttles >= self.g.s.throttle_retries:
            return None
        self.throttles += 1
        delay = self._backoff(self.throttles)
        after = headers.get("retry-after")
        if after is not None:
            try:
                delay = max(delay, min(float(after), 30.0))
            except ValueError:
                pass
        left = self._remaining()
        if left is not None and delay >= left:
            return None  # no time to wait: let chromadb raise the server's own error
        self.g.emit("throttled", operation=self.operation, status=status, delay=round(delay, 3))
        return delay


def _rebuilt(response: httpx.Response, raw: bytes, request: httpx.Request) -> httpx.Response:
    # The body was read inside the transport so that a connection lost mid-body is handled here
    # too; the client decodes the raw bytes as it would have.
    return httpx.Response(
        response.status_code,
        headers=response.headers,
        stream=httpx.ByteStream(raw),
        extensions=response.extensions,
        request=request,
    )


class GuardedTransport(httpx.BaseTransport):
    """An httpx transport that gives each request a deadline, retries and backoff."""

    def __init__(self, inner: httpx.BaseTransport, guard: _Guard, sleep: Callable[[float], Any]):
        self.inner = inner
        self.guard = guard
        self.sleep = sleep

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()  # buffered, so that it can be sent again
        call = _Call(self.guard, request)
        while True:
            call.prepare(request)
            try:
                response = self.inner.handle_request(request)
                try:
                    raw = b"".join(response.stream)  # type: ignore[arg-type]
                finally:
                    response.close()
            except httpx.TransportError as exc:
                self.sleep(call.transport_error(exc))
                continue
            delay = call.response(response.status_code, response.headers)
            if delay is None:
                return _rebuilt(response, raw, request)
            self.sleep(delay)

    def close(self) -> None:
        self.inner.close()


class AsyncGuardedTransport(httpx.AsyncBaseTransport):
    """The async twin of :class:`GuardedTransport` (same decisions, awaited I/O)."""

    def __init__(self, inner: httpx.AsyncBaseTransport, guard: _Guard) -> None:
        self.inner = inner
        self.guard = guard

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        call = _Call(self.guard, request)
        while True:
            call.prepare(request)
            try:
                response = await self.inner.handle_async_request(request)
                try:
                    raw = b"".join([chunk async for chunk in response.stream])  # type: ignore[union-attr]
                finally:
                    await response.aclose()
            except httpx.TransportError as exc:
                await asyncio.sleep(call.transport_error(exc))
                continue
            delay = call.response(response.status_code, response.headers)
            if delay is None:
                return _rebuilt(response, raw, request)
            await asyncio.sleep(delay)

    async def aclose(self) -> None:
        await self.inner.aclose()


def _wrap_transports(session: httpx.Client | httpx.AsyncClient, wrap: Callable[[Any], Any]) -> None:
    # httpx keeps the pool in ``_transport`` and proxy routes (from the environment) in
    # ``_mounts`` (httpx 0.28 ``Client.__init__``); wrapping both keeps chromadb's limits,
    # TLS settings and proxies exactly as chromadb configured them.
    if not hasattr(session, "_transport") or not hasattr(session, "_mounts"):
        raise RuntimeError(  # pragma: no cover - a future httpx
            f"safechroma cannot guard this httpx version ({httpx.__version__}): no _transport"
        )
    session._transport = wrap(session._transport)
    session._mounts = {
        pattern: None if t is None else wrap(t) for pattern, t in session._mounts.items()
    }


def _prepare_settings(
    host: str,
    port: int,
    ssl: bool,
    headers: dict[str, str] | None,
    settings: Settings | None,
    impl: str,
) -> Settings:
    """What ``chromadb.HttpClient`` does to its arguments (chromadb/__init__.py), unchanged."""
    if settings is None:
        settings = Settings()
    host, port, ssl = str(host), int(port), bool(ssl)
    settings.chroma_api_impl = impl
    if settings.chroma_server_host and settings.chroma_server_host != host:
        raise ValueError(
            f"Chroma server host provided in settings[{settings.chroma_server_host}] is "
            f"different to the one provided in HttpClient: [{host}]"
        )
    settings.chroma_server_host = host
    if settings.chroma_server_http_port and settings.chroma_server_http_port != port:
        raise ValueError(
            f"Chroma server http port provided in settings[{settings.chroma_server_http_port}] "
            f"is different to the one provided in HttpClient: [{port}]"
        )
    settings.chroma_server_http_port = port
    settings.chroma_server_ssl_enabled = ssl
    settings.chroma_server_headers = headers
    return settings


def _guard_settings(settings: Settings, **options: Any) -> _Settings:
    from chromadb.api.base_http_client import BaseHTTPClient

    url = BaseHTTPClient.resolve_url(
        chroma_server_host=str(settings.chroma_server_host),
        chroma_server_http_port=settings.chroma_server_http_port,
        chroma_server_ssl_enabled=settings.chroma_server_ssl_enabled,
        default_api_path=settings.chroma_server_api_default_path,
    )
    return _Settings(url=url, **options)


class SafeHttpClient(Client):
    """chromadb's ``HttpClient`` with deadlines, retries across server restarts, and a breaker.

    Use it like ``chromadb.HttpClient``: the same arguments, and it returns chromadb's own
    ``Collection`` objects. What it adds, for every request:

    - a deadline (``timeout``, or ``safechroma.call_timeout(seconds)`` around a block): past it
      the call raises :class:`safechroma.ServerTimeoutError`, a ``TimeoutError``;
    - a refused connection (server down or restarting) is retried with backoff for up to
      ``reconnect_timeout`` seconds; nothing was sent, so this holds for writes too;
    - a connection dropped mid-call is retried for reads (``read_retries`` times); a write is
      not sent again (its outcome is unknown, ``outcome_unknown=True``) unless
      ``replay_writes=True`` and it is idempotent (``add``, ``upsert``, ``update``, record
      ``delete``, ``get_or_create_collection``, ``modify``);
    - ``429`` (any request) and ``503`` (requests that may be resent) are retried with backoff,
      honouring ``Retry-After``; after ``throttle_retries`` chromadb raises its own error;
    - the server going away ``breaker.max_deaths`` times within ``breaker.window`` seconds opens
      the breaker: calls raise :class:`safechroma.CrashLoopError` at once until
      ``breaker.cooldown`` passes or :meth:`reset_breaker` is called;
    - :meth:`stats` and ``on_event`` (:class:`safechroma.Event`, ``path`` is the server URL).

    Unlike ``chromadb.HttpClient``, construction waits (``reconnect_timeout``) for a server that
    is still starting, and raises :class:`safechroma.ServerUnavailableError` instead of
    ``ValueError`` when none answers. Chroma's own errors stay chromadb's types.

    Args:
        host, port, ssl, headers, settings, tenant, database: as ``chromadb.HttpClient``.
        timeout: default deadline per call in seconds, retries included (None: none).
        reconnect_timeout: how long a call waits for a server that refuses connections.
        read_retries: how many times a read is resent after a dropped connection.
        replay_writes: resend idempotent writes after a dropped connection.
        throttle_retries: how many ``429``/``503`` answers are waited out per call.
        breaker: the crash-loop breaker (``max_deaths`` outages within ``window`` seconds).
        backoff: tenacity wait strategy between attempts.
        on_event: called with each :class:`safechroma.Event`.
        sleep: how to sleep between attempts (tests pass a recorder).
    """

    def __init__(
        self,
        host: str = "localhost",
        port: int = 8000,
        ssl: bool = False,
        headers: dict[str, str] | None = None,
        settings: Settings | None = None,
        tenant: str = DEFAULT_TENANT,
        database: str = DEFAULT_DATABASE,
        *,
        timeout: float | None = 600.0,
        reconnect_timeout: float = 30.0,
        read_retries: int = 2,
        replay_writes: bool = False,
        throttle_retries: int = 5,
        breaker: BreakerPolicy = _DEFAULT_BREAKER,
        backoff: Any = DEFAULT_BACKOFF,
        on_event: Callable[[Event], None] | None = None,
        sleep: Callable[[float], Any] = time.sleep,
    ) -> None:
        settings = _prepare_settings(
            host, port, ssl, headers, settings, "chromadb.api.fastapi.FastAPI"
        )
        self._guard = _Guard(
            _guard_settings(
                settings,
                timeout=timeout,
                reconnect_timeout=reconnect_timeout,
                read_retries=read_retries,
                replay_writes=replay_writes,
                throttle_retries=throttle_retries,
                breaker=breaker,
                backoff=backoff,
                on_event=on_event,
            )
        )
        self._sleep = sleep
        try:
            super().__init__(tenant=str(tenant), database=str(database), settings=settings)
        except BaseException:
            # chromadb releases its systems; the connections opened so far are ours to close.
            for owner in (self, getattr(self, "_admin_client", None)):
                server = getattr(owner, "_server", None)
                if server is not None:
                    server._session.close()
            raise
        self._install(self._server)  # in case a future chromadb builds in another order
        self._install(self._admin_client._server)  # type: ignore[attr-defined]

    def _install(self, server: Any) -> None:
        session = server._session
        if not isinstance(session._transport, GuardedTransport):
            _wrap_transports(session, lambda t: GuardedTransport(t, self._guard, self._sleep))

    def get_user_identity(self) -> UserIdentity:
        # chromadb's Client.__init__ asks this first, right after building its server object:
        # guard the transport before any request goes out. chromadb's own version turns every
        # failure into ValueError; here the precise error stays.
        self._install(self._server)
        return self._server.get_user_identity()

    def _validate_tenant_database(self, tenant: str, database: str) -> None:
        # The admin client chromadb builds for this check has a server object (and httpx
        # session) of its own: guard it too. Errors as in chromadb, except that safechroma's
        # own (deadline, server unavailable) are not turned into ValueError.
        self._install(self._admin_client._server)  # type: ignore[attr-defined]
        try:
            self._admin_client.get_tenant(name=tenant)
        except (ChromaError, SafeChromaError):
            raise
        except Exception:
            raise ValueError(
                f"Could not connect to tenant {tenant}. Are you sure it exists?"
            ) from None
        self._admin_client.get_database(name=database, tenant=tenant)

    def stats(self) -> HttpStats:
        """This client's counters (see :class:`HttpStats`)."""
        return self._guard.stats()

    def reset_breaker(self) -> None:
        """Close an open breaker, so the next call goes to the server at once."""
        self._guard.reset_breaker()

    def close(self) -> None:
        """Close the connections and release chromadb's client (idempotent)."""
        if not self._closed:
            self._server._session.close()  # type: ignore[attr-defined]
            admin = getattr(self, "_admin_client", None)
            if admin is not None:
                admin._server._session.close()
        super().close()


_PENDING_GUARD: contextvars.ContextVar[_Guard | None] = contextvars.ContextVar(
    "safechroma_pending_guard", default=None
)


class _AsyncSafeHttpClient(AsyncClient):
    """chromadb's ``AsyncClient`` over a guarded transport; built by :func:`AsyncSafeHttpClient`."""

    _guard: _Guard

    def __init__(self, settings: Settings = Settings()) -> None:  # noqa: B008 - chromadb's
        guard = _PENDING_GUARD.get()
        if guard is None:
            raise TypeError("use `await safechroma.AsyncSafeHttpClient(...)`")
        self._guard = guard
        self._closed = False
        super().__init__(settings=settings)

    def _install(self, server: Any) -> None:
        if getattr(server, "_safechroma_guarded", False):
            return
        # AsyncFastAPI keeps one httpx.AsyncClient per event loop in a dict shared by every
        # instance (a class attribute): give this client its own, so that guarding it does not
        # change plain chromadb clients in the same process.
        server._clients = {}
        make = server._get_client

        def get_client() -> httpx.AsyncClient:
            client: httpx.AsyncClient = make()
            if not isinstance(client._transport, AsyncGuardedTransport):
                _wrap_transports(client, lambda t: AsyncGuardedTransport(t, self._guard))
            return client

        server._get_client = get_client
        # AsyncFastAPI.stop() runs its async cleanup through chromadb's async_to_sync, which
        # inside a running loop only creates the coroutine and drops it (a RuntimeWarning);
        # close() below closes the connections itself.
        server.stop = functools.partial(Component.stop, server)
        server._safechroma_guarded = True

    async def get_user_identity(self) -> UserIdentity:
        self._install(self._server)  # the first request of AsyncClient.create
        return await self._server.get_user_identity()

    async def _validate_tenant_database(self, tenant: str, database: str) -> None:
        self._install(self._admin_client._server)  # type: ignore[attr-defined]
        try:
            await self._admin_client.get_tenant(name=tenant)
        except (ChromaError, SafeChromaError):
            raise
        except Exception:
            raise ValueError(
                f"Could not connect to tenant {tenant}. Are you sure it exists?"
            ) from None
        await self._admin_client.get_database(name=database, tenant=tenant)

    def stats(self) -> HttpStats:
        """This client's counters (see :class:`HttpStats`)."""
        return self._guard.stats()

    def reset_breaker(self) -> None:
        """Close an open breaker, so the next call goes to the server at once."""
        self._guard.reset_breaker()

    async def close(self) -> None:
        """Close the connections and release chromadb's client (idempotent)."""
        if self._closed:
            return
        self._closed = True
        admin = getattr(self, "_admin_client", None)
        for server in (self._server, getattr(admin, "_server", None)):
            clients = getattr(server, "_clients", None) if server is not None else None
            if getattr(server, "_safechroma_guarded", False) and clients:
                while clients:
                    _, client = clients.popitem()
                    await client.aclose()
        if admin is not None:
            SharedSystemClient._release_system(admin._identifier)
        SharedSystemClient._release_system(self._identifier)

    async def __aenter__(self) -> _AsyncSafeHttpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def AsyncSafeHttpClient(  # noqa: N802 - named like chromadb.AsyncHttpClient
    host: str = "localhost",
    port: int = 8000,
    ssl: bool = False,
    headers: dict[str, str] | None = None,
    settings: Settings | None = None,
    tenant: str = DEFAULT_TENANT,
    database: str = DEFAULT_DATABASE,
    *,
    timeout: float | None = 600.0,
    reconnect_timeout: float = 30.0,
    read_retries: int = 2,
    replay_writes: bool = False,
    throttle_retries: int = 5,
    breaker: BreakerPolicy = _DEFAULT_BREAKER,
    backoff: Any = DEFAULT_BACKOFF,
    on_event: Callable[[Event], None] | None = None,
) -> _AsyncSafeHttpClient:
    """chromadb's ``AsyncHttpClient`` with the guarantees of :class:`SafeHttpClient`.

    ``client = await safechroma.AsyncSafeHttpClient(host, port)``; the options are those of
    :class:`SafeHttpClient` (sleeping is ``asyncio.sleep``). The client has ``stats()``,
    ``reset_breaker()`` and ``await client.close()`` (or ``async with``).
    """
    settings = _prepare_settings(
        host, port, ssl, headers, settings, "chromadb.api.async_fastapi.AsyncFastAPI"
    )
    guard = _Guard(
        _guard_settings(
            settings,
            timeout=timeout,
            reconnect_timeout=reconnect_timeout,
            read_retries=read_retries,
            replay_writes=replay_writes,
            throttle_retries=throttle_retries,
            breaker=breaker,
            backoff=backoff,
            on_event=on_event,
        )
    )
    token = _PENDING_GUARD.set(guard)
    try:
        client = await _AsyncSafeHttpClient.create(
            tenant=str(tenant), database=str(database), settings=settings
        )
    finally:
        _PENDING_GUARD.reset(token)
    assert isinstance(client, _AsyncSafeHttpClient)
    return client
