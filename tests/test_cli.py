"""CLI: exit codes (0 healthy, 1 damaged, 2 cannot check), --json, --dry-run, lock refusal."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import chroma_dirs as cd  # noqa: E402

from safechroma.cli import main  # noqa: E402


@pytest.fixture(scope="session")
def healthy_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = str(tmp_path_factory.mktemp("cli") / "h")
    cd.make_collection_dir(d, n=250, space="cosine")
    return d


@pytest.fixture
def damaged_dir(healthy_dir: str, tmp_path: Path) -> str:
    d = str(tmp_path / "d")
    shutil.copytree(healthy_dir, d)
    cd.corrupt(d, "entry_point_oob")
    return d


def test_check_exit_codes(
    healthy_dir: str, damaged_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", healthy_dir]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["check", damaged_dir]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED" in out and "header_entry_point" in out
    assert main(["check", str(tmp_path)]) == 2


def test_check_json(damaged_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", damaged_dir, "--json"]) == 1
    js = json.loads(capsys.readouterr().out)
    assert js["status"] == "damaged"
    assert js["collections"][0]["findings"][0]["code"] == "header_entry_point"


def test_info(healthy_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", healthy_dir]) == 0
    out = capsys.readouterr().out
    assert "coll" in out and "cosine" in out and "250" in out


def test_repair_dry_run(damaged_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["repair", damaged_dir, "--dry-run"]) == 0
    assert "PLANNED" in capsys.readouterr().out
    assert not os.path.exists(os.path.join(damaged_dir, ".safechroma"))
    assert main(["check", damaged_dir]) == 1


def test_repair_refuses_when_locked(damaged_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The directory lock (shared with SafeClient) held elsewhere: exit 2, nothing changed."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()",
            os.path.join(damaged_dir, ".safechroma.lock"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert main(["repair", damaged_dir]) == 2
        assert "in use" in capsys.readouterr().err
        assert not os.path.exists(os.path.join(damaged_dir, ".safechroma"))
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=10)
        holder.stdout.close()  # type: ignore[union-attr]
    fd = os.open(os.path.join(damaged_dir, ".safechroma.lock"), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released again
    finally:
        os.close(fd)


def test_repair_then_check_healthy(damaged_dir: str) -> None:
    p = subprocess.run(
        [sys.executable, "-m", "safechroma", "repair", damaged_dir],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "REPAIRED" in p.stdout and "after repair: healthy" in p.stdout
    assert main(["check", damaged_dir]) == 0


def test_repair_that_had_to_remove_records_says_so_and_exits_1(
    healthy_dir: str, tmp_path: Path
) -> None:
    """Records whose vectors exist nowhere (index zeroed, WAL purged) are removed and saved;
    the repair reports them and exits 1 although the directory is healthy again, and check says
    so until the losses are acknowledged (issue 21)."""
    d = str(tmp_path / "z")
    shutil.copytree(healthy_dir, d)
    cd.corrupt(d, "data_zeroed")
    p = subprocess.run(
        [sys.executable, "-m", "safechroma", "repair", d],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 1, p.stdout + p.stderr
    assert "removed" in p.stdout and ".removed.json" in p.stdout
    assert "REPAIRED WITH LOSSES" in p.stdout and "after repair: files healthy" in p.stdout
    assert "after repair: healthy" not in p.stdout
    saved = [f for f in Path(d, ".safechroma", "backups").rglob("*.removed.json")]
    assert saved and saved[0].stat().st_size > 0
    assert main(["check", d]) == 1
    assert main(["check", d, "--ack-losses"]) == 0
    assert main(["check", d]) == 0
