"""``safechroma repair`` and ``safechroma reembed``: change a directory, holding its lock.

Both take the directory lock with :func:`safechroma.runtime.rendezvous.take_lock` (the one a
``SafeClient`` and ``safechroma serve`` take) and write themselves into the lock file, then run
their Chroma work as jobs (:mod:`safechroma.jobs`): this process never opens the directory with
Chroma (FACTS §4: one owner per directory; a fresh process is the clean reset after a repair).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.progress import Progress

from safechroma._env import private_env
from safechroma.jobs.runner import run_job
from safechroma.storage.recovery import (
    pending_salvage_files,
    record_losses,
    repair_directory,
    roll_back_hot_journal,
    unacknowledged_losses,
)
from safechroma.storage.validate import check_directory

from ._app import LOCK_NAME, JsonOpt, PathArg, _lock, _sqlite_gone_journal_kept, app
from ._present import (
    _EXIT,
    _checked,
    _error,
    _plain_check,
    _print_losses,
    _print_repair,
    _progress_bar,
)


@app.command(
    epilog=(
        "Examples:\n\n"
        "  safechroma repair ./chroma-data --dry-run     # what it would do\n\n"
        "  safechroma repair ./chroma-data\n\n"
        "Stop every program using the directory first: repair takes the directory lock.\n\n"
        "Exit codes: 0 repaired or nothing to do, 1 incomplete or records removed, 2 cannot "
        "start, 3 written by a newer chromadb."
    )
)
def repair(
    path: PathArg,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Report what would be done; change nothing.")
    ] = False,
    json_out: JsonOpt = False,
) -> int:
    """Back up, quarantine damaged indexes, let Chroma rebuild, write back salvaged vectors."""
    if not os.path.isfile(os.path.join(path, "chroma.sqlite3")) and not _sqlite_gone_journal_kept(
        path
    ):
        _error(f"{path} is not a Chroma directory (no chroma.sqlite3)")
        return 2
    fd = _lock(path)
    if fd is None:
        _error(
            f"{path} is in use: another process holds {LOCK_NAME}. Stop it (or close its "
            "SafeClient) and retry."
        )
        return 2
    try:
        return _repair_locked(path, dry_run, json_out)
    finally:
        os.close(fd)


def _repair_locked(path: str, dry_run: bool, json_out: bool) -> int:
    # A hot journal (a writer killed inside a transaction) is undone as SQLite and Chroma
    # would on their next open, after a backup; until then a read-only check cannot judge
    # the file (issue 21).
    journal_backup = None if dry_run else roll_back_hot_journal(path)
    before = (
        check_directory(path, wal_coverage=True) if json_out else _checked(path, wal_coverage=True)
    )
    if before.status == "incompatible" or (
        before.status == "unknown" and not _sqlite_gone_journal_kept(path)
    ):
        _plain_check(before, sys.stderr)
        return _EXIT[before.status]
    with _progress_bar() as bar:
        task = bar.add_task("repairing", total=None, detail="") if bar is not None else None

        def note(step: str, details: dict[str, Any]) -> None:
            if bar is not None and task is not None:
                shown = ", ".join(f"{k}={v}" for k, v in details.items())
                bar.update(task, description=step, detail=shown)

        rep = repair_directory(path, before, dry_run=dry_run, progress=note)
        pending = [] if dry_run else pending_salvage_files(path)
        applied: list[dict[str, Any]] = []
        removed_records: list[dict[str, Any]] = []
        if pending:
            note("write-back", {"files": len(pending)})
            job = run_job(
                "apply_salvage",
                [path, *pending],
                env=private_env(),
                on_line=_progress(
                    bar, task, "writing back", lambda done, rate: f"{rate:,.0f} vectors/s"
                ),
            )
            rc, err = job.returncode, job.stderr
            if not job.ok:
                _error(
                    f"write-back of salvaged vectors failed (rc={rc}); the backup is "
                    f"in {rep.backup_dir}; run repair again\n{err[-2000:]}"
                )
                return 1
            applied = job.result
            for a in applied:
                if a.get("removed"):
                    # Removed because their vectors exist nowhere: they did not come back
                    # whole (issue 21), even if reembed can put them back later.
                    saved = f"{a['salvage_file']}.removed.json"
                    record_losses(path, saved, len(a["removed"]))
                    rep.incomplete_records += len(a["removed"])
                    rep.losses_file = rep.losses_file or saved
                    removed_records += [
                        {"collection": a["collection"], "id": i, "missing": ["vector"]}
                        for i in a["removed"]
                    ]
        after = None
        if not dry_run and rep.status != "nothing_to_do":
            note("checking the result", {})
            after = check_directory(path)
    incomplete = removed_records or _incomplete_records(rep.losses_file)
    # An earlier repair's losses, not yet acknowledged: this run is no plain success either.
    earlier = None if rep.incomplete_records or rep.losses_file else unacknowledged_losses(path)
    if json_out:
        result = {
            "repair": rep.to_dict(),
            "applied": applied,
            "after": after.to_dict() if after else None,
            "journal_backup": journal_backup,
            "incomplete_records": rep.incomplete_records,
            "losses_file": rep.losses_file,
            "incomplete": incomplete,
            "earlier_losses": earlier,
        }
        print(json.dumps(result, indent=1))
    else:
        if journal_backup:
            print(
                f"rolled back an unfinished transaction (hot journal); backup in {journal_backup}"
            )
        _print_repair(path, rep, applied, after, incomplete)
        _print_losses(path, earlier, None)
    if rep.status == "not_repairable":
        return 1
    if rep.incomplete_records or rep.losses_file or earlier is not None:
        return 1  # records did not come back whole (issue 21): never a plain success
    if after is not None and after.status != "healthy":
        return 1
    if any(s.get("removed") for s in applied):
        return 1  # healthy again, but records are gone until the caller re-adds them
    return 0


def _incomplete_records(losses_file: str | None) -> list[dict[str, Any]]:
    """The records a repair listed as incomplete: collection, id, what is missing."""
    if not losses_file:
        return []
    try:
        with open(losses_file, "rb") as f:
            doc = json.loads(f.read())
        records = doc["records"]
    except (OSError, ValueError, KeyError, TypeError):
        return [{"error": f"cannot read {losses_file}"}]
    out = [
        {k: r.get(k) for k in ("collection", "id", "missing", "missing_keys", "rebuilt")}
        for r in records
    ]
    # Records whose id was lost with their row: known by what else they left (issue 21).
    out += [
        {"collection": None, "id": None, "rowid": r.get("rowid"), "missing": ["id"]}
        for r in doc.get("unidentified") or []
    ]
    return out


def _progress(
    bar: Progress | None, task: Any, description: str | None, detail: Callable[[int, float], str]
) -> Callable[[str, int], None] | None:
    """A job's TOTAL and PROGRESS lines moved onto the progress bar (None: no bar)."""
    if bar is None:
        return None
    t0 = time.perf_counter()
    done = 0

    def on_line(word: str, n: int) -> None:
        nonlocal done
        if word == "TOTAL":
            if description is None:
                bar.update(task, total=n, completed=0)
            else:
                bar.update(task, total=n, completed=0, description=description)
        else:
            done += n
            rate = done / max(time.perf_counter() - t0, 1e-9)
            bar.update(task, completed=done, detail=detail(done, rate))

    return on_line


