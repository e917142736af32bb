"""Embedding functions for tests/test_functions.py, importable in every worker.

``CountingEF`` counts, per process, how often it was pickled (in the caller) and unpickled
(in a worker), so a test can check that a function travels once per worker, not per call.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any

import numpy as np
from chromadb.api.types import Documents, EmbeddingFunction, Embeddings
from chromadb.utils.embedding_functions import register_embedding_function

PICKLED = 0
UNPICKLED = 0
BUILT_FROM_CONFIG = 0


def hash_vector(text: str, dim: int = 8) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [b / 255.0 for b in digest[:dim]]


class CountingEF(EmbeddingFunction[Documents]):
    """Not registered: it travels by value (here: by reference to this module)."""

    def __init__(self, dim: int = 8) -> None:
        self.dim = dim
        self.weights = np.zeros(1 << 18, dtype=np.float32)  # 1 MiB: a stand-in for a model

    def __call__(self, input: Documents) -> Embeddings:  # noqa: A002 - chromadb's name
        return [np.asarray(hash_vector(t, self.dim), dtype=np.float32) for t in input]

    def __getstate__(self) -> dict[str, Any]:
        global PICKLED
        PICKLED += 1
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        global UNPICKLED
        UNPICKLED += 1
        self.__dict__.update(state)


@register_embedding_function
class RegisteredEF(EmbeddingFunction[Documents]):
    """Registered under its name: it travels by its config."""

    def __init__(self, dim: int = 8) -> None:
        self.dim = dim
        self.lock = threading.Lock()  # cannot be pickled: only its config can travel

    def __call__(self, input: Documents) -> Embeddings:  # noqa: A002 - chromadb's name
        with self.lock:
            return [np.asarray(hash_vector(t, self.dim), dtype=np.float32) for t in input]

    @staticmethod
    def name() -> str:
        return "safechroma-test-registered"

    def get_config(self) -> dict[str, Any]:
        return {"dim": self.dim}

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> RegisteredEF:
        global BUILT_FROM_CONFIG
        BUILT_FROM_CONFIG += 1
        return RegisteredEF(config["dim"])

    def is_legacy(self) -> bool:
        return False


def counters(_client: Any) -> list[int]:
    """For ``run_in_worker``: this process's counters, and how many functions safechroma
    has defined in it."""
    from safechroma.runtime import functions

    return [PICKLED, UNPICKLED, BUILT_FROM_CONFIG, len(functions._table)]
