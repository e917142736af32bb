"""Embedding functions for tests/test_reembed.py, importable as ``reembed_fn:NAME`` by the CLI.

``embed`` reproduces what tests/chroma_dirs.py wrote for collection ``coll`` (the document
``doc coll <i>`` had vector ``vectors("coll", ..)[i]``); ``wrong`` returns other vectors.
"""

from __future__ import annotations

import chroma_dirs as cd
import numpy as np


def embed(documents: list[str]) -> np.ndarray:
    idx = [int(d.rsplit(" ", 1)[1]) for d in documents]
    table = cd.vectors("coll", max(idx) + 1, 8)
    return table[idx]


def wrong(documents: list[str]) -> np.ndarray:
    return embed(documents) + 0.5
