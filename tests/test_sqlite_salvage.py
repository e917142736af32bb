"""Salvage a damaged ``chroma.sqlite3`` (issue 12): back up, read past the damage, rebuild
through Chroma, swap in; the report says how many records came back and names the rest.

Damage kinds: random pages overwritten, the embeddings table's root page overwritten, the
100-byte header zeroed or overwritten, the file truncated. On a directory built by plain
chromadb and on one written through SafeClient with default options.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import chroma_dirs as cd  # noqa: E402

from safechroma import SafeClient  # noqa: E402
from safechroma.storage.recovery import repair_directory  # noqa: E402
from safechroma.storage.sqlite_pages import readable_copy  # noqa: E402
from safechroma.storage.sqlite_salvage import salvage_sqlite  # noqa: E402
from safechroma.storage.validate import check_directory  # noqa: E402

N = 600
SPEC: dict[str, Any] = {"collections": [{"n": N, "dim": 8, "sync_threshold": 100}]}


def _db(root: str) -> str:
    return os.path.join(root, "chroma.sqlite3")


def _random_pages(root: str) -> None:
    p = _db(root)
    pages = os.path.getsize(p) // 4096
    rnd = random.Random(11)
    with open(p, "r+b") as f:
        for pg in rnd.sample(range(2, pages), max(2, pages // 25)):
            f.seek(pg * 4096)
            f.write(rnd.randbytes(4096))


def _zero_header(root: str) -> None:
    with open(_db(root), "r+b") as f:
        f.write(bytes(100))


def _truncate(root: str) -> None:
    os.truncate(_db(root), os.path.getsize(_db(root)) * 7 // 10)


DAMAGE: dict[str, Callable[[str], None]] = {
    "random_pages": _random_pages,
    "root_page": lambda root: cd.corrupt(root, "sqlite_pages"),
    "zero_header": _zero_header,
    "garbage_header": lambda root: cd.corrupt(root, "sqlite_header"),
    "truncated": _truncate,
}
# Damage that leaves every row on an intact page: everything comes back, documents included.
WHOLE = {"root_page", "zero_header", "garbage_header"}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = str(tmp_path_factory.mktemp("sqlite-salvage") / "base")
    cd.build_dirs({d: SPEC})
    return d


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.parametrize(
    "kind",
    # The everyday lane salvages one kind; every kind runs in the slow lane.
    [k if k == "zero_header" else pytest.param(k, marks=pytest.mark.slow) for k in sorted(DAMAGE)],
)
def test_plain_chromadb_directory_salvaged(base: str, tmp_path: Path, kind: str) -> None:
    d = str(tmp_path / "d")
    shutil.copytree(base, d)
    DAMAGE[kind](d)
    damaged_sha = _sha(_db(d))
    before = check_directory(d)
    assert before.sqlite_status == "corrupt"

    rep = repair_directory(d, before)
    assert rep.status == "repaired", rep.message
    (col,) = rep.collections
    # Backed up first, byte for byte; the damaged file itself is kept in quarantine.
    assert rep.backup_dir and _sha(os.path.join(rep.backup_dir, "chroma.sqlite3")) == damaged_sha
    quarantined = [
        os.path.join(dp, f)
        for dp, _, fs in os.walk(os.path.join(d, ".safechroma", "quarantine"))
        for f in fs
        if f == "chroma.sqlite3"
    ]
    assert [_sha(q) for q in quarantined] == [damaged_sha]

    after = check_directory(d)
    assert after.status == "healthy", after.to_dict()
    seen = cd.verify_dir(d, SPEC)["coll"]
    # Every record either came back, first for its own vector, or is named as lost.
    assert sorted(seen["missing"]) == sorted(col.not_recovered)
    assert seen["not_first"] == [] and seen["get_embeddings_error"] is None
    assert seen["wrong_vector"] == []
    assert col.salvaged == seen["count"] == N - len(col.not_recovered)
    assert rep.not_recovered == col.not_recovered
    if kind in WHOLE:
        assert seen["count"] == N and seen["bad_document"] == []
    else:
        assert seen["count"] >= N * 0.9
    assert f"{col.salvaged} of {col.records} records" in rep.message
    # The collection's recorded configuration (and embedding function) is kept.
    q = "SELECT name, schema_str FROM collections"
    assert _rows(d, q) == _rows(base, q)


def _rows(root: str, q: str) -> list[Any]:
    con = sqlite3.connect(f"file:{_db(root)}?mode=ro", uri=True)
    try:
        return con.execute(q).fetchall()
    finally:
        con.close()


def test_dry_run_writes_nothing(base: str, tmp_path: Path) -> None:
    d = str(tmp_path / "d")
    shutil.copytree(base, d)
    _random_pages(d)
    sha = _sha(_db(d))
    out = salvage_sqlite(d, dry_run=True)
    assert out.status == "planned" and out.backup_dir is None
    assert out.collections[0].recovered >= N * 0.9
    assert _sha(_db(d)) == sha
    assert not os.path.exists(os.path.join(d, ".safechroma"))


def _same(a: Any, b: Any) -> bool:
    """Equal, floats to 1e-12 relative: Chroma's WAL keeps a float's last digits differently
    (written 90.33333333333333, replayed from the WAL 90.33333333333331)."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-12)
    return type(a) is type(b) and a == b


