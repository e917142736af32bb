"""AsyncSafeClient and AsyncSafeCollection: the asyncio face of SafeClient and SafeCollection.

The shape is chromadb's own async API (``AsyncClientAPI``, ``AsyncCollection``): the same
methods, awaitable, with chromadb's signatures. There is one implementation of the policy:
every awaitable runs the matching *sync* :class:`SafeClient`/:class:`SafeCollection` call, so
errors, deadlines, retries, the crash-loop breaker, validation, recovery and hooks are exactly
the sync ones. The sync call runs in a thread that the client owns, so waiting for the worker,
a crash, a respawn, validation or recovery never blocks the event loop.

Construction (opening a directory spawns a worker, which takes about a second, so it is never
done in ``__init__``)::

    client = await AsyncSafeClient.create("./db")      # like ``await chromadb.AsyncHttpClient()``
    ...
    await client.aclose()

    async with AsyncSafeClient("./db") as client:      # opened on entry, closed on exit
        col = await client.get_or_create_collection("docs", embedding_function=my_ef)
        await col.add(ids=["a"], documents=["hello"])

A plain ``AsyncSafeClient("./db")`` is lazy: the first awaited call opens the directory.

A pool of threads per client
----------------------------
Each ``AsyncSafeClient`` owns a pool of threads (a ``ThreadPoolExecutor`` with as many threads
as the worker has channels, :data:`safechroma.runtime.channels.MAX_CHANNELS`) and its
collections share it. Calls of different tasks run in the worker at the same time, as they would
with chromadb in one process; the calls of one task run in the order it awaits them. Beyond the
pool's size, calls queue in the executor, first in first out. The pool is the client's own: it
never borrows the event loop's default executor, which the application may need for other things.

Deadlines are per task: ``safechroma.call_timeout()`` is a context variable, and each call runs
in a copy of the awaiting task's context (as ``asyncio.to_thread`` does).

Cancellation contract
---------------------
Cancelling a task that awaits a call (``task.cancel()``, ``asyncio.wait_for``,
``asyncio.timeout``) makes the task see ``CancelledError`` at once. What happens to the call:

- Not started yet (queued because every thread of the client is busy): it is withdrawn and
  never reaches the worker. A cancelled write of this kind is absent.
- Already started: it runs to completion in its thread. The thread finishes the exchange and
  consumes the reply itself, so its channel to the worker stays in step and a late reply is
  never handed to a later caller. A write that was sent completes (or fails)
  exactly as it would have without the cancellation; only the caller does not see the result.
  It is applied in full or not at all, as Chroma applies any single call.
- ``aclose()`` waits for every started call, cancelled or not, before it stops the worker: a
  write in flight is never cut short by closing.

Cancelling does not stop a call that is running in the worker. To bound how long the worker
may take (and have it killed when it overruns), use ``safechroma.call_timeout(seconds)`` or the
``timeout=`` option: those raise :class:`WorkerTimeoutError` and replace the worker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import inspect
import os
import threading
from collections.abc import Callable
from typing import Any

from chromadb.api import AsyncClientAPI
from chromadb.api.async_client import AsyncClient
from chromadb.api.models.AsyncCollection import AsyncCollection
from chromadb.api.models.Collection import Collection
from chromadb.config import DEFAULT_DATABASE, DEFAULT_TENANT, Settings

from .._errors import ClientClosedError
from .._policy import Options, Stats
from ..runtime.channels import MAX_CHANNELS
from .client import (
    _EF_BY_ID,
    _EF_CREATE,
    _EF_GET,
    _EF_GET_OR_CREATE,
    SafeClient,
    _default,
)
from .collection import PROXIED, SafeCollection

# chromadb's AsyncClient has its own default embedding-function objects. Omitting the argument
# must mean what it means to the sync client, so each async default maps to the sync one.
_ASYNC_EF_DEFAULTS = {
    id(_default(AsyncClient.create_collection, "embedding_function")): _EF_CREATE,
    id(_default(AsyncClient.get_collection, "embedding_function")): _EF_GET,
    id(_default(AsyncClient.get_or_create_collection, "embedding_function")): _EF_GET_OR_CREATE,
    id(_default(AsyncClient.get_collection_by_id, "embedding_function")): _EF_BY_ID,
}
_AEF_GET_OR_CREATE = _default(AsyncClient.get_or_create_collection, "embedding_function")


def _sync_ef(value: Any) -> Any:
    return _ASYNC_EF_DEFAULTS.get(id(value), value)


def _same_parameters(a: Callable[..., Any], b: Callable[..., Any]) -> bool:
    pa = [(p.name, p.kind) for p in inspect.signature(a).parameters.values()]
    pb = [(p.name, p.kind) for p in inspect.signature(b).parameters.values()]
    return pa == pb


def _client_method(name: str) -> Callable[..., Any]:
    """``AsyncSafeClient.<name>``: awaits ``SafeClient.<name>`` with chromadb's async signature."""
    sync = getattr(SafeClient, name)
    # Mirrored sync methods carry chromadb's signature; record-level ones forward *args.
    original = getattr(AsyncClient, name) if hasattr(sync, "__wrapped__") else None
    if original is not None and not _same_parameters(original, sync):
        # Caught at import, i.e. by every test run, when a chromadb release changes a method.
        raise TypeError(f"AsyncClient.{name} and SafeClient.{name} take different parameters")

    async def method(self: AsyncSafeClient, *args: Any, **kwargs: Any) -> Any:
        args = tuple(_sync_ef(a) for a in args)
        kwargs = {k: _sync_ef(v) for k, v in kwargs.items()}
        return self._wrap(await self._call(name, *args, **kwargs))

    method.__name__ = name
    method.__qualname__ = f"AsyncSafeClient.{name}"
    if original is not None:
        method.__wrapped__ = original  # type: ignore[attr-defined]
        method.__doc__ = (
            f"Behaves like ``chromadb`` ``AsyncClient.{name}``; runs in the worker (see the "
            "module docs for cancellation).\n\n" + (original.__doc__ or "")
        )
    return method


