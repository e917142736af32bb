"""The worker's side of the write journal (issue 21; format: :mod:`safechroma.storage.journal`).

What it owns: wrapping one opened client's server object (``client._server``, chromadb's
``RustBindingsAPI``) so that every write that Chroma accepted is in the journal before the call
returns, which is before the worker replies: an acknowledged write is in the journal. The
record is written before Chroma is called, so a write Chroma committed is in the journal even
when the worker dies before replying, and its fdatasync runs while Chroma commits
(:meth:`Journal.submit`); a write Chroma refused is voided with an abort record.
``Collection.add``/``upsert``/``update``/``delete`` reach the server as ``_add``, ``_upsert``,
``_update``, ``_delete`` with the embeddings already computed; ``run_in_worker`` functions and
the recovery's write-back go through the same object. Collection changes (``create_collection``,
``_modify``, ``delete_collection``, ``reset``) are journaled too.

It composes with :mod:`safechroma.runtime.guard`, which patches the class: these wrappers are
instance attributes around the guarded class methods, so a write runs journal -> guard ->
Chroma. A write Chroma accepted whose journal append failed raises ``OSError`` (the caller
must not believe it has a second copy).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from safechroma.storage import wal
from safechroma.storage.journal import Journal

_MARK = "_safechroma_journal"


def enabled(path: str, switch: bool) -> bool:
    """The journal is kept when ``Options.journal`` is on and the WAL mode is not ``"chroma"``."""
    return switch and wal.retention_mode(path) != "chroma"


def setup(client: Any, path: str, switch: bool) -> Journal | None:
    """At the worker's open: install the journal when it is on; when it is off, move an
    existing journal aside (``.safechroma/journal-off-<stamp>``, kept), since writes made
    without it would make it stale, and a repair must never write stale records back."""
    if enabled(path, switch):
        return install(client, path)
    import datetime as _dt
    import os

    from safechroma.storage.journal import journal_dir

    src = journal_dir(path)
    if os.path.isdir(src) and getattr(client, "_server", None) is not None:
        stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        os.rename(src, f"{src}-off-{stamp}")
    return None


def install(client: Any, path: str) -> Journal | None:
    """Wrap ``client``'s server object (once per server: chromadb shares it per path)."""
    server = getattr(client, "_server", None)
    if server is None:
        return None
    existing: Journal | None = getattr(server, _MARK, None)
    if existing is not None:
        return existing
    journal = Journal(path)
    for name in ("_add", "_upsert", "_update"):
        setattr(server, name, _records(server, journal, getattr(server, name), name[1:]))
    server._delete = _delete(server, journal, server._delete)
    server.create_collection = _create(server, journal, server.create_collection)
    server._modify = _modify(server, journal, server._modify)
    server.delete_collection = _drop(server, journal, server.delete_collection)
    server.reset = _reset(journal, server.reset)
    setattr(server, _MARK, journal)
    return journal


def installed(client: Any) -> Journal | None:
    """The journal wrapped around ``client``'s server, if any."""
    return getattr(getattr(client, "_server", None), _MARK, None)


def _bind(method: Callable[..., Any], args: Any, kwargs: Any) -> dict[str, Any]:
    bound = inspect.signature(method).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _announce(server: Any, journal: Journal, cid: str, tenant: str, database: str) -> None:
    """A collection record before this session's first record write to ``cid``."""
    if cid in journal.announced:
        return
    c = server.bindings.get_collection_by_id(cid, tenant, database)
    journal.collection(
        cid,
        c.name,
        metadata=c.metadata,
        configuration=c.configuration,
        schema=c.schema,
        dimension=c.dimension,
        tenant=tenant,
        database=database,
    )


def _failed(exc: BaseException) -> OSError:
    return OSError(f"the write reached Chroma but not safechroma's journal: {exc!r}")


