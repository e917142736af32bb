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
live in :mod:`safechroma.http.guard` and do no I/O; the sync and async transports here only
send, sleep and ask them. It does not touch processes or the persist directory (that is
``safechroma serve``, in :mod:`safechroma.http.serve`).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import time
from collections.abc import Callable
from typing import Any

import httpx
from chromadb.api.async_client import AsyncClient
from chromadb.api.client import Client
from chromadb.api.shared_system_client import SharedSystemClient
from chromadb.auth import UserIdentity
from chromadb.config import DEFAULT_DATABASE, DEFAULT_TENANT, Component, Settings
from chromadb.errors import ChromaError

from .._errors import SafeChromaError
from .._policy import BreakerPolicy, Event
from .guard import _DEFAULT_BREAKER, DEFAULT_BACKOFF, HttpStats, _Call, _Guard, _Settings

__all__ = ["AsyncSafeHttpClient", "HttpStats", "SafeHttpClient"]


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