class AsyncSafeClient(AsyncClientAPI):
    """chromadb's ``AsyncClientAPI`` over a crash-isolated worker process.

    Every method behaves like the same method of :class:`safechroma.SafeClient` (and of
    chromadb's ``AsyncClient``), awaitable: the sync call runs in a thread of this client's
    pool, so the event loop keeps running while the worker works, crashes or is replaced, and
    calls of different tasks run in the worker at the same time.

    Args:
        path: the persist directory, as for ``chromadb.PersistentClient``.
        settings: chromadb ``Settings``.
        tenant: the tenant.
        database: the database.
        **options: see :class:`safechroma.Options`; checked here, applied when the directory
            is opened.

    Nothing is opened by the constructor. Open with ``await AsyncSafeClient.create(...)``, with
    ``async with AsyncSafeClient(...)``, or let the first awaited call open it. Errors from
    opening (``DirectoryLockedError``, ``RecoveryError``, ``WorkerStartError``) surface there.
    Close with ``await client.aclose()`` (``close()`` is the same coroutine). See the module
    docs for the cancellation contract.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] = "./chroma",
        settings: Settings | None = None,
        tenant: str = DEFAULT_TENANT,
        database: str = DEFAULT_DATABASE,
        **options: Any,
    ) -> None:
        Options(**options)  # reject unknown or malformed options now, not in the thread
        self._path = str(path)
        self._settings = settings if settings is not None else Settings()
        self._settings.persist_directory = self._path
        self._settings.is_persistent = True
        self._tenant = str(tenant)
        self._database = str(database)
        self._options = options
        self._sync: SafeClient | None = None
        self._open_lock = threading.Lock()
        self._closing = False
        self._closed_future: concurrent.futures.Future[None] | None = None
        self._pending: set[concurrent.futures.Future[Any]] = set()
        # A pool of its own (see the module docs).
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=MAX_CHANNELS, thread_name_prefix="safechroma-aio"
        )

    @classmethod
    async def create(
        cls,
        path: str | os.PathLike[str] = "./chroma",
        settings: Settings | None = None,
        tenant: str = DEFAULT_TENANT,
        database: str = DEFAULT_DATABASE,
        **options: Any,
    ) -> AsyncSafeClient:
        """Open ``path`` and return the client, as ``await chromadb.AsyncHttpClient()`` does.

        Raises:
            DirectoryLockedError: another process owns ``path``.
            RecoveryError: ``path`` is damaged and could not be repaired.
            WorkerStartError: no worker could open ``path``.
        """
        self = cls(path, settings, tenant, database, **options)
        try:
            await self.open()
        except BaseException:
            await self.aclose()
            raise
        return self

    # -- plumbing --------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the directory now (start the worker) if it is not open yet."""
        await self._submit(lambda: None)

    def _opened(self) -> SafeClient:
        """In a thread of the pool: the sync client, opened on first use (once)."""
        sync = self._sync
        if sync is None:
            with self._open_lock:
                sync = self._sync
                if sync is None:
                    sync = self._sync = SafeClient(
                        self._path, self._settings, self._tenant, self._database, **self._options
                    )
        return sync

    async def _submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` in a thread of the pool, in this task's context.

        If the awaiting task is cancelled, a call that has not started is withdrawn and one that
        has started runs to completion in its thread (see the module docs).
        """
        if self._closing:
            raise ClientClosedError(f"this AsyncSafeClient for {self._path} is closed")
        ctx = contextvars.copy_context()
        try:
            future = self._executor.submit(ctx.run, self._in_thread, fn, args, kwargs)
        except RuntimeError:  # the executor was shut down by a concurrent aclose()
            raise ClientClosedError(f"this AsyncSafeClient for {self._path} is closed") from None
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)
        return await asyncio.wrap_future(future)

    def _in_thread(self, fn: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        self._opened()
        return fn(*args, **kwargs)

    async def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Await ``SafeClient.<name>(*args, **kwargs)``."""
        return await self._submit(lambda: getattr(self._opened(), name)(*args, **kwargs))

    def _wrap(self, result: Any) -> Any:
        """Sync collections in a result become async ones of this client."""
        if isinstance(result, SafeCollection):
            return AsyncSafeCollection._adopt(self, result)
        if type(result) is list and result and isinstance(result[0], SafeCollection):
            return [AsyncSafeCollection._adopt(self, c) for c in result]
        return result

    # -- AsyncClientAPI --------------------------------------------------------------------

    @property
    def tenant(self) -> str:  # type: ignore[override]  # chromadb: plain attributes
        """The current tenant."""
        return self._sync.tenant if self._sync is not None else self._tenant

    @property
    def database(self) -> str:  # type: ignore[override]  # chromadb: plain attributes
        """The current database."""
        return self._sync.database if self._sync is not None else self._database

    # One line per method, no signature re-declared: each is derived from SafeClient's.
    count_collections = _client_method("count_collections")
    create_collection = _client_method("create_collection")
    delete_collection = _client_method("delete_collection")
    get_collection = _client_method("get_collection")
    get_collection_by_id = _client_method("get_collection_by_id")
    get_max_batch_size = _client_method("get_max_batch_size")
    get_or_create_collection = _client_method("get_or_create_collection")
    get_user_identity = _client_method("get_user_identity")
    get_version = _client_method("get_version")
    heartbeat = _client_method("heartbeat")
    list_collections = _client_method("list_collections")
    reset = _client_method("reset")
    set_database = _client_method("set_database")
    set_tenant = _client_method("set_tenant")
    # AsyncBaseAPI's record-level methods, for code written against ServerAPI-style calls.
    _add = _client_method("_add")
    _count = _client_method("_count")
    _delete = _client_method("_delete")
    _get = _client_method("_get")
    _modify = _client_method("_modify")
    _peek = _client_method("_peek")
    _query = _client_method("_query")
    _update = _client_method("_update")
    _upsert = _client_method("_upsert")

    def get_settings(self) -> Settings:
        """Behaves like ``chromadb`` ``AsyncClient.get_settings``."""
        return self._settings

    get_settings.__wrapped__ = AsyncClient.get_settings  # type: ignore[attr-defined]

    @staticmethod
    def clear_system_cache() -> None:
        """Does nothing: the worker owns Chroma's system cache; a respawn starts it afresh."""

    # chromadb's exact signature (its annotations are objects; ours are strings).
    clear_system_cache.__func__.__wrapped__ = (  # type: ignore[attr-defined]
        AsyncClient.clear_system_cache
    )

    # -- what safechroma adds ----------------------------------------------------------------

    @property
    def path(self) -> str:
        """The persist directory."""
        return self._path

    def stats(self) -> Stats:
        """Counters and facts about the worker; does not wait for a call in flight.

        Raises:
            ClientClosedError: the client was never opened (nothing to report yet).
        """
        if self._sync is None:
            raise ClientClosedError(
                f"this AsyncSafeClient for {self._path} is not open yet; await open() first"
            )
        return self._sync.stats()

    async def reset_breaker(self) -> None:
        """Close the crash-loop breaker so the next call may start a worker at once."""
        await self._call("reset_breaker")

    async def run_in_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Like :meth:`SafeClient.run_in_worker`, awaitable. Not retried after a crash."""
        return await self._call("run_in_worker", fn, *args)

    async def aclose(self) -> None:
        """Close the client once every call already started has finished.

        Calls made after ``aclose()`` began raise :class:`ClientClosedError`. Calls already
        submitted, including ones whose callers were cancelled after they started, complete
        first: a write in flight is never cut short. Cancelling the task that awaits
        ``aclose()`` does not stop the close; it finishes in the background. Idempotent.
        """
        if not self._closing:
            self._closing = True
            future: concurrent.futures.Future[None] = concurrent.futures.Future()
            self._closed_future = future
            threading.Thread(
                target=self._close_in_thread,
                args=(future, list(self._pending)),
                name="safechroma-aio-close",
                daemon=True,
            ).start()
        assert self._closed_future is not None
        await asyncio.shield(asyncio.wrap_future(self._closed_future))

    close = aclose

    def _close_in_thread(
        self, done: concurrent.futures.Future[None], pending: list[concurrent.futures.Future[Any]]
    ) -> None:
        try:
            # Every call submitted before aclose() (started or queued and not withdrawn).
            concurrent.futures.wait(pending)
            if self._sync is not None:
                self._sync.close()
            self._executor.shutdown(wait=True)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            done.set_exception(exc)
        else:
            done.set_result(None)

    async def __aenter__(self) -> AsyncSafeClient:
        try:
            await self.open()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"AsyncSafeClient(path={self._path!r})"


def _signature_source(name: str) -> Callable[..., Any]:
    """chromadb's AsyncCollection method when it has one, else the sync Collection's."""
    method: Callable[..., Any] = getattr(AsyncCollection, name, None) or getattr(Collection, name)
    return method


def _proxy(name: str) -> Callable[..., Any]:
    original = _signature_source(name)

    async def method(self: AsyncSafeCollection, *args: Any, **kwargs: Any) -> Any:
        return self._client._wrap(
            await self._client._submit(getattr(self._sync, name), *args, **kwargs)
        )

    method.__name__ = name
    method.__qualname__ = f"AsyncSafeCollection.{name}"
    method.__doc__ = (
        f"Behaves like ``chromadb.AsyncCollection.{name}``; runs in the worker process (see "
        "``safechroma.api.aio`` for cancellation).\n\n" + (original.__doc__ or "")
    )
    method.__wrapped__ = original  # type: ignore[attr-defined]
    return method


class AsyncSafeCollection(AsyncCollection):
    """chromadb's ``AsyncCollection`` whose calls run in a crash-isolated worker process.

    Get one from an :class:`AsyncSafeClient` exactly as from chromadb's async client, or open
    one on its own with :meth:`create`. Each method behaves like the same method of
    :class:`safechroma.SafeCollection`, awaitable, with the same errors, deadlines and retries.
    The read-only properties (``name``, ``id``, ``metadata``, ...) are chromadb's own.
    """

    _client: AsyncSafeClient  # type: ignore[assignment]
    _sync: SafeCollection
    _owns_client: bool

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(
            "AsyncSafeCollection is not constructed directly: use "
            "`await AsyncSafeCollection.create(path, name, ...)` or a collection method of "
            "AsyncSafeClient"
        )

    @classmethod
    def _adopt(cls, client: AsyncSafeClient, sync: SafeCollection) -> AsyncSafeCollection:
        self = cls.__new__(cls)
        self._client = client
        self._sync = sync
        self._owns_client = False
        return self

    @classmethod
    async def create(
        cls,
        path: str | os.PathLike[str],
        name: str,
        *,
        create: bool = True,
        embedding_function: Any = _AEF_GET_OR_CREATE,
        data_loader: Any = None,
        metadata: Any = None,
        configuration: Any = None,
        schema: Any = None,
        settings: Settings | None = None,
        tenant: str = DEFAULT_TENANT,
        database: str = DEFAULT_DATABASE,
        **options: Any,
    ) -> AsyncSafeCollection:
        """Open collection ``name`` in ``path`` with a client of its own.

        The arguments are those of :class:`safechroma.SafeCollection`. The collection owns its
        client: ``await col.aclose()`` (or leaving ``async with col``) closes it.

        Raises:
            chromadb.errors.NotFoundError: ``create=False`` and the collection does not exist.
        """
        client = await AsyncSafeClient.create(path, settings, tenant, database, **options)
        col: AsyncSafeCollection
        try:
            if create:
                col = await client.get_or_create_collection(
                    name,
                    schema=schema,
                    configuration=configuration,
                    metadata=metadata,
                    embedding_function=embedding_function,
                    data_loader=data_loader,
                )
            else:
                col = await client.get_collection(
                    name, embedding_function=embedding_function, data_loader=data_loader
                )
        except BaseException:
            await client.aclose()
            raise
        col._owns_client = True
        return col

    # chromadb's properties read these; they follow the sync collection (modify updates it).
    @property
    def _model(self) -> Any:  # type: ignore[override]  # chromadb: plain attributes
        return self._sync._model

    @property
    def _embedding_function(self) -> Any:  # type: ignore[override]  # chromadb: plain attributes
        return self._sync._embedding_function

    @property
    def _data_loader(self) -> Any:  # type: ignore[override]  # chromadb: plain attributes
        return self._sync._data_loader

    for _name in sorted(PROXIED):
        locals()[_name] = _proxy(_name)
    del _name

    async def aclose(self) -> None:
        """Close the client this collection owns (standalone use); otherwise do nothing."""
        if self._owns_client:
            await self._client.aclose()

    close = aclose

    async def __aenter__(self) -> AsyncSafeCollection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"AsyncSafeCollection(name={self.name!r})"


__all__ = ["AsyncSafeClient", "AsyncSafeCollection"]