def _journaled(
    journal: Journal,
    method: Callable[..., Any],
    args: Any,
    kwargs: Any,
    op: str,
    cid: str,
    ids: Any,
    a: dict[str, Any],
) -> Any:
    """Chroma's write and its journal record: the record is written first (a worker killed in
    Chroma's write must not leave Chroma ahead of the journal: a repair would then take the
    journal's older view for the truth), its fdatasync runs in the journal's thread while
    Chroma commits (both release the GIL), so the reply waits for the slower of the two, not
    their sum; a write Chroma refused is voided by an abort record.
    """
    try:
        seq, fut = journal.submit(
            op,
            cid,
            ids,
            embeddings=a.get("embeddings"),
            metadatas=a.get("metadatas"),
            documents=a.get("documents"),
        )
    except OSError as exc:
        raise OSError(
            f"safechroma's journal could not record the write, so Chroma was not asked: {exc!r}"
        ) from exc
    except Exception as exc:
        # Arguments the record cannot hold (ragged embeddings, a value JSON cannot carry) are
        # mostly ones Chroma refuses: its own error is the one the caller must see.
        method(*args, **kwargs)
        raise _failed(exc) from exc
    try:
        result = method(*args, **kwargs)
    except BaseException:
        try:
            fut.result()
            journal.abort(seq)
        except Exception:  # noqa: BLE001 - not written, or the abort failed: Chroma's error wins
            pass
        raise
    try:
        fut.result()
    except Exception as exc:
        raise _failed(exc) from exc
    return result


def _records(server: Any, journal: Journal, method: Callable[..., Any], op: str) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        a = _bind(method, args, kwargs)
        cid = str(a["collection_id"])
        with journal.order:
            try:
                _announce(server, journal, cid, a["tenant"], a["database"])
            except Exception:  # noqa: BLE001 - a missing collection: Chroma raises its error
                return method(*args, **kwargs)
            return _journaled(journal, method, args, kwargs, op, cid, a["ids"], a)

    wrapper.__wrapped__ = method  # type: ignore[attr-defined]
    return wrapper


def _delete(server: Any, journal: Journal, method: Callable[..., Any]) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        a = _bind(method, args, kwargs)
        ids = a.get("ids")
        if a.get("where") or a.get("where_document"):
            # Only a filtered delete needs a read first: which ids it removes.
            got = server._get(
                a["collection_id"],
                ids=ids,
                where=a.get("where"),
                where_document=a.get("where_document"),
                limit=a.get("limit"),
                include=[],
                tenant=a["tenant"],
                database=a["database"],
            )
            ids = list(got["ids"])
        if not ids:
            return method(*args, **kwargs)
        with journal.order:
            cid = str(a["collection_id"])
            return _journaled(journal, method, args, kwargs, "delete", cid, ids, {})

    wrapper.__wrapped__ = method  # type: ignore[attr-defined]
    return wrapper


def _create(server: Any, journal: Journal, method: Callable[..., Any]) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        a = _bind(method, args, kwargs)
        existed = False
        if a.get("get_or_create"):
            try:
                server.bindings.get_collection(a["name"], a["tenant"], a["database"])
                existed = True
            except Exception:  # noqa: BLE001 - not there: this call creates it
                existed = False
        model = method(*args, **kwargs)
        try:
            journal.collection(
                str(model.id),
                model.name,
                metadata=model.metadata,
                configuration=model.configuration_json,
                schema=model.serialized_schema,
                dimension=model.dimension,
                tenant=a["tenant"],
                database=a["database"],
                created=not existed,
            )
        except Exception as exc:
            raise _failed(exc) from exc
        return model

    wrapper.__wrapped__ = method  # type: ignore[attr-defined]
    return wrapper


def _modify(server: Any, journal: Journal, method: Callable[..., Any]) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = method(*args, **kwargs)
        a = _bind(method, args, kwargs)
        try:
            journal.announced.discard(str(a["id"]))
            _announce(server, journal, str(a["id"]), a["tenant"], a["database"])
        except Exception as exc:
            raise _failed(exc) from exc
        return result

    wrapper.__wrapped__ = method  # type: ignore[attr-defined]
    return wrapper


