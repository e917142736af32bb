"""The hook runner and the job runner on their own (issue 22: one supervision for every face).

``safechroma.runtime.hooks.check_and_recover``: the built-in validator and recovery run on real
directories, healthy, corrupted and written by a newer chromadb; the error branches use hooks
written here. A hook is user code, so a plain function returning a report object is a real
hook, not a mock. ``safechroma.jobs.runner.run_job``: the real write-back job, run with
``python -m`` on what a real repair left.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import chroma_dirs as cd  # noqa: E402

from safechroma import HookContext, IncompatibleDirectoryError, RecoveryError  # noqa: E402
from safechroma._env import private_env  # noqa: E402
from safechroma._policy import default_recovery, default_validator  # noqa: E402
from safechroma.jobs.runner import run_job  # noqa: E402
from safechroma.runtime.hooks import (  # noqa: E402
    HookResult,
    check_and_recover,
    describe_report,
    is_damaged,
)
from safechroma.storage.validate import check_directory  # noqa: E402

Events = list[tuple[str, int | None, dict[str, Any]]]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = str(tmp_path_factory.mktemp("hooks") / "base")
    cd.make_collection_dir(d, n=300, dim=8, sync_threshold=100)
    return d


def _copy(base: str, tmp_path: Path) -> str:
    d = str(tmp_path / "db")
    shutil.copytree(base, d)
    return d


def _run(path: str, events: Events, **kw: Any) -> HookResult:
    def emit(kind: str, pid: int | None, **detail: Any) -> None:
        events.append((kind, pid, detail))

    args: dict[str, Any] = dict(
        reason="start",
        crash=None,
        attempt=1,
        validator=default_validator,
        recovery=default_recovery,
    )
    args.update(kw)
    return check_and_recover(path, emit=emit, **args)


@dataclass
class _Report:
    status: str
    message: str = ""


def test_no_validator_means_healthy_and_nothing_runs(tmp_path: Path) -> None:
    events: Events = []
    res = _run(str(tmp_path / "absent"), events, validator=None)
    assert res == HookResult(healthy=True, report=None)
    assert events == []
    assert not (tmp_path / "absent").exists()


def test_a_healthy_directory_is_validated_and_left_alone(base: str, tmp_path: Path) -> None:
    d = _copy(base, tmp_path)
    events: Events = []
    res = _run(d, events, reason="crash", attempt=2)
    assert res.healthy and res.result is None and res.salvage_files == []
    assert res.report.status == "healthy"
    (kind, pid, detail), *rest = events
    assert (kind, pid, detail["healthy"], detail["reason"]) == ("validated", None, True, "crash")
    assert detail["report"] is res.report and rest == []


def test_a_corrupted_directory_is_repaired_and_its_salvage_named(base: str, tmp_path: Path) -> None:
    d = _copy(base, tmp_path)
    cd.corrupt(d, "level0_neighbor_oob")  # data_level0.bin intact: every vector salvageable
    events: Events = []
    res = _run(d, events)
    assert not res.healthy and res.report.status == "damaged"
    assert res.result.status == "repaired", res.result.message
    # What the repair left for the write-back: the files the next start must apply.
    assert res.salvage_files and res.salvage_files == res.result.salvage_files
    assert all(os.path.isfile(f) for f in res.salvage_files)
    assert (res.incomplete_records, res.losses_file) == (0, None)
    assert [e[0] for e in events] == ["validated", "recovered"]
    assert events[0][2]["healthy"] is False
    rec = events[1][2]
    assert rec["report"] is res.result and rec["summary"] == res.result.message
    assert (rec["incomplete_records"], rec["losses_file"]) == (0, None)


def test_damage_without_a_recovery_hook_raises_and_changes_nothing(
    base: str, tmp_path: Path
) -> None:
    d = _copy(base, tmp_path)
    cd.corrupt(d, "level0_neighbor_oob")
    before = sorted(p for p in os.listdir(d))
    events: Events = []
    with pytest.raises(RecoveryError, match="no recovery hook is set") as info:
        _run(d, events, recovery=None)
    assert info.value.path == d and info.value.report.status == "damaged"
    assert f"safechroma repair {d}" in str(info.value)
    assert [e[0] for e in events] == ["validated"]
    assert sorted(os.listdir(d)) == before and check_directory(d).status == "damaged"


def test_a_recovery_that_raises_is_reported_and_chained(base: str, tmp_path: Path) -> None:
    d = _copy(base, tmp_path)
    cd.corrupt(d, "level0_neighbor_oob")
    seen: list[HookContext] = []

    def recovery(ctx: HookContext) -> Any:
        seen.append(ctx)
        raise OSError("disk full")

    events: Events = []
    with pytest.raises(RecoveryError, match="recovery failed: disk full") as info:
        _run(d, events, recovery=recovery, reason="damage", attempt=3)
    assert isinstance(info.value.__cause__, OSError)
    (ctx,) = seen
    assert (ctx.path, ctx.reason, ctx.attempt) == (d, "damage", 3)
    assert ctx.report.status == "damaged"  # the recovery is told what the validator found
    assert [e[0] for e in events] == ["validated", "recovery_failed"]
    assert events[1][2] == {"error": repr(OSError("disk full"))}


def test_a_recovery_that_cannot_repair_raises_with_its_message(tmp_path: Path) -> None:
    crash = RuntimeError("worker died")
    told: list[HookContext] = []

    def validator(ctx: HookContext) -> Any:
        told.append(ctx)
        return _Report("damaged")

    def recovery(ctx: HookContext) -> Any:
        return _Report("not_repairable", "the only copy is gone")

    events: Events = []
    with pytest.raises(RecoveryError, match="could not be repaired: the only copy is gone"):
        _run(str(tmp_path), events, validator=validator, recovery=recovery, crash=crash)
    assert told[0].crash is crash and told[0].report is None
    assert [e[0] for e in events] == ["validated", "recovery_failed"]
    assert events[1][2]["report"] == _Report("not_repairable", "the only copy is gone")


def test_a_user_report_with_only_healthy_false_is_damage(tmp_path: Path) -> None:
    @dataclass
    class Verdict:
        healthy: bool

        def summary(self) -> str:
            return "bad index"

    def recovery(ctx: HookContext) -> Any:
        return {"fixed": True}  # a result with no status: success

    events: Events = []
    res = _run(str(tmp_path), events, validator=lambda ctx: Verdict(False), recovery=recovery)
    assert not res.healthy and res.result == {"fixed": True} and res.salvage_files == []
    assert events[-1][0] == "recovered" and events[-1][2]["summary"] == "{'fixed': True}"
    with pytest.raises(RecoveryError, match=r"damaged and no recovery hook is set: bad index\."):
        _run(str(tmp_path), [], validator=lambda ctx: Verdict(False), recovery=None)


def test_a_validator_error_propagates_unchanged(tmp_path: Path) -> None:
    def validator(ctx: HookContext) -> Any:
        raise PermissionError("cannot read")

    events: Events = []
    with pytest.raises(PermissionError):
        _run(str(tmp_path), events, validator=validator)
    assert events == []


def test_a_directory_of_a_newer_chromadb_is_refused_before_any_repair(
    base: str, tmp_path: Path
) -> None:
    d = _copy(base, tmp_path)
    future = "00011-collection-future-column.sqlite.sql"
    sql = "ALTER TABLE collections ADD COLUMN future_column TEXT;"
    con = sqlite3.connect(os.path.join(d, "chroma.sqlite3"))
    with con:
        con.execute(sql)
        con.execute(
            "INSERT INTO migrations (dir, version, filename, sql, hash) VALUES (?, ?, ?, ?, ?)",
            ("sysdb", 11, future, sql, hashlib.md5(sql.encode()).hexdigest()),
        )
    con.close()
    ran: list[HookContext] = []
    events: Events = []
    with pytest.raises(IncompatibleDirectoryError) as info:
        _run(d, events, recovery=ran.append)
    assert info.value.path == d and ran == [] and events == []


def test_is_damaged_only_when_the_report_says_so() -> None:
    assert is_damaged(_Report("damaged"))
    for status in ("healthy", "cannot_check", "incompatible"):
        assert not is_damaged(_Report(status))
    assert not is_damaged(object()) and not is_damaged(None)


def test_describe_report_of_the_built_in_validator(base: str, tmp_path: Path) -> None:
    d = _copy(base, tmp_path)
    cd.corrupt(d, "level0_neighbor_oob")
    text = describe_report(check_directory(d))
    assert text.startswith("damaged, 1 collection(s); ") and "level0_neighbor" in text


def test_the_write_back_job_applies_what_the_repair_left(base: str, tmp_path: Path) -> None:
    """The path serve and the CLI take after a repair: the hooks, then the write-back job."""
    d = _copy(base, tmp_path)
    cd.corrupt(d, "level0_neighbor_oob")
    res = _run(d, [])
    lines: list[tuple[str, int]] = []
    job = run_job(
        "apply_salvage",
        [d, *res.salvage_files],
        env=private_env(),
        on_line=lambda word, n: lines.append((word, n)),
    )
    assert job.ok, job.stderr
    (applied,) = job.result
    assert (applied["collection"], applied["removed"]) == ("coll", [])
    # The progress bar's lines: the total first (every salvaged record), then writes that add
    # up to it.
    assert lines[0] == ("TOTAL", applied["recovered"]) and applied["recovered"] > 0
    assert {w for w, _ in lines[1:]} == {"PROGRESS"}
    assert sum(n for _, n in lines[1:]) == applied["recovered"]
    assert check_directory(d).status == "healthy"
    assert cd.verify_dir(d, {"collections": [{"n": 300}]})["coll"]["wrong_vector"] == []


def test_a_job_that_fails_says_how(tmp_path: Path) -> None:
    job = run_job("restore_saved", [str(tmp_path)], env=private_env())
    assert (job.returncode, job.result, job.ok) == (2, None, False)
    assert "usage: python -m safechroma.jobs.restore_saved" in job.stderr
