"""SafeClient: ``chromadb.PersistentClient``'s API, served by a crash-isolated worker."""

from __future__ import annotations

import inspect
import os
import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from uuid import UUID

from chromadb.api import ClientAPI
from chromadb.api.client import Client
from chromadb.config import DEFAULT_DATABASE, DEFAULT_TENANT, Settings

from .._errors import ClientClosedError
from .._policy import Options, Stats, effective_timeout
from ..runtime import session as _session
from ..runtime.handles import Remote
from ..runtime.protocol import CollectionRef, Op, Request
from .collection import _UNSET, SafeCollection, sendable_function

F = TypeVar("F", bound=Callable[..., Any])


def _mirror(original: Callable[..., Any], note: str = "") -> Callable[[F], F]:
    """Give ``fn`` chromadb's signature and docs, after checking its parameters match.

    Args:
        original: the chromadb method mirrored (sync ``Client`` or ``AsyncClient``).
        note: a sentence the docs add about what safechroma does differently.
    """

    def decorate(fn: F) -> F:
        ours = [(p.name, p.kind) for p in inspect.signature(fn).parameters.values()]
        theirs = [(p.name, p.kind) for p in inspect.signature(original).parameters.values()]
        if ours != theirs:  # pragma: no cover - caught at import, i.e. by every test run
            raise TypeError(f"{fn.__qualname__} does not mirror {original.__qualname__}")
        fn.__wrapped__ = original  # type: ignore[attr-defined]
        owner = original.__qualname__.rsplit(".", 1)[0]
        fn.__doc__ = (
            f"Behaves like ``chromadb`` ``{owner}.{original.__name__}``; runs in the worker"
            f"{note}.\n\n" + (original.__doc__ or "")
        )
        return fn

    return decorate


def _default(method: Callable[..., Any], name: str) -> Any:
    return inspect.signature(method).parameters[name].default


# chromadb's own default objects, so that omitting an argument means exactly what it means
# to chromadb (its default embedding function included: it is only loaded if used).
_EF_CREATE = _default(Client.create_collection, "embedding_function")
_EF_GET = _default(Client.get_collection, "embedding_function")
_EF_GET_OR_CREATE = _default(Client.get_or_create_collection, "embedding_function")
_EF_BY_ID = _default(Client.get_collection_by_id, "embedding_function")


def _forward(name: str) -> Callable[..., Any]:
    def method(self: SafeClient, *args: Any, **kwargs: Any) -> Any:
        return self._call(name, *args, **kwargs)

    method.__name__ = name
    method.__qualname__ = f"SafeClient.{name}"
    return method


_READS = frozenset(
    {
        "heartbeat",
        "get_version",
        "count_collections",
        "get_max_batch_size",
        "get_user_identity",
        "list_collections",
        "get_collection",
        "get_or_create_collection",
        "get_collection_by_id",
        "_count",
        "_get",
        "_peek",
        "_query",
    }
)