def _recorded_first(
    journal: Journal, record: Callable[[], int], what: str, call: Callable[[], Any]
) -> Any:
    """Journal ``record()`` durably, then ``call()`` Chroma; abort the record if Chroma raises.

    For a drop and a reset, as for record writes (see _journaled): a worker killed in between
    must not leave what Chroma removed alive in the journal, for a repair to bring back.
    Call under ``journal.order``.
    """
    try:
        seq = record()
    except OSError as exc:
        raise OSError(
            f"safechroma's journal could not record the {what}, so Chroma was not asked: {exc!r}"
        ) from exc
    try:
        return call()
    except BaseException:
        try:
            journal.abort(seq)
        except Exception:  # noqa: BLE001 - the abort failed: Chroma's error wins
            pass
        raise


def _drop(server: Any, journal: Journal, method: Callable[..., Any]) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        a = _bind(method, args, kwargs)
        with journal.order:
            try:
                cid = str(server.bindings.get_collection(a["name"], a["tenant"], a["database"]).id)
            except Exception:  # noqa: BLE001 - Chroma raises its own error for a missing one
                return method(*args, **kwargs)
            return _recorded_first(
                journal,
                lambda: journal.drop_collection(cid, a["name"]),
                "drop",
                lambda: method(*args, **kwargs),
            )

    wrapper.__wrapped__ = method  # type: ignore[attr-defined]
    return wrapper


def _reset(journal: Journal, method: Callable[..., Any]) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with journal.order:
            return _recorded_first(journal, journal.reset, "reset", lambda: method(*args, **kwargs))

    wrapper.__wrapped__ = method  # type: ignore[attr-defined]
    return wrapper


def sqlite_lost(path: str) -> bool:
    """``chroma.sqlite3`` is gone from a directory that has a journal (call before the open:
    Chroma would create an empty one). Its orphaned segment directories are moved aside into
    ``.safechroma/quarantine`` (renamed, never deleted) so the restore starts clean."""
    import os
    import uuid

    from safechroma.storage.journal import has_journal

    if os.path.exists(os.path.join(path, "chroma.sqlite3")) or not has_journal(path):
        return False
    import datetime as _dt

    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    qdir = os.path.join(path, ".safechroma", "quarantine", f"{stamp}-sqlite-lost")
    for name in os.listdir(path):
        try:
            uuid.UUID(name)
        except ValueError:
            continue
        if os.path.isdir(os.path.join(path, name)):
            os.makedirs(qdir, exist_ok=True)
            os.rename(os.path.join(path, name), os.path.join(qdir, name))
    return True


def restore(client: Any, path: str, journal: Journal | None, batch: int = 1000) -> int:
    """Rebuild every collection of the journal through ``client`` (a fresh, empty directory
    whose ``chroma.sqlite3`` was lost); returns the records written. Each collection gets a new
    id, recorded in the journal as the continuation of the old one."""
    import sys

    import numpy as np

    from safechroma.storage.journal import _create_configuration, replay

    written = 0
    for old in replay(path).values():
        if old.name is None:
            continue
        col = client.get_or_create_collection(
            old.name,
            metadata=old.metadata or None,
            configuration=_create_configuration(old.configuration),
            embedding_function=None,
        )
        if journal is not None:
            journal.collection(
                str(col.id),
                old.name,
                metadata=old.metadata,
                configuration=old.configuration,
                schema=old.schema,
                dimension=old.dimension,
                tenant=old.tenant,
                database=old.database,
                adopt=old.id,
            )
        ids = [i for i, r in old.records.items() if r["vector"] is not None]
        groups: dict[tuple[bool, bool], list[str]] = {}
        for i in ids:
            r = old.records[i]
            groups.setdefault((r["document"] is None, r["metadata"] is None), []).append(i)
        for (no_doc, no_meta), part_ids in groups.items():
            for s in range(0, len(part_ids), batch):
                part = part_ids[s : s + batch]
                recs = [old.records[i] for i in part]
                col.upsert(
                    ids=part,
                    embeddings=np.stack([r["vector"] for r in recs]),
                    documents=None if no_doc else [r["document"] for r in recs],
                    metadatas=None if no_meta else [r["metadata"] for r in recs],
                )
                written += len(part)
    print(
        f"safechroma: chroma.sqlite3 was missing; {written} records rebuilt from the journal",
        file=sys.stderr,
        flush=True,
    )
    return written
