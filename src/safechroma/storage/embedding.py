"""Records saved aside by a repair, and the embedding function that re-embeds them.

A record whose vector exists nowhere is saved beside the salvage file (documents and metadata)
and deleted; :func:`restore_saved_records` brings it back by re-embedding its document with the
function Chroma recorded for the collection (:func:`recorded_embedding_function`) or one the
caller names, after :func:`check_embedding_function` showed that function reproduces the stored
vectors.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np

from safechroma.storage.layout import (
    SQLITE_FILE,
    _ro,
    _write_atomic,
    backup_files,
)

# -- records whose vectors exist nowhere: put them back with an embedding function ----------

EmbedFn = Callable[[list[str]], Sequence[Sequence[float]]]


# Relative error allowed between a stored vector and the same document embedded again
# (float32 round trips and thread-count-dependent sums differ in the last bits).
_REEMBED_RTOL = 1e-4


def _or_empty(x: Any) -> Any:
    """``x``, or ``[]`` for ``None`` (chromadb returns embeddings as a numpy array)."""
    return [] if x is None else x


def check_embedding_function(
    col: Any,
    embed: EmbedFn,
    *,
    space: str = "l2",
    sample: int = 16,
    exclude: Sequence[str] = (),
) -> str | None:
    """Check that ``embed`` reproduces vectors the collection still has.

    Embeds the documents of up to ``sample`` live records that have a document and a vector
    (ids in ``exclude``, whose vectors Chroma cannot find, are skipped) and compares them (for
    cosine, the directions). Returns ``None`` when they match, else why not (also when no
    record can be checked: an unchecked function is never used).
    """
    skip = set(exclude)
    try:
        ids = [i for i in col.get(include=[], limit=max(64, 4 * sample) + len(skip))["ids"]]
        ids = [i for i in ids if i not in skip][: 4 * sample]
        got = col.get(ids=ids, include=["documents", "embeddings"]) if ids else {}
    except Exception as exc:  # noqa: BLE001 - e.g. "Error finding id": nothing to check with
        return f"cannot read surviving records to check the function: {exc}"
    pairs = [
        (d, np.asarray(e, dtype=np.float64))
        for d, e in zip(
            _or_empty(got.get("documents")), _or_empty(got.get("embeddings")), strict=False
        )
        if d is not None and e is not None
    ][:sample]
    if not pairs:
        return "no surviving record with a document and a vector to check the function against"
    try:
        new = np.asarray(embed([d for d, _ in pairs]), dtype=np.float64)
    except Exception as exc:  # noqa: BLE001 - the caller's function failed: say so
        return f"the embedding function failed: {type(exc).__name__}: {exc}"
    if new.shape != (len(pairs), pairs[0][1].size):
        want = (len(pairs), pairs[0][1].size)
        return f"the embedding function returned shape {new.shape}, expected {want}"
    for (doc, old), v in zip(pairs, new, strict=True):
        a, b = (v / np.linalg.norm(v), old / np.linalg.norm(old)) if space == "cosine" else (v, old)
        scale = max(float(np.linalg.norm(b)), 1e-12)
        if float(np.linalg.norm(a - b)) > _REEMBED_RTOL * scale:
            return f"the embedding function does not reproduce the stored vector of {doc[:40]!r}"
    return None


def saved_records(path: str | os.PathLike[str], collection: str | None = None) -> list[str]:
    """``.removed.json`` files of ``path`` (records saved by a repair) not yet fully restored."""
    out: list[str] = []
    for f in backup_files(path):
        if not f.endswith(".npz.removed.json"):
            continue
        if os.path.exists(f + ".restored"):
            with open(f + ".restored", "rb") as fh:
                if not json.loads(fh.read()).get("remaining"):
                    continue
        if collection is not None:
            with open(f[: -len(".npz.removed.json")] + ".json", "rb") as fh:
                if json.loads(fh.read()).get("name") != collection:
                    continue
        out.append(f)
    return out


def recorded_embedding_function(
    path: str | os.PathLike[str], collection: str
) -> dict[str, Any] | None:
    """The embedding function ``collections.schema_str`` records for ``collection``.

    ``None`` when the collection was created with ``embedding_function=None`` (chromadb then
    still *reports* its default function when the collection is opened: FACTS §3, so only this
    raw record tells) or records a ``legacy``/``unknown`` one that cannot be rebuilt.
    """
    con = _ro(os.path.join(os.fspath(path), SQLITE_FILE))
    try:
        row = con.execute(
            "SELECT schema_str FROM collections WHERE name = ?", (collection,)
        ).fetchone()
    finally:
        con.close()
    if row is None or not row[0]:
        return None
    try:
        ef = json.loads(row[0])["keys"]["#embedding"]["float_list"]["vector_index"]["config"].get(
            "embedding_function"
        )
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(ef, dict) or ef.get("type") != "known" or not ef.get("name"):
        return None
    return ef


def _build_recorded(record: dict[str, Any]) -> EmbedFn:
    """Build a recorded, known embedding function, offline only (no model download)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    name = str(record["name"])
    if name in ("default", "onnx_mini_lm_l6_v2"):
        from chromadb.utils.embedding_functions.onnx_mini_lm_l6_v2 import ONNXMiniLM_L6_V2

        model = os.path.join(
            str(ONNXMiniLM_L6_V2.DOWNLOAD_PATH), ONNXMiniLM_L6_V2.EXTRACTED_FOLDER_NAME
        )
        if not os.path.isdir(model):
            raise LookupError(
                f"the collection's embedding function {name!r} needs a model that is not on this "
                f"machine ({model}); pass one that works offline"
            )
    from chromadb.utils.embedding_functions import known_embedding_functions

    if name not in known_embedding_functions:
        raise LookupError(f"the collection's embedding function {name!r} is not registered here")
    fn: Any = known_embedding_functions[name].build_from_config(record.get("config") or {})
    return cast(EmbedFn, fn)


