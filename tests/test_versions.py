"""Directories written by older chromadb 1.x releases, as the validator reads them.

Measured: chromadb 1.0.0, 1.1.1 and 1.2.2 keep a collection's HNSW settings in
``collections.config_json_str`` as ``{"vector_index": {"hnsw": {"space": ...}}}`` and have no
``schema_str`` column; 1.3 and later write ``schema_str``. chromadb 1.5 opening such a directory
leaves the row as it is.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import chroma_dirs as cd  # noqa: E402

from safechroma.storage.validate import check_directory  # noqa: E402


@pytest.mark.parametrize("space", ["cosine", pytest.param("ip", marks=pytest.mark.slow)])
def test_space_from_a_pre_1_3_collection_row(space: str, tmp_path: Path) -> None:
    """Regression: the validator said ``l2`` for cosine/ip collections chromadb 1.0-1.2 wrote."""
    d = str(tmp_path / "db")
    cd.make_collection_dir(d, n=150, space=space)
    con = sqlite3.connect(os.path.join(d, "chroma.sqlite3"))
    old_layout = {
        "vector_index": {"hnsw": {"space": space, "ef_construction": 100, "max_neighbors": 16}},
        "embedding_function": {"type": "legacy"},
    }
    columns = {row[1] for row in con.execute("PRAGMA table_info(collections)")}
    with con:
        con.execute("UPDATE collections SET config_json_str = ?", (json.dumps(old_layout),))
        if "schema_str" in columns:  # absent when the installed chromadb is itself pre-1.3
            con.execute("UPDATE collections SET schema_str = NULL")
    con.close()
    rep = check_directory(d)
    assert rep.status == "healthy", rep.to_dict()
    assert [c.space for c in rep.collections] == [space]
