"""SafeCollection: chromadb's ``Collection`` whose every call runs in the worker.

``SafeCollection`` subclasses ``chromadb.api.models.Collection.Collection`` so that code which
checks ``isinstance(col, chromadb.Collection)`` keeps working and the read-only properties
(``name``, ``id``, ``metadata``, ``configuration``, ...) are chromadb's own, computed from the
collection model the worker sent. Each public method is a proxy whose signature *is* chromadb's
(``__wrapped__``): the call is shipped to the worker and run there by the real ``Collection``
method, so argument checking, embedding and results are exactly chromadb's.

The embedding function runs in the worker: chromadb's ``Collection`` calls it inside ``add`` and
``query``, and running it there keeps any native code it uses (onnxruntime, torch) out of the
caller's process too. It travels there with cloudpickle, so lambdas and functions defined in
``__main__`` or a test module work.
"""

from __future__ import annotations

import inspect
import os
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from chromadb.api.models.Collection import Collection
from chromadb.config import DEFAULT_DATABASE, DEFAULT_TENANT

from .._errors import ClientClosedError
from .._policy import effective_timeout
from ..runtime.functions import FUNCTIONS, FunctionRef
from ..runtime.handles import Remote
from ..runtime.protocol import CollectionRef, Op, Request
from ..runtime.session import Session

if TYPE_CHECKING:
    from chromadb.api.collection_configuration import CreateCollectionConfiguration
    from chromadb.api.types import CollectionMetadata, Schema

    from .client import SafeClient

_UNSET: Any = object()


def _defaults() -> frozenset[int]:
    from chromadb.api.client import Client

    return frozenset(
        id(inspect.signature(getattr(Client, m)).parameters["embedding_function"].default)
        for m in (
            "create_collection",
            "get_collection",
            "get_or_create_collection",
            "get_collection_by_id",
        )
    )


# chromadb's default arguments mean "the collection's recorded function" or "chromadb's
# default": they go as they are (they hold no model until used).
_DEFAULTS = _defaults()


def sendable_function(ef: Any) -> Any:
    """What stands for ``ef`` in a request: a :class:`FunctionRef`, sent once per worker."""
    if ef is None or id(ef) in _DEFAULTS or isinstance(ef, FunctionRef):
        return ef
    return FUNCTIONS.ref(ef)


# Methods that only read: retried on a fresh worker after a crash.
READS = frozenset(
    {
        "count",
        "get",
        "peek",
        "query",
        "search",
        "get_indexing_status",
        "fork_count",
        "get_attached_function",
    }
)
# Writes that are safe to resend (duplicate ids in add are ignored; the others are
# idempotent), replayed only with replay_writes=True.
REPLAYABLE = frozenset({"add", "upsert", "update", "delete"})
OTHER_WRITES = frozenset({"modify", "fork", "attach_function", "detach_function"})
# Only what this chromadb's Collection has (fork_count came in 1.5.x, search and fork earlier).
PROXIED = frozenset(n for n in READS | REPLAYABLE | OTHER_WRITES if hasattr(Collection, n))


def _proxy(name: str) -> Callable[..., Any]:
    original = getattr(Collection, name)
    read = name in READS
    replay = name in REPLAYABLE

    embeds = _EMBEDDED_ARGS.get(name)
    signature = inspect.signature(original) if embeds else None

    def method(self: SafeCollection, *args: Any, **kwargs: Any) -> Any:
        client = self._client
        if client._closed:
            raise ClientClosedError(f"the SafeClient of collection {self.name!r} is closed")
        if embeds and signature is not None and self._caller_side():
            args, kwargs = self._embed_here(signature, embeds, args, kwargs)
        result = self._sup.call(
            self,
            name,
            args,
            kwargs,
            read=read,
            replay=replay and client._replay_writes,
            retries=client._read_retries,
            timeout=effective_timeout(client._timeout),
        )
        if isinstance(result, CollectionRef):  # fork() returns one
            return SafeCollection._adopt(
                client, result, self._embedding_function, self._data_loader
            )
        return result

    method.__name__ = name
    method.__qualname__ = f"SafeCollection.{name}"
    method.__doc__ = (
        f"Behaves like ``chromadb.Collection.{name}``; runs in the worker process.\n\n"
        + (original.__doc__ or "")
    )
    method.__wrapped__ = original  # type: ignore[attr-defined]
    return method