def load_embedding_function(spec: str | EmbedFn) -> EmbedFn:
    """``module:name`` (a function, or a class instantiated without arguments) or a callable."""
    if callable(spec):
        return spec
    module, _, name = str(spec).partition(":")
    if not module or not name:
        raise ValueError(f"expected module:name, got {spec!r}")
    import importlib

    obj = getattr(importlib.import_module(module), name)
    if isinstance(obj, type):
        obj = obj()
    if not callable(obj):
        raise TypeError(f"{spec} is not callable")
    fn: EmbedFn = obj
    return fn


def restore_saved_records(
    client: Any,
    path: str,
    collection: str,
    embedding_function: str | EmbedFn | None = None,
    *,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Put back the records a repair saved (their vectors existed nowhere), re-embedded.

    Run it in the process that owns the directory (the CLI runs it in a child; :func:`reembed`
    in the SafeClient worker). The function is ``embedding_function`` when given, else the one
    the collection's record names (only a known function that works offline; never chromadb's
    reported default for a collection that never had one), and it is used only after it
    reproduced vectors that survived (:func:`check_embedding_function`). Ids the collection has
    again (the application re-added them) are left alone; records without a document cannot be
    re-embedded and stay saved.

    Returns:
        ``{"collection", "restored", "already_present", "remaining", "files", "error"}``;
        ``error`` is ``None`` or why nothing was restored.
    """
    out: dict[str, Any] = {
        "collection": collection,
        "restored": [],
        "already_present": [],
        "remaining": [],
        "files": [],
        "error": None,
    }
    files = saved_records(path, collection)
    out["files"] = files
    if not files:
        return out
    try:
        if embedding_function is None:
            record = recorded_embedding_function(path, collection)
            if record is None:
                raise LookupError(
                    f"collection {collection!r} records no embedding function it can be rebuilt "
                    "from (created with embedding_function=None or a legacy one); pass one"
                )
            embed = _build_recorded(record)
        else:
            embed = load_embedding_function(embedding_function)
    except Exception as exc:  # noqa: BLE001 - reported; nothing is changed
        out["error"] = f"{type(exc).__name__}: {exc}"
        return out
    col = client.get_collection(collection)
    space = "l2"
    for f in files:
        with open(f[: -len(".npz.removed.json")] + ".json", "rb") as fh:
            space = json.loads(fh.read()).get("space") or space
    why = check_embedding_function(col, embed, space=space)
    if why is not None:
        out["error"] = why
        return out
    for f in files:
        with open(f, "rb") as fh:
            saved = [r for r in json.loads(fh.read()) if isinstance(r, dict) and "id" in r]
        done: set[str] = set()
        if os.path.exists(f + ".restored"):
            with open(f + ".restored", "rb") as fh:
                done = set(json.loads(fh.read()).get("restored_ids") or [])
        todo = [r for r in saved if r["id"] not in done]
        restored: list[str] = []
        remaining: list[str] = []
        for s in range(0, len(todo), batch_size):
            chunk = todo[s : s + batch_size]
            present = set(col.get(ids=[r["id"] for r in chunk], include=[])["ids"])
            out["already_present"] += [r["id"] for r in chunk if r["id"] in present]
            ready = [r for r in chunk if r["id"] not in present and r.get("document") is not None]
            remaining += [
                r["id"] for r in chunk if r["id"] not in present and r.get("document") is None
            ]
            if not ready:
                continue
            vecs = np.asarray(embed([r["document"] for r in ready]), dtype=np.float32)
            with_meta = [k for k, r in enumerate(ready) if r.get("metadata")]
            without = [k for k, r in enumerate(ready) if not r.get("metadata")]
            for group, metas in ((with_meta, True), (without, False)):
                if not group:
                    continue
                col.add(
                    ids=[ready[k]["id"] for k in group],
                    embeddings=vecs[group],
                    documents=[ready[k]["document"] for k in group],
                    metadatas=[ready[k]["metadata"] for k in group] if metas else None,
                )
            restored += [r["id"] for r in ready]
        out["restored"] += restored
        out["remaining"] += remaining
        _write_atomic(
            f + ".restored",
            json.dumps(
                {"restored_ids": sorted(done | set(restored)), "remaining": remaining}
            ).encode(),
        )
    return out