class SafeClient(ClientAPI, Remote):
    """A drop-in ``chromadb.PersistentClient`` whose calls run in a supervised worker process.

    Args:
        path: the persist directory, as for ``chromadb.PersistentClient``.
        settings: chromadb ``Settings``; ``persist_directory`` and ``is_persistent`` are set
            from ``path`` as chromadb does.
        tenant: the tenant.
        database: the database.
        **options: see :class:`safechroma.Options` (``timeout``, ``read_retries``,
            ``replay_writes``, ``lock_timeout``, ``validator``, ``recovery``, ``breaker``,
            ``memory_limit``, ``standby``, ``on_event``, ...).

    Raises:
        DirectoryLockedError: another process owns ``path``.
        RecoveryError: ``path`` is damaged and could not be repaired.
        WorkerStartError: no worker could open ``path``.

    Every ``SafeClient`` and ``SafeCollection`` on the same path in one process shares one
    worker. Thread-safe. Use it as a context manager or call :meth:`close`.

    ``copy.copy(client)`` is another handle on the same worker (closing one leaves the other
    open); ``copy.deepcopy`` and ``pickle`` raise ``TypeError`` as chromadb's client does, so
    code that deep-copies a config holding a client (mem0) falls back to sharing it.
    """

    tenant: str
    database: str

    def __init__(
        self,
        path: str | os.PathLike[str] = "./chroma",
        settings: Settings | None = None,
        tenant: str = DEFAULT_TENANT,
        database: str = DEFAULT_DATABASE,
        **options: Any,
    ) -> None:
        opts = Options(**options)
        if settings is None:
            settings = Settings()
        # The same adjustments chromadb.PersistentClient makes.
        settings.persist_directory = str(path)
        settings.is_persistent = True
        self._path = str(path)
        self._settings = settings
        self.tenant = str(tenant)
        self.database = str(database)
        self._timeout = opts.timeout
        self._read_retries = opts.read_retries
        self._replay_writes = opts.replay_writes
        self._closed = True
        self._sup = _session.acquire(self._path, opts, (settings, self.tenant, self.database))
        self._closed = False
        self._finalizer = weakref.finalize(self, _session.release, self._sup)
        # Not at interpreter exit: the supervisor's own exit hook closes every client there,
        # as a program that ends (the worker may stay warm, Options.keep_warm), where an
        # explicit close() is a program done with the directory.
        self._finalizer.atexit = False
        try:
            # chromadb opens the directory in its constructor, so errors surface here too.
            self.heartbeat()
        except BaseException:
            self.close()
            raise

    # -- plumbing --------------------------------------------------------------------------

    def _reopen_request(self, path: str, parent_handle: int) -> Request:
        return Request(Op.OPEN, (path, self._settings, self.tenant, self.database, None))

    def _call(self, method: str, *args: Any, by_value: bool = False, **kwargs: Any) -> Any:
        if self._closed:
            raise ClientClosedError(f"this SafeClient for {self._path} is closed")
        return self._sup.call(
            self,
            method,
            args,
            kwargs,
            read=method in _READS,
            replay=False,
            retries=self._read_retries,
            timeout=effective_timeout(self._timeout),
            by_value=by_value,
        )

    def _collection(
        self, ref: CollectionRef, embedding_function: Any, data_loader: Any
    ) -> SafeCollection:
        return SafeCollection._adopt(self, ref, embedding_function, data_loader)

    # -- ClientAPI -------------------------------------------------------------------------

    @_mirror(Client.heartbeat)
    def heartbeat(self) -> int:
        return int(self._call("heartbeat"))

    @_mirror(Client.get_version)
    def get_version(self) -> str:
        return str(self._call("get_version"))

    @_mirror(Client.get_settings)
    def get_settings(self) -> Settings:
        return self._settings

    @_mirror(Client.get_max_batch_size)
    def get_max_batch_size(self) -> int:
        return int(self._call("get_max_batch_size"))

    @_mirror(Client.get_user_identity)
    def get_user_identity(self) -> Any:
        return self._call("get_user_identity")

    @_mirror(Client.list_collections)
    def list_collections(
        self, limit: int | None = None, offset: int | None = None
    ) -> Sequence[SafeCollection]:
        refs = self._call("list_collections", limit, offset)
        return [self._collection(ref, _UNSET, None) for ref in refs]

    @_mirror(Client.count_collections)
    def count_collections(self) -> int:
        return int(self._call("count_collections"))

    @_mirror(Client.create_collection)
    def create_collection(
        self,
        name: str,
        schema: Any = None,
        configuration: Any = None,
        metadata: Any = None,
        embedding_function: Any = _EF_CREATE,
        data_loader: Any = None,
        get_or_create: bool = False,
    ) -> SafeCollection:
        ref = self._call(
            "create_collection",
            name,
            schema,
            configuration,
            metadata,
            sendable_function(embedding_function),
            data_loader,
            get_or_create,
            by_value=True,
        )
        return self._collection(ref, embedding_function, data_loader)

    @_mirror(Client.get_collection)
    def get_collection(
        self, name: str, embedding_function: Any = _EF_GET, data_loader: Any = None
    ) -> SafeCollection:
        ref = self._call(
            "get_collection",
            name,
            sendable_function(embedding_function),
            data_loader,
            by_value=True,
        )
        return self._collection(ref, embedding_function, data_loader)

    @_mirror(Client.get_or_create_collection)
    def get_or_create_collection(
        self,
        name: str,
        schema: Any = None,
        configuration: Any = None,
        metadata: Any = None,
        embedding_function: Any = _EF_GET_OR_CREATE,
        data_loader: Any = None,
    ) -> SafeCollection:
        ref = self._call(
            "get_or_create_collection",
            name,
            schema,
            configuration,
            metadata,
            sendable_function(embedding_function),
            data_loader,
            by_value=True,
        )
        return self._collection(ref, embedding_function, data_loader)

    @_mirror(Client.get_collection_by_id)
    def get_collection_by_id(
        self, id: UUID, embedding_function: Any = _EF_BY_ID, data_loader: Any = None
    ) -> SafeCollection:
        ref = self._call(
            "get_collection_by_id",
            id,
            sendable_function(embedding_function),
            data_loader,
            by_value=True,
        )
        return self._collection(ref, embedding_function, data_loader)

    @_mirror(Client.delete_collection)
    def delete_collection(self, name: str) -> None:
        self._call("delete_collection", name)

    @_mirror(Client.reset)
    def reset(self) -> bool:
        return bool(self._call("reset"))

    @_mirror(Client.set_tenant)
    def set_tenant(self, tenant: str, database: str = DEFAULT_DATABASE) -> None:
        self._call("set_tenant", tenant, database)
        self.tenant, self.database = tenant, database

    @_mirror(Client.set_database)
    def set_database(self, database: str) -> None:
        self._call("set_database", database)
        self.database = database

    @staticmethod
    def clear_system_cache() -> None:
        """Does nothing: the worker owns Chroma's system cache; a respawn starts it afresh."""

    # BaseAPI's record-level methods, for code written against ServerAPI-style calls.
    _add = _forward("_add")
    _count = _forward("_count")
    _delete = _forward("_delete")
    _get = _forward("_get")
    _modify = _forward("_modify")
    _peek = _forward("_peek")
    _query = _forward("_query")
    _update = _forward("_update")
    _upsert = _forward("_upsert")

    # -- what safechroma adds ----------------------------------------------------------------

    @property
    def path(self) -> str:
        """The persist directory."""
        return self._path

    def stats(self) -> Stats:
        """Counters and facts about the worker (calls, deaths by signal, respawns, ...)."""
        return self._sup.stats()

    def reset_breaker(self) -> None:
        """Close the crash-loop breaker so the next call may start a worker at once."""
        self._sup.reset_breaker()

    def run_in_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(chroma_client, *args)`` inside the worker and return its result.

        ``chroma_client`` is the worker's real ``chromadb`` client for this directory. ``fn``
        travels by cloudpickle; its result must be plain data (numbers, strings, lists, dicts,
        numpy arrays). Not retried after a crash.
        """
        if self._closed:
            raise ClientClosedError(f"this SafeClient for {self._path} is closed")
        return self._sup.run(self, fn, args, effective_timeout(self._timeout))

    def close(self) -> None:
        """Release this client; the last one on a path stops the worker and frees the lock."""
        if not self._closed:
            self._closed = True
            self._finalizer()

    def __copy__(self) -> SafeClient:
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        if not self._closed:
            # One more reference on the same supervisor: the worker and the lock stay the same.
            sup = _session.acquire(self._path, self._sup.options, self._sup.primary)
            if sup is not self._sup:  # pragma: no cover - an open client keeps its supervisor
                _session.release(sup)
                raise RuntimeError(f"the worker of {self._path} changed while copying")
            new._finalizer = weakref.finalize(new, _session.release, sup)
            new._finalizer.atexit = False  # as in __init__
        return new

    def __deepcopy__(self, memo: dict[int, Any]) -> SafeClient:
        # chromadb's client raises TypeError here (its Rust bindings do not pickle); a deep copy
        # would need a second worker on the same directory, which must never exist.
        raise TypeError(f"cannot deepcopy {type(self).__name__!r} object: use copy.copy()")

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(f"cannot pickle {type(self).__name__!r} object")

    def __enter__(self) -> SafeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafeClient(path={self._path!r})"


# Frameworks check for chromadb's concrete client: mem0's pydantic config declares
# ``client: chromadb.api.client.Client``. A virtual subclass passes ``isinstance`` without
# inheriting any of Client's methods, which would reach for a chromadb System in this process.
Client.register(SafeClient)