# Methods whose texts chromadb embeds: (texts argument, vectors argument, is a query).
_EMBEDDED_ARGS: dict[str, tuple[str, str, bool]] = {
    "add": ("documents", "embeddings", False),
    "upsert": ("documents", "embeddings", False),
    "update": ("documents", "embeddings", False),
    "query": ("query_texts", "query_embeddings", True),
}


class SafeCollection(Collection, Remote):
    """A Chroma collection whose calls run in a crash-isolated worker process.

    Get one from a :class:`safechroma.SafeClient` exactly as from chromadb's client, or open one
    directly::

        with SafeCollection("./db", "docs") as col:
            col.add(ids=["a"], embeddings=[[0.1, 0.2]], documents=["hello"])

    Args:
        path: the persist directory.
        name: the collection's name.
        create: create the collection if it does not exist (``get_or_create_collection``);
            with False, a missing collection raises chromadb's ``NotFoundError``.
        embedding_function: as in chromadb; runs in the worker (see module docs).
        data_loader: as in chromadb.
        metadata: collection metadata, used when it is created.
        configuration: collection configuration, used when it is created.
        schema: collection schema, used when it is created.
        settings: chromadb ``Settings`` for the client.
        tenant: the tenant.
        database: the database.
        **options: worker options (see :class:`safechroma.Options`), e.g. ``timeout=30``.

    Used standalone, the collection owns its client: ``close()`` (or leaving the ``with``
    block) closes it. A collection obtained from a ``SafeClient`` belongs to that client and
    its ``close()`` does nothing.
    """

    _sup: Session
    _client: SafeClient  # type: ignore[assignment]
    _slot: list[int]  # [worker serial, handle], shared with the finalizer
    _open_kwargs: dict[str, Any]  # how to reopen it in a fresh worker
    _owns_client: bool

    def __init__(
        self,
        path: str | os.PathLike[str],
        name: str,
        *,
        create: bool = True,
        embedding_function: Any = _UNSET,
        data_loader: Any = None,
        metadata: CollectionMetadata | None = None,
        configuration: CreateCollectionConfiguration | None = None,
        schema: Schema | None = None,
        settings: Any = None,
        tenant: str = DEFAULT_TENANT,
        database: str = DEFAULT_DATABASE,
        **options: Any,
    ) -> None:
        from .client import SafeClient

        client = SafeClient(path, settings, tenant, database, **options)
        extra: dict[str, Any] = {"data_loader": data_loader}
        if embedding_function is not _UNSET:
            extra["embedding_function"] = embedding_function
        try:
            if create:
                col = client.get_or_create_collection(
                    name,
                    schema=schema,
                    configuration=configuration,
                    metadata=metadata,
                    **extra,
                )
            else:
                col = client.get_collection(name, **extra)
        except BaseException:
            client.close()
            raise
        self.__dict__.update(col.__dict__)
        self._owns_client = True
        # Take over col's handle: col's finalizer must no longer release it, ours will.
        self._slot = list(col._slot)
        col._slot[0] = -1
        weakref.finalize(self, _release_slot, self._sup, self._slot)

    @classmethod
    def _adopt(
        cls,
        client: SafeClient,
        ref: CollectionRef,
        embedding_function: Any,
        data_loader: Any,
    ) -> SafeCollection:
        """Build the caller-side collection for a collection the worker opened."""
        handle, model, serial = ref
        self = cls.__new__(cls)
        self._client = client
        self._sup = client._sup
        self._model = model
        self._embedding_function = None if embedding_function is _UNSET else embedding_function
        self._data_loader = data_loader
        self._open_kwargs = (
            {}
            if embedding_function is _UNSET
            else {
                "embedding_function": sendable_function(embedding_function),
                "data_loader": data_loader,
            }
        )
        self._owns_client = False
        self._slot = [serial, handle]
        weakref.finalize(self, _release_slot, client._sup, self._slot)
        return self

    # The handle in the worker lives in a shared slot so the finalizer sees the latest one.
    @property
    def _handle(self) -> int:
        return int(self._slot[1])

    @_handle.setter
    def _handle(self, value: int) -> None:
        self._slot[1] = value

    @property
    def _handle_serial(self) -> int:
        return int(self._slot[0])

    @_handle_serial.setter
    def _handle_serial(self, value: int) -> None:
        self._slot[0] = value

    def _reopen_parent(self) -> Remote:
        return self._client

    def _reopen_request(self, path: str, parent_handle: int) -> Request:
        return Request(Op.OPEN_HANDLE, (parent_handle, self.id, self._open_kwargs))

    def _caller_side(self) -> bool:
        ref = self._open_kwargs.get("embedding_function")
        return isinstance(ref, FunctionRef) and ref.caller_side

    def _embed_here(
        self,
        signature: inspect.Signature,
        embeds: tuple[str, str, bool],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Compute the vectors in this process (a function that cannot run in the worker),
        with chromadb's own ``_embed``, so that only vectors are sent."""
        texts_arg, vectors_arg, is_query = embeds
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError:
            return args, kwargs  # chromadb reports the bad call, in the worker
        texts = bound.arguments.get(texts_arg)
        if texts is None or bound.arguments.get(vectors_arg) is not None:
            return args, kwargs
        if isinstance(texts, str):
            texts = [texts]
        bound.arguments[vectors_arg] = self._embed(input=texts, is_query=is_query)
        if is_query:
            del bound.arguments[texts_arg]  # chromadb takes one of the two
        return bound.args[1:], bound.kwargs

    for _name in sorted(PROXIED):
        locals()[_name] = _proxy(_name)
    del _name

    def modify(
        self,
        name: str | None = None,
        metadata: CollectionMetadata | None = None,
        configuration: Any = None,
    ) -> None:
        """Behaves like ``chromadb.Collection.modify``; runs in the worker process."""
        client = self._client
        if client._closed:
            raise ClientClosedError(f"the SafeClient of collection {self.name!r} is closed")
        self._sup.call(
            self,
            "modify",
            (name, metadata, configuration),
            {},
            read=False,
            replay=False,
            retries=0,
            timeout=effective_timeout(client._timeout),
        )
        # chromadb updates its cached model the same way after a successful modify.
        self._update_model_after_modify_success(name, metadata, configuration)

    modify.__wrapped__ = Collection.modify  # type: ignore[attr-defined]

    def close(self) -> None:
        """Close the client this collection owns (standalone use); otherwise do nothing."""
        if self._owns_client:
            self._client.close()

    def __copy__(self) -> SafeCollection:
        # chromadb's shallow copy shares the client; ours shares the worker-side handle too, so
        # the copy keeps the original alive: its finalizer releases that handle.
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.__dict__["_copied_from"] = self
        return new

    def __deepcopy__(self, memo: dict[int, Any]) -> SafeCollection:
        # As chromadb's Collection (its client's Rust bindings do not pickle).
        raise TypeError(f"cannot deepcopy {type(self).__name__!r} object: use copy.copy()")

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(f"cannot pickle {type(self).__name__!r} object")

    def __enter__(self) -> SafeCollection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _release_slot(sup: Session, slot: list[int]) -> None:
    if slot[0] >= 0:
        sup.release(slot[0], slot[1])
