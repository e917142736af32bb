"""Managed directories stay whole under damage to ``chroma.sqlite3`` (issue 21, third bullet).

A 2000-record collection is written through ``SafeClient`` (documents, metadata, explicit
vectors; upserts, updates, deletes by id and by filter), closed, read back by plain chromadb
(the oracle), then ``chroma.sqlite3`` is damaged on disk; ``safechroma repair`` runs as the
command line, and plain chromadb in a child reads every id back: each must have exactly the
document, metadata and vector it had, and the repair must exit 0. The write journal under
``.safechroma/journal`` is what makes that possible where the file itself lost the rows.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import test_sqlite_damage as sd  # noqa: E402  (the damage functions of the plain battery)

N = 2000
DIM = 16

_BUILD = """
import sys
import numpy as np
from safechroma import SafeClient

path = sys.argv[1]
rng = np.random.default_rng(21)
client = SafeClient(path)
col = client.create_collection("coll", embedding_function=None, metadata={"made": "test"})
vecs = rng.random((2000, 16), dtype=np.float32)
for s in range(0, 2000, 100):
    col.add(
        ids=[f"id-{i}" for i in range(s, s + 100)],
        embeddings=vecs[s : s + 100],
        documents=[f"doc {i}" for i in range(s, s + 100)],
        metadatas=[{"i": i, "even": i % 2 == 0, "tag": f"t{i % 7}"} for i in range(s, s + 100)],
    )
col.upsert(
    ids=[f"id-{i}" for i in range(0, 200)] + [f"new-{i}" for i in range(30)],
    embeddings=rng.random((230, 16), dtype=np.float32),
    documents=[f"upserted {i}" for i in range(230)],
    metadatas=[{"u": i, "even": None} for i in range(230)],
)
col.update(
    ids=[f"id-{i}" for i in range(200, 300)],
    embeddings=rng.random((100, 16), dtype=np.float32),
    metadatas=[{"updated": True, "tag": None} for _ in range(100)],
)
col.delete(ids=[f"id-{i}" for i in range(300, 350)])
col.delete(where={"i": {"$gte": 1950}})
client.close()
"""

# {id: [document, metadata, vector]} of every record, read by plain chromadb.
_READ = """
import json, sys
import chromadb
client = chromadb.PersistentClient(sys.argv[1])
out = {}
for c in client.list_collections():
    col = client.get_collection(c.name, embedding_function=None)
    g = col.get(include=["documents", "metadatas", "embeddings"])
    for i, d, m, e in zip(g["ids"], g["documents"], g["metadatas"], g["embeddings"]):
        out[i] = [d, m, [float(x) for x in e], c.name]
print("RESULT " + json.dumps(out), flush=True)
"""


def _read(root: str) -> dict[str, Any]:
    p = subprocess.run(
        [sys.executable, "-c", _READ, root],
        capture_output=True,
        text=True,
        env=sd.ENV,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    (line,) = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    got: dict[str, Any] = json.loads(line[7:])
    return got


@pytest.fixture(scope="module")
def managed(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    d = str(tmp_path_factory.mktemp("journal-repair") / "base")
    p = subprocess.run(
        [sys.executable, "-c", _BUILD, d],
        capture_output=True,
        text=True,
        env=sd.ENV,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    want = _read(d)
    # The oracle is what was written: spot-check it against the writes themselves.
    assert len(want) == N + 30 - 50 - 50
    assert want["id-5"][0] == "upserted 5" and want["id-5"][1] == {"i": 5, "tag": "t5", "u": 5}
    assert want["id-250"][1] == {"i": 250, "even": True, "updated": True}
    assert "id-320" not in want and "id-1990" not in want and "new-3" in want
    return d, want


DAMAGE: dict[str, Callable[[str], None]] = {
    "header_zeroed": sd._zero_header,
    "random_pages_24": sd._random_pages(24, 11),
    "truncated_50": sd._truncate(0.5),
    "truncated_10": sd._truncate(0.1),
    "torn_last_live_page": sd._torn_last_live_page,
    "stale_journal": sd._stale_journal,
    "stale_wal": sd._stale_wal,
    "deleted": lambda root: os.remove(os.path.join(root, "chroma.sqlite3")),
}


@pytest.mark.parametrize(
    "kind",
    # The everyday lane repairs one kind; every kind runs in the slow lane.
    [
        k if k == "header_zeroed" else pytest.param(k, marks=pytest.mark.slow)
        for k in sorted(DAMAGE)
    ],
)
def test_managed_directory_comes_back_whole(
    managed: tuple[str, dict[str, Any]], tmp_path: Path, kind: str
) -> None:
    base, want = managed
    d = str(tmp_path / "d")
    shutil.copytree(base, d)
    DAMAGE[kind](d)
    rep = sd._cli("repair", d)
    out = rep.stdout + rep.stderr
    got = _read(d)
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    wrong = sorted(i for i in set(want) & set(got) if got[i][:3] != want[i][:3])
    assert not missing and not extra and not wrong, (
        len(missing),
        len(extra),
        len(wrong),
        missing[:3],
        extra[:3],
        [(i, got[i][:2], want[i][:2]) for i in wrong[:3]],
        out[-3000:],
    )
    assert rep.returncode == 0, out
    check = sd._cli("check", d)
    assert check.returncode == 0, check.stdout + check.stderr


# Opens the directory through SafeClient (its automatic check, repair and write-back, or the
# restore of a lost chroma.sqlite3 at open) and reads the count; events on stdout.
_OPEN = """
import json, sys
from safechroma import SafeClient
events = []
client = SafeClient(
    sys.argv[1], on_event=lambda e: events.append(e.kind)
)
n = client.get_collection("coll", embedding_function=None).count()
client.close()
print("RESULT " + json.dumps({"count": n, "events": events}), flush=True)
"""


def _delete_sqlite(root: str) -> None:
    os.remove(os.path.join(root, "chroma.sqlite3"))


@pytest.mark.parametrize(
    "kind",
    [  # the everyday lane repairs one kind through SafeClient; the slow lane all three
        pytest.param("truncated_50", marks=pytest.mark.slow),
        "header_zeroed",
        pytest.param("deleted", marks=pytest.mark.slow),
    ],
    ids=lambda k: f"safeclient-{k}",
)
def test_safeclient_brings_a_damaged_managed_directory_back_whole(
    managed: tuple[str, dict[str, Any]], tmp_path: Path, kind: str
) -> None:
    """The same through SafeClient alone (no repair command): its automatic recovery fills
    from the journal, and a deleted chroma.sqlite3 is rebuilt from it when the worker opens."""
    base, want = managed
    d = str(tmp_path / "d")
    shutil.copytree(base, d)
    (DAMAGE.get(kind) or _delete_sqlite)(d)
    p = subprocess.run(
        [sys.executable, "-c", _OPEN, d], capture_output=True, text=True, env=sd.ENV, timeout=300
    )
    assert p.returncode == 0, p.stderr[-3000:]
    (line,) = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    opened = json.loads(line[7:])
    assert opened["count"] == len(want), opened
    got = _read(d)
    assert set(got) == set(want)
    wrong = sorted(i for i in want if got[i][:3] != want[i][:3])
    assert not wrong, (len(wrong), [(i, got[i][:2], want[i][:2]) for i in wrong[:3]])
    assert sd._cli("check", d).returncode == 0