def _written_through_safeclient(root: str) -> dict[str, Any]:
    rng = np.random.default_rng(3)
    vecs = rng.uniform(-1, 1, (N, 8)).astype(np.float32)
    ids = [f"r{i}" for i in range(N)]
    docs = [f"document {i}" for i in range(N)]
    metas: list[dict[str, Any]] = [
        {"i": i, "even": i % 2 == 0, "tag": f"t{i % 7}", "w": i / 3} for i in range(N)
    ]
    with SafeClient(root) as client:
        col = client.create_collection(
            "items",
            embedding_function=None,
            configuration={"hnsw": {"space": "cosine", "sync_threshold": 100}},
            metadata={"owner": "tests"},
        )
        for s in range(0, N, 100):
            col.add(
                ids=ids[s : s + 100],
                embeddings=vecs[s : s + 100],
                documents=docs[s : s + 100],
                metadatas=metas[s : s + 100],  # type: ignore[arg-type]
            )
        newer = rng.uniform(-1, 1, (10, 8)).astype(np.float32)
        col.update(ids=ids[:10], embeddings=newer, documents=[f"updated {i}" for i in range(10)])
        vecs[:10] = newer
        col.delete(ids=ids[-5:])
    exp = {ids[i]: (f"updated {i}" if i < 10 else docs[i], metas[i], vecs[i]) for i in range(N - 5)}
    return exp


@pytest.mark.parametrize(
    "kind", [pytest.param("random_pages", marks=pytest.mark.slow), "zero_header"]
)
def test_safeclient_directory_salvaged_on_open(tmp_path: Path, kind: str) -> None:
    """Damaged while closed; the next SafeClient validates, salvages and serves it."""
    d = str(tmp_path / "d")
    exp = _written_through_safeclient(d)
    DAMAGE[kind](d)
    assert check_directory(d).sqlite_status == "corrupt"
    with SafeClient(d) as client:
        col = client.get_collection("items", embedding_function=None)
        assert col.metadata == {"owner": "tests"}
        got = col.get(include=["documents", "metadatas", "embeddings"])
    (report,) = [
        os.path.join(dp, "sqlite-salvage.json")
        for dp, _, fs in os.walk(os.path.join(d, ".safechroma", "backups"))
        if "sqlite-salvage.json" in fs
    ]
    with open(report) as f:
        (named,) = json.load(f)["collections"]
    rows = zip(got["documents"], got["metadatas"], got["embeddings"], strict=True)
    back = dict(zip(got["ids"], rows, strict=True))
    assert set(back) <= set(exp)
    assert sorted(set(exp) - set(back)) == sorted(named["lost"])
    if kind == "random_pages":
        assert len(back) >= 0.9 * len(exp)
    else:
        assert len(back) == len(exp) and named["partial"] == []
    for i, (doc, meta, vec) in back.items():
        e_doc, e_meta, e_vec = exp[i]
        if i in named["partial"]:
            # Named in the report: some of its metadata was on lost pages. What came back is
            # right, only possibly incomplete.
            assert all(_same(v, e_meta[k]) for k, v in (meta or {}).items())
            assert doc in (None, e_doc)
        else:
            assert doc == e_doc
            assert meta is not None and meta.keys() == e_meta.keys()
            assert all(_same(v, e_meta[k]) for k, v in meta.items())
        np.testing.assert_allclose(vec, e_vec, rtol=1e-5, atol=1e-6)
    assert check_directory(d).status == "healthy"


@pytest.mark.parametrize("kind", ["zero_header", "garbage_header"])
def test_rewritten_header_makes_the_whole_file_readable(
    base: str, tmp_path: Path, kind: str
) -> None:
    """Only the 100-byte header is destroyed: a rewritten one in a copy restores every row."""
    d = str(tmp_path / "d")
    shutil.copytree(base, d)
    DAMAGE[kind](d)
    copy, rewritten = readable_copy(_db(d), str(tmp_path / "copy.sqlite3"))
    assert rewritten
    con = sqlite3.connect(f"file:{copy}?mode=ro", uri=True)
    try:
        # The free-page list was in the header: those pages are now unused, nothing is wrong.
        lines = "\n".join(r[0] for r in con.execute("PRAGMA quick_check")).splitlines()
        assert all(
            ln in ("ok", "*** in database main ***") or ln.endswith("is never used") for ln in lines
        ), lines
        got = con.execute("SELECT count(*) FROM embeddings").fetchone()[0]
    finally:
        con.close()
    assert got == N
    assert _sha(_db(d)) != _sha(copy)  # the damaged file itself was not touched
