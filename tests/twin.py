"""Run one sequence of Chroma calls against any client and describe every outcome as data.

The differential tests run the same sequence against ``safechroma.SafeClient`` (in the test
process) and against ``chromadb.PersistentClient`` (in a child process, so the test process
never opens a Chroma directory itself) on twin directories, and compare the outcomes.

Run as a script: ``python twin.py OPS_PICKLE DB_PATH OUT_PICKLE`` uses chromadb directly.
"""

from __future__ import annotations

import math
import pickle
import sys
from typing import Any

import numpy as np

Op = tuple[str, str, tuple[Any, ...], dict[str, Any]]


def normalise(value: Any) -> Any:
    """Make a result comparable across processes: arrays to rounded lists, collections to facts."""
    from chromadb.api.models.Collection import Collection

    if isinstance(value, Collection):
        return ("Collection", value.name, value.metadata, str(value.id) != "")
    if isinstance(value, np.ndarray):
        return normalise(value.tolist())
    if isinstance(value, (np.floating, float)):
        return round(float(value), 4) if math.isfinite(float(value)) else str(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, dict):
        return {k: normalise(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [normalise(v) for v in value]
    return value


def run_ops(client: Any, ops: list[Op]) -> list[Any]:
    """Apply ``ops`` to ``client``; each op's target is "client" or a collection's name."""
    collections: dict[str, Any] = {}
    out: list[Any] = []
    for target, method, args, kwargs in ops:
        obj = client if target == "client" else collections[target]
        try:
            result = getattr(obj, method)(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the outcome is what we compare
            out.append(("error", type(exc).__module__, type(exc).__qualname__))
            continue
        if method in ("create_collection", "get_collection", "get_or_create_collection"):
            collections[result.name] = result
        if method == "list_collections":
            result = sorted(c.name for c in result)
        out.append(("ok", normalise(result)))
    return out


if __name__ == "__main__":
    import chromadb

    ops_path, db_path, out_path = sys.argv[1:4]
    with open(ops_path, "rb") as f:
        ops = pickle.load(f)
    outcomes = run_ops(chromadb.PersistentClient(db_path), ops)
    with open(out_path, "wb") as f:
        pickle.dump(outcomes, f)
