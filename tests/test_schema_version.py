"""A directory written by a newer chromadb (chroma-core/chroma#5909).

A newer chromadb leaves a migration in ``chroma.sqlite3`` that the installed one does not know.
Measured on 1.5.9 and pinned below: plain chromadb opens such a directory without a word and
writes into the schema it does not understand. safechroma reports it as its own verdict
("incompatible", not "damaged"), attempts no repair, writes nothing, and raises
``IncompatibleDirectoryError`` naming both versions before any worker starts.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import pickle
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import chroma_dirs as cd  # noqa: E402

from safechroma import Event, IncompatibleDirectoryError, SafeClient  # noqa: E402
from safechroma.storage import schema  # noqa: E402
from safechroma.storage.recovery import repair_directory  # noqa: E402
from safechroma.storage.validate import check_directory  # noqa: E402

FUTURE = "00011-collection-future-column.sqlite.sql"
FUTURE_SQL = "ALTER TABLE collections ADD COLUMN future_column TEXT;"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = str(tmp_path_factory.mktemp("schema") / "base")
    cd.make_collection_dir(d, n=120, dim=8, sync_threshold=100)
    return d


def _newer(base: str, tmp_path: Path) -> str:
    """A copy whose schema a (hypothetical) newer chromadb migrated one step further."""
    d = str(tmp_path / "newer")
    shutil.copytree(base, d)
    con = sqlite3.connect(os.path.join(d, "chroma.sqlite3"))
    with con:
        top = con.execute("SELECT max(version) FROM migrations WHERE dir = 'sysdb'").fetchone()[0]
        assert top == 10  # chromadb 1.5.9's last sysdb migration; the future one is 11
        con.execute(FUTURE_SQL)
        con.execute(
            "INSERT INTO migrations (dir, version, filename, sql, hash) VALUES (?, ?, ?, ?, ?)",
            ("sysdb", top + 1, FUTURE, FUTURE_SQL, hashlib.md5(FUTURE_SQL.encode()).hexdigest()),
        )
    con.close()
    return d


def _fingerprint(root: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for dp, dirs, files in os.walk(root):
        for f in files:
            p = os.path.join(dp, f)
            if f == ".safechroma.lock":
                continue  # the directory lock, taken before anything is checked
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
        dirs.sort()
    return out


def test_every_migration_of_a_fresh_directory_is_known(base: str) -> None:
    """No false positive: what the installed chromadb wrote, it knows (the core's names)."""
    known = schema.installed_migrations()
    assert known is not None
    con = sqlite3.connect(f"file:{base}/chroma.sqlite3?mode=ro", uri=True)
    try:
        names = {r[0] for r in con.execute("SELECT filename FROM migrations")}
    finally:
        con.close()
    assert names and names <= known
    # The Python package's own folder lags behind the core (sysdb 00010 is only in the core).
    assert "00010-collection-schema.sqlite.sql" in names
    rep = check_directory(base)
    assert rep.status == "healthy"
    assert rep.incompatibility is None


def test_plain_chromadb_writes_into_a_newer_schema(base: str, tmp_path: Path) -> None:
    """The hazard, reproduced: 1.5.9 opens the newer directory and writes, with no error."""
    d = _newer(base, tmp_path)
    before = _fingerprint(d)
    assert cd.grow(d, batches=1, batch=10) == 0
    assert _fingerprint(d)["chroma.sqlite3"] != before["chroma.sqlite3"]


def test_validator_says_incompatible_and_repair_writes_nothing(base: str, tmp_path: Path) -> None:
    d = _newer(base, tmp_path)
    before = _fingerprint(d)
    rep = check_directory(d)
    assert rep.status == "incompatible"
    assert not rep.healthy and rep.damaged_collections == []
    assert rep.collections == []
    info = rep.incompatibility
    assert info is not None
    assert info["installed_chromadb"] == importlib.metadata.version("chromadb")
    assert info["unknown_migrations"] == [f"sysdb 11 {FUTURE}"]
    assert info["directory_schema"]["sysdb"] == 11
    assert info["installed_schema"]["sysdb"] == 10
    (finding,) = [f for f in rep.findings if f.code == "schema_newer"]
    assert finding.severity == "warning"
    assert (
        importlib.metadata.version("chromadb") in finding.message and "sysdb 11" in finding.message
    )

    out = repair_directory(d, rep)
    assert out.status == "not_repairable"
    cli = [sys.executable, "-m", "safechroma"]
    assert subprocess.run([*cli, "check", d], capture_output=True, timeout=60).returncode == 3
    r = subprocess.run([*cli, "repair", d], capture_output=True, text=True, timeout=60)
    assert r.returncode == 3, r.stderr
    assert "newer chromadb" in r.stderr
    assert _fingerprint(d) == before
    assert not os.path.exists(os.path.join(d, ".safechroma"))


def test_safeclient_refuses_before_any_worker_starts(base: str, tmp_path: Path) -> None:
    d = _newer(base, tmp_path)
    before = _fingerprint(d)
    events: list[Event] = []
    with pytest.raises(IncompatibleDirectoryError) as info:
        client = SafeClient(d, on_event=events.append)
        try:
            client.heartbeat()
        finally:
            client.close()
    err = info.value
    assert err.path == d
    assert err.installed_version == importlib.metadata.version("chromadb")
    assert err.unknown_migrations == [f"sysdb 11 {FUTURE}"]
    assert err.directory_schema["sysdb"] == 11
    assert "newer chromadb" in str(err) and "1" in str(err)
    assert not [e for e in events if e.kind in ("worker_started", "recovered")]
    assert _fingerprint(d) == before
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is IncompatibleDirectoryError
    assert (again.path, again.unknown_migrations) == (err.path, err.unknown_migrations)


def test_unknown_installed_migrations_never_call_a_directory_newer(
    base: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the core library to read, the schema is not compared (no false positive)."""
    d = _newer(base, tmp_path)
    monkeypatch.setattr(schema, "_core_library", lambda: None)
    rep = check_directory(d)
    assert rep.status == "healthy"
    assert "schema_unchecked" in {f.code for f in rep.findings}
