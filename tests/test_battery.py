"""The corruption battery on a directory built by plain chromadb (issue 12 "How it will be
checked"): where the vectors are still on disk the repair brings every record back whole with
exit status 0; where they are physically gone it exits non-zero, names the records, and
``safechroma reembed`` puts them back. (Label-map cases: tests/test_label_map.py; SQLite
cases: the salvage tests.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

# Slow (the damage battery): not in the everyday lane, -m "not slow".
pytestmark = pytest.mark.slow

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)
import chroma_dirs as cd  # noqa: E402

from safechroma.storage.recovery import saved_records  # noqa: E402

SPEC: dict[str, Any] = {"collections": [{"n": 600, "sync_threshold": 100}]}

ON_DISK = [
    "header_truncated",
    "header_random",
    "sdpe_too_small",
    "upper_neighbor_oob",
    "links_truncated",
    "pickle_malicious",
]
GONE = ["data_zeroed", "data_truncated"]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = str(tmp_path_factory.mktemp("battery") / "db")
    cd.build_dirs({d: SPEC})
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


@pytest.mark.parametrize("kind", ON_DISK)
def test_vectors_on_disk_come_back_whole(base: str, tmp_path: Path, kind: str) -> None:
    d = str(tmp_path / "db")
    shutil.copytree(base, d)
    cd.corrupt(d, kind)
    p = _cli("repair", d, "--json")
    assert p.returncode == 0, p.stdout + p.stderr
    res = cd.verify_dir(d, SPEC)["coll"]
    assert res["missing"] == [] and res["bad_document"] == [] and res["not_first"] == []
    assert res["wrong_vector"] == []
    assert res["get_embeddings_error"] is None
    assert not os.path.exists(os.path.join(d, "PWNED"))  # the malicious pickle never ran


@pytest.mark.parametrize("kind", GONE)
def test_gone_vectors_are_named_and_restorable(base: str, tmp_path: Path, kind: str) -> None:
    d = str(tmp_path / "db")
    shutil.copytree(base, d)
    cd.corrupt(d, kind)
    p = _cli("repair", d, "--json")
    assert p.returncode == 1, p.stdout + p.stderr
    out = json.loads(p.stdout)
    named = set(out["repair"]["collections"][0]["not_recovered"])
    assert named and set(cd.verify_dir(d, SPEC)["coll"]["missing"]) == named
    (saved,) = saved_records(d, "coll")
    assert {r["id"] for r in json.loads(Path(saved).read_text())} == named
    r = _cli("reembed", d, "--collection", "coll", "--embedding-function", "reembed_fn:embed")
    assert r.returncode == 0, r.stdout + r.stderr
    res = cd.verify_dir(d, SPEC)["coll"]
    assert res["missing"] == [] and res["bad_document"] == [] and res["not_first"] == []
    assert res["wrong_vector"] == []