@app.command(
    epilog=(
        "Examples:\n\n"
        "  safechroma reembed ./db --collection docs --embedding-function myapp.emb:embed\n\n"
        "  safechroma reembed ./db --collection docs     # the collection's own function\n\n"
        "Exit codes: 0 all restored (or nothing to restore), 1 some remain (no document to "
        "embed), 2 nothing done (directory in use, no usable function, check failed)."
    )
)
def reembed(
    path: PathArg,
    collection: Annotated[str, typer.Option("--collection", help="The collection to restore.")],
    embedding_function: Annotated[
        str | None,
        typer.Option(
            "--embedding-function",
            metavar="MODULE:FN",
            help="Documents -> embeddings; default: the collection's recorded one, if offline.",
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> int:
    """Re-embed and put back the records a repair saved because their vectors were lost.

    The function is first checked against vectors that survived: it must reproduce them.
    """
    from safechroma.storage.recovery import saved_records

    if not os.path.isfile(os.path.join(path, "chroma.sqlite3")):
        _error(f"{path} is not a Chroma directory (no chroma.sqlite3)")
        return 2
    if not saved_records(path, collection):
        print(f"nothing to restore for {collection!r} in {path}")
        return 0
    fd = _lock(path)
    if fd is None:
        _error(f"{path} is in use: another process holds {LOCK_NAME}")
        return 2
    try:
        with _progress_bar() as bar:
            task = (
                bar.add_task(f"re-embedding {collection}", total=None, detail="")
                if bar is not None
                else None
            )
            job = run_job(
                "restore_saved",
                [path, collection, embedding_function or ""],
                env=private_env(),
                on_line=_progress(
                    bar, task, None, lambda done, rate: f"{done:,} records · {rate:,.0f} records/s"
                ),
            )
    finally:
        os.close(fd)
    if not job.ok:
        _error(f"re-embedding failed (rc={job.returncode})\n{job.stderr}")
        return 2
    out = job.result
    if json_out:
        print(json.dumps(out, indent=1))
    elif out["error"]:
        _error(f"nothing restored: {out['error']}")
    else:
        print(
            f"restored {len(out['restored']):,} records to {collection}; "
            f"{len(out['already_present']):,} were present again; "
            f"{len(out['remaining']):,} remain (no document to embed)"
        )
        for rid in out["remaining"][:10]:
            print(f"      {rid}")
    if out["error"]:
        return 2
    return 1 if out["remaining"] else 0
