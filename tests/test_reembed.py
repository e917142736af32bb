"""Nothing removed without a way back (issue 12): records whose vectors exist nowhere are named,
saved, and put back by ``safechroma reembed`` / :func:`reembed` with an embedding function
that first proved it reproduces the vectors that survived; never with chromadb's reported
default for a collection that never had one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)
import chroma_dirs as cd  # noqa: E402
import reembed_fn  # noqa: E402

import safechroma  # noqa: E402
from safechroma.jobs.reembed import reembed  # noqa: E402
from safechroma.storage.recovery import (  # noqa: E402
    recorded_embedding_function,
    saved_records,
)

SPEC: dict[str, Any] = {"collections": [{"n": 600, "sync_threshold": 100}]}


@pytest.fixture(scope="module")
def lost(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A plain-chromadb directory whose vectors are gone (segment deleted, WAL purged),
    repaired: the records flushed before are saved and removed."""
    d = str(tmp_path_factory.mktemp("reembed") / "db")
    cd.build_dirs({d: SPEC})
    cd.corrupt(d, "segment_deleted")
    p = _cli("repair", d, "--json")
    assert p.returncode == 1, p.stdout + p.stderr  # records had to be removed: exit 1
    out = json.loads(p.stdout)
    assert out["applied"][0]["removed"]
    return d


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-m", "safechroma", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def _copy(src: str, tmp: Path) -> str:
    d = str(tmp / "db")
    shutil.copytree(src, d)
    return d


def test_reembed_command_puts_everything_back(lost: str, tmp_path: Path) -> None:
    d = _copy(lost, tmp_path)
    (saved,) = saved_records(d, "coll")
    names = {r["id"] for r in json.loads(Path(saved).read_text())}
    p = _cli("reembed", d, "--collection", "coll", "--embedding-function", "reembed_fn:embed")
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"restored {len(names)} records" in p.stdout
    res = cd.verify_dir(d, SPEC)["coll"]
    assert res["missing"] == [] and res["bad_document"] == [] and res["not_first"] == []
    assert res["wrong_vector"] == []
    assert res["get_embeddings_error"] is None
    assert saved_records(d, "coll") == []  # done: a second run has nothing to restore
    again = _cli("reembed", d, "--collection", "coll", "--embedding-function", "reembed_fn:embed")
    assert again.returncode == 0 and "nothing to restore" in again.stdout


def test_a_function_that_does_not_reproduce_the_survivors_is_refused(
    lost: str, tmp_path: Path
) -> None:
    d = _copy(lost, tmp_path)
    p = _cli("reembed", d, "--collection", "coll", "--embedding-function", "reembed_fn:wrong")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "does not reproduce" in p.stderr
    res = cd.verify_dir(d, SPEC)["coll"]
    assert res["missing"]  # nothing was written
    assert saved_records(d, "coll")  # still saved, still restorable


def test_never_chromas_reported_default(lost: str, tmp_path: Path) -> None:
    """The collection was created with ``embedding_function=None``: chromadb reports its
    default function for it, but the raw record says none was used, so without a function
    from the caller nothing is re-embedded (exit 2) and the records stay saved."""
    d = _copy(lost, tmp_path)
    assert recorded_embedding_function(d, "coll") is None
    p = _cli("reembed", d, "--collection", "coll")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "records no embedding function" in p.stderr
    assert saved_records(d, "coll")


def test_reembed_function_through_safeclient(lost: str, tmp_path: Path) -> None:
    d = _copy(lost, tmp_path)
    out = reembed(d, "coll", reembed_fn.embed)
    assert out["error"] is None and out["remaining"] == [] and out["restored"]
    res = cd.verify_dir(d, SPEC)["coll"]
    assert res["missing"] == [] and res["not_first"] == []
    assert res["wrong_vector"] == []


def test_recovery_refuses_an_unchecked_reembed(tmp_path: Path) -> None:
    """``SafeClient(reembed=...)`` fills in lost vectors during recovery only with a function
    that reproduces the survivors; a wrong one is refused and the records are saved instead."""
    d = str(tmp_path / "db")
    cd.build_dirs({d: SPEC})
    cd.corrupt(d, "segment_deleted")
    events: list[safechroma.Event] = []
    with safechroma.SafeClient(d, reembed=reembed_fn.wrong, on_event=events.append) as client:
        client.get_collection("coll").count()
    (applied,) = [e.detail["summary"] for e in events if e.kind == "salvage_applied"]
    assert applied["reembedded"] == 0 and "does not reproduce" in applied["reembed_rejected"]
    assert applied["removed"] and saved_records(d, "coll")
