"""The decisions about one HTTP request to a Chroma server, with no I/O (sans-I/O, as h11).

What a request is (:func:`classify`: a read, an idempotent write or a write), its deadline,
whether it may be sent again (reads yes; writes only when nothing was sent, or when
``replay_writes=True`` and the write is idempotent), backoff on ``429``/``503``, the crash-loop
breaker, stats and events. :class:`_Call` decides for one request and :class:`_Guard` holds
what every request of one client shares; the transports in :mod:`safechroma.http.client` only
send, sleep and ask them.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import threading
import time
from collections.abc import Callable
from typing import Any, Final

import httpx
import orjson
import tenacity

from .._errors import CrashLoopError, ServerTimeoutError, ServerUnavailableError
from .._policy import BreakerPolicy, Event, effective_timeout

__all__ = ["DEFAULT_BACKOFF", "HttpStats", "classify"]

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
