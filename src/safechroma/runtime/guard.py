"""A guard, installed in the worker only, against a chromadb bug that swaps vectors.

What it owns: the order of Chroma's own record writes inside the worker process. It patches
``chromadb.api.rust.RustBindingsAPI`` (the layer every write in the worker goes through:
``Collection`` methods, ``run_in_worker`` functions, the recovery's write-back) and nothing else.
It may not change any result or error a caller sees.

The bug (chromadb 1.5.9, unchanged upstream; reproduced with plain ``PersistentClient`` in one
process, see ``tests/test_guard.py``): when a process writes to a collection before its first
read, that first read's WAL backfill resets the HNSW writer's ``last_seen_seq_id``; the next
write re-applies every WAL row since the index was last persisted. A re-applied ``update`` of an
id that was absent the first time (Chroma ignored it) now finds the id and overwrites its
vector, and the later ``add`` is skipped: a record silently gets another write's vector, durably
once a flush persists it. Every respawned worker is a fresh process, so crashes make it likelier.

Two defences, each enough for the bug as reproduced, together robust:

1. **Read before the first write.** Before a process's first write to a collection, it counts
   the collection (which runs the backfill), so the reset happens before any write of this
   process and re-applies nothing.
2. **Only writes that take effect reach the WAL.** ``update`` rows for ids the collection lacks
   are not sent (Chroma ignores them anyway), so that a re-application, if one ever happens,
   replays only rows that took effect and converges. (``add`` of existing ids is filtered one
   level up, in the worker's dispatch.) Where Chroma would raise for such a row (a wrong or
   inconsistent dimension), the request goes to Chroma unchanged so its own error is raised.

A guard read that fails (a deleted collection, a damaged index) is ignored: the write itself
then raises chromadb's own error, with chromadb's message.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

_read_before_write: set[str] = set()
_lock = threading.Lock()
_installed = False


def install() -> None:
    """Patch chromadb's local API in this process (the worker). Idempotent."""
    global _installed
    if _installed:
        return
    from chromadb.api.rust import RustBindingsAPI

    cls: Any = RustBindingsAPI
    cls._add = _first_read(cls._add)
    cls._upsert = _first_read(cls._upsert)
    cls._delete = _first_read(cls._delete)
    cls._update = _first_read(_effective_updates_only(cls._update))
    cls.reset = _forget_on_reset(cls.reset)
    _installed = True


def _ensure_read(api: Any, collection_id: Any, tenant: str, database: str) -> None:
    key = str(collection_id)
    if key in _read_before_write:
        return
    with _lock:  # two threads' first writes wait for one read
        if key in _read_before_write:
            return
        try:
            api.bindings.count(key, tenant, database)
        except Exception:  # noqa: BLE001 - the write raises chromadb's own error
            return
        _read_before_write.add(key)


def _first_read(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a record write so that the collection is read in this process first."""
    import inspect

    signature = inspect.signature(method)

    def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        _ensure_read(self, a["collection_id"], str(a["tenant"]), str(a["database"]))
        return method(self, *args, **kwargs)

    guarded.__wrapped__ = method  # type: ignore[attr-defined]
    guarded.__name__ = method.__name__
    return guarded


def _effective_updates_only(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``_update`` so that rows for ids the collection lacks are not sent to Chroma."""
    import inspect

    signature = inspect.signature(method)

    def update(self: Any, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        keep = _present_rows(self, a)
        if keep is None:  # nothing to drop, or Chroma must see the request to raise its error
            return method(self, *args, **kwargs)
        if not keep:
            return True  # what Chroma's update returns; it would have changed nothing
        for key in ("ids", "embeddings", "metadatas", "documents", "uris"):
            value = a.get(key)
            if value is not None:
                a[key] = _take(value, keep)
        return method(*bound.args, **bound.kwargs)

    update.__wrapped__ = method  # type: ignore[attr-defined]
    update.__name__ = method.__name__
    return update


def _present_rows(api: Any, a: dict[str, Any]) -> list[int] | None:
    """Positions of the request's rows whose ids exist, or None to send it unchanged."""
    ids = a["ids"]
    cid, tenant, database = str(a["collection_id"]), a["tenant"], a["database"]
    try:
        present = set(
            api.bindings.get(cid, list(ids), None, None, 0, None, [], tenant, database).ids
        )
    except Exception:  # noqa: BLE001 - let Chroma raise its own error for the update
        return None
    if all(i in present for i in ids):
        return None
    embeddings = a.get("embeddings")
    if embeddings is not None:
        dims = {len(e) for e in embeddings}
        if len(dims) > 1:
            return None  # Chroma raises "Inconsistent dimensions in provided embeddings"
        try:
            dimension = api.bindings.get_collection_by_id(cid, tenant, database).dimension
        except Exception:  # noqa: BLE001
            return None
        if dimension is None or dims != {dimension}:
            return None  # Chroma raises its dimension error (or sets the dimension)
    return [i for i, rid in enumerate(ids) if rid in present]


def _take(value: Any, keep: list[int]) -> Any:
    if hasattr(value, "shape"):  # a numpy array: keep its type
        return value[keep]
    return [value[i] for i in keep]


def _forget_on_reset(method: Callable[..., Any]) -> Callable[..., Any]:
    def reset(self: Any) -> Any:
        try:
            return method(self)
        finally:
            with _lock:
                _read_before_write.clear()

    reset.__wrapped__ = method  # type: ignore[attr-defined]
    return reset
