"""``safechroma`` command line: check, info, repair, reembed, serve, demo; the only module that
prints.

Exit codes: 0 healthy / done, 1 damaged (``check``), repair incomplete, or records removed by
the repair (their vectors existed nowhere; saved for re-adding), 2 cannot check
(not a Chroma directory, SQLite busy, directory locked by another process), 3 written by a
newer chromadb than the installed one (nothing checked further, nothing changed), 2 also for
a usage error.

Presentation, with ``typer`` and ``rich`` (both come with chromadb): in a terminal, colour,
tables and progress bars on stderr; piped or redirected, plain text lines and no progress;
``--json`` prints the same document either way. ``NO_COLOR`` turns colour off.

Adding a subcommand: one function decorated with ``@app.command()`` whose parameters are
``typer`` arguments and options; it returns its exit code (an ``int``). Print through
:func:`_stdout` / :func:`_stderr`, and use :func:`_progress_bar` for long work.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Annotated, Any, TextIO

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

try:  # recent typer releases carry their own copy of click; older ones use click itself
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import ClickException  # type: ignore[assignment,unused-ignore]

from safechroma._env import private_env
from safechroma.storage.recovery import (
    acknowledge_losses,
    pending_salvage_files,
    record_losses,
    repair_directory,
    roll_back_hot_journal,
    unacknowledged_losses,
)
from safechroma.storage.validate import DirectoryReport, check_directory

LOCK_NAME = ".safechroma.lock"

# Runs in a short-lived child: the CLI process itself never opens the directory with Chroma
# (FACTS §4: one owner per directory; a fresh process is the clean reset after a repair).
# The child reports the records to write and each upsert on stdout, for the progress bar.
_APPLY = """
import json, sys
import chromadb
from safechroma.storage import wal
from safechroma.storage.recovery import apply_salvage


class Counting:
    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def upsert(self, ids, **kwargs):
        out = self._inner.upsert(ids=ids, **kwargs)
        print("PROGRESS " + str(len(ids)), flush=True)
        return out


class Client(Counting):
    def get_collection(self, *args, **kwargs):
        return Counting(self._inner.get_collection(*args, **kwargs))


files = sys.argv[2:]
total = 0
for f in files:
    with open(f[: -len(".npz")] + ".json", "rb") as side:
        total += len(json.loads(side.read())["ids"])
print("TOTAL " + str(total), flush=True)
wal.take_over(sys.argv[1])  # purge off before Chroma's first read: the WAL is our second copy
client = Client(chromadb.PersistentClient(sys.argv[1]))
out = [apply_salvage(client, f) for f in files]
print("RESULT " + json.dumps(out), flush=True)
"""

app = typer.Typer(
    name="safechroma",
    help="Check, inspect and repair Chroma persist directories, without opening them in Chroma.",
    epilog=(
        "Examples:\n\n"
        "  safechroma check ./chroma-data\n\n"
        "  safechroma info ./chroma-data\n\n"
        "  safechroma repair ./chroma-data --dry-run\n\n"
        "  safechroma serve ./chroma-data --port 8000\n\n"
        "  safechroma demo\n\n"
        "Exit codes: 0 healthy or done, 1 damaged or repair incomplete, 2 cannot check, "
        "3 written by a newer chromadb."
    ),
    rich_markup_mode="rich",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

PathArg = Annotated[
    str, typer.Argument(help="The persist directory (what chromadb.PersistentClient got).")
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print one JSON document (the same in a terminal or not).")
]

# -- presentation helpers ----------------------------------------------------------------------

_STATUS_STYLE = {
    "healthy": "bold green",
    "damaged": "bold red",
    "unknown": "bold yellow",
    "incompatible": "bold magenta",
}
_STATUS_WORD = {
    "healthy": "OK",
    "damaged": "DAMAGED",
    "unknown": "UNKNOWN",
    "incompatible": "INCOMPATIBLE",
}
_EXIT = {"healthy": 0, "damaged": 1, "unknown": 2, "incompatible": 3}
_SEVERITY_STYLE = {"error": "red", "warning": "yellow", "info": "dim"}


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def _stdout() -> Console:
    """A console on the current stdout (looked up per call: tests and callers replace it)."""
    return Console(file=sys.stdout, highlight=False, soft_wrap=True)


def _stderr() -> Console:
    return Console(file=sys.stderr, highlight=False, soft_wrap=True)


class _Count(ProgressColumn):
    """``done/total`` with thousands separators; nothing while the total is unknown."""

    def render(self, task: Task) -> Text:
        if task.total is None:
            return Text("")
        return Text(f"{int(task.completed):,}/{int(task.total):,}", style="progress.download")


@contextmanager
def _progress_bar() -> Iterator[Progress | None]:
    """A progress bar on stderr (count, percentage, a detail such as a rate, elapsed time).

    None when stderr is not a terminal: piped and redirected runs show no progress at all.
    """
    if not _is_terminal(sys.stderr):
        yield None
        return
    columns = [
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        _Count(),
        TaskProgressColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=_stderr(), transient=True) as bar:
        yield bar


def _plain_check(rep: DirectoryReport, out: TextIO) -> None:
    out.write(
        f"{_STATUS_WORD[rep.status]}  {rep.path}  ({rep.elapsed_s * 1000:.0f} ms, sqlite "
        f"{rep.sqlite_status})\n"
    )
    for f in rep.findings:
        out.write(f"  [{f.severity}] {f.code}: {f.message}\n")
    for c in rep.collections:
        out.write(
            f"  {_STATUS_WORD[c.status]:8} {c.name or c.segment_id}  "
            f"({c.records if c.records is not None else '?'} records, {c.space}, "
            f"dim {c.dimension})\n"
        )
        for f in c.findings:
            out.write(f"      [{f.severity}] {f.code}: {f.message}\n")


def _status_text(status: str) -> Text:
    return Text(_STATUS_WORD[status], style=_STATUS_STYLE[status])


def _fmt_int(n: int | None) -> str:
    return "?" if n is None else f"{n:,}"


def render_check(rep: DirectoryReport, console: Console) -> None:
    """The terminal view of a check: a status line, a table of collections, the findings."""
    head = Text.assemble(
        _status_text(rep.status),
        "  ",
        (rep.path, "bold"),
        (f"  {rep.elapsed_s * 1000:,.0f} ms · sqlite {rep.sqlite_status}", "dim"),
    )
    console.print(head)
    for f in rep.findings:
        console.print(
            Text.assemble(
                "  ", (f.severity, _SEVERITY_STYLE[f.severity]), f" {f.code}: {f.message}"
            )
        )
    if rep.collections:
        table = Table(show_edge=False, pad_edge=False, header_style="bold")
        table.add_column("collection")
        table.add_column("status")
        table.add_column("records", justify="right")
        table.add_column("dim", justify="right")
        table.add_column("space")
        table.add_column("findings")
        for c in rep.collections:
            findings = Text()
            for i, f in enumerate(c.findings):
                if i:
                    findings.append("\n")
                findings.append(f.code, style=_SEVERITY_STYLE[f.severity])
                findings.append(f": {f.message}")
            table.add_row(
                str(c.name or c.segment_id),
                _status_text(c.status),
                _fmt_int(c.records),
                str(c.dimension) if c.dimension is not None else "?",
                str(c.space),
                findings if c.findings else Text("-", style="dim"),
            )
        console.print(table)


def _checked(path: str, **kwargs: Any) -> DirectoryReport:
    """check_directory with a progress bar over collections (records and rate) in a terminal."""
    with _progress_bar() as bar:
        if bar is None:
            return check_directory(path, **kwargs)
        task = bar.add_task("reading SQLite", total=None, detail="")
        t0 = time.perf_counter()
        seen = 0

        def note(step: str, details: dict[str, Any]) -> None:
            nonlocal seen
            if step == "sqlite":
                bar.update(task, description="SQLite quick_check")
            elif step == "collections":
                bar.update(task, total=details["total"], description="checking indexes")
            elif step == "collection":
                seen += details.get("records") or 0
                rate = seen / max(time.perf_counter() - t0, 1e-9)
                bar.update(
                    task,
                    completed=details["done"],
                    description=f"checked {details['name']}",
                    detail=f"{seen:,} records · {rate:,.0f} records/s",
                )

        return check_directory(path, progress=note, **kwargs)


def _lock(path: str, holder: str = "repair") -> int | None:
    """Take the directory lock (shared with the core's SafeClient) without waiting, and say in
    the lock file who holds it: a client that finds it then fails at once with
    ``DirectoryLockedError`` naming the holder, instead of taking the old worker's address
    still written there for a worker being replaced and waiting ``start_timeout`` for it."""
    from safechroma.runtime.rendezvous import take_lock, write_lock_file

    fd = take_lock(path, os.path.join(path, LOCK_NAME))
    if fd is not None:
        write_lock_file(fd, f"{os.getpid()}\n{holder}\n")
    return fd


def _sqlite_gone_journal_kept(path: str) -> bool:
    """A managed directory whose ``chroma.sqlite3`` is gone: its journal rebuilds it."""
    from safechroma.storage import journal

    return not os.path.isfile(os.path.join(path, "chroma.sqlite3")) and journal.has_journal(path)


# -- commands ----------------------------------------------------------------------------------


@app.command(
    epilog=(
        "Examples:\n\n"
        "  safechroma check ./chroma-data\n\n"
        "  safechroma check ./chroma-data --quick\n\n"
        "  safechroma check ./chroma-data --json | jq .status\n\n"
        "  safechroma check ./chroma-data --ack-losses   # after reading the losses file\n\n"
        "Exit codes: 0 healthy, 1 damaged or an earlier repair lost records (until "
        "--ack-losses), 2 cannot check (not a Chroma directory, SQLite busy), "
        "3 written by a newer chromadb."
    )
)
def check(
    path: PathArg,
    json_out: JsonOpt = False,
    quick: Annotated[
        bool, typer.Option("--quick", help="Headers, sizes and pickles only (no full walk).")
    ] = False,
    ack_losses: Annotated[
        bool,
        typer.Option(
            "--ack-losses",
            help="Acknowledge the records an earlier repair could not bring back whole "
            "(.safechroma/losses.json is renamed, not deleted), then check.",
        ),
    ] = False,
) -> int:
    """Validate a directory: SQLite, every HNSW index, labels, the WAL. Reads only (except
    ``--ack-losses``, which renames the losses marker)."""
    if _sqlite_gone_journal_kept(path):
        # A managed directory whose chroma.sqlite3 was deleted: damaged, not "not Chroma".
        message = (
            f"{path}: chroma.sqlite3 is missing; its write journal (.safechroma/journal) holds "
            f"the records: run `safechroma repair {path}` to rebuild it"
        )
        if json_out:
            print(json.dumps({"path": path, "status": "damaged", "findings": [message]}))
        else:
            print(f"DAMAGED  {message}")
        return _EXIT["damaged"]
    acked = acknowledge_losses(path) if ack_losses else None
    losses = unacknowledged_losses(path)
    if json_out:
        rep = check_directory(path, deep=not quick)
        doc = rep.to_dict()
        doc["losses"] = losses
        doc["losses_acknowledged"] = acked
        if losses is not None and rep.status == "healthy":
            doc["status"] = "losses"  # the files are sound, but records were lost: not healthy
        print(json.dumps(doc, indent=1))
    else:
        rep = _checked(path, deep=not quick)
        # First, so that the first line is not a plain "OK" when records were lost (issue 21).
        _print_losses(path, losses, acked)
        if _is_terminal(sys.stdout):
            render_check(rep, _stdout())
        else:
            _plain_check(rep, sys.stdout)
    if losses is not None and rep.status == "healthy":
        return 1
    return _EXIT[rep.status]


def _print_losses(path: str, losses: dict[str, Any] | None, acked: str | None) -> None:
    """The check's line about records an earlier repair could not bring back whole."""
    lines: list[Text] = []
    if acked:
        lines.append(Text(f"  losses acknowledged (marker kept as {acked})"))
    if losses is not None:
        files = ", ".join(losses.get("files") or []) or "(unknown)"
        count = losses.get("count")
        cols = losses.get("collections") or []
        lines.append(
            Text.assemble(
                ("LOSSES", "bold red"),
                f"  {count if count is not None else '?'} records did not come back whole in "
                f"an earlier repair"
                + (
                    f" (collections without their name or configuration: {', '.join(cols)})"
                    if cols
                    else ""
                )
                + f"; listed in {files}"
                + (f" ({losses['error']})" if losses.get("error") else "")
                + f". After dealing with them: safechroma check {path} --ack-losses",
            )
        )
    if _is_terminal(sys.stdout):
        for line in lines:
            _stdout().print(line)
    else:
        for line in lines:
            print(line.plain)


def _index_bytes(segment_path: str | None) -> int:
    if not segment_path or not os.path.isdir(segment_path):
        return 0
    return sum(os.path.getsize(os.path.join(segment_path, n)) for n in os.listdir(segment_path))


def render_info(rep: DirectoryReport, console: Console) -> None:
    """The terminal view of ``info``: one table row per collection."""
    purge = {True: "on (Chroma default)", False: "off (full WAL kept)", None: "unknown"}[
        rep.wal_purge
    ]
    console.print(Text.assemble((rep.path, "bold"), ("  WAL purge: ", "dim"), purge))
    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    for name, justify in [
        ("collection", "left"),
        ("records", "right"),
        ("dim", "right"),
        ("space", "left"),
        ("index elements", "right"),
        ("index MB", "right"),
        ("WAL rows", "right"),
        ("WAL covers all", "left"),
    ]:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for c in rep.collections:
        covers = {True: Text("yes", "green"), False: Text("no", "yellow"), None: Text("?", "dim")}[
            c.wal_covers_all
        ]
        table.add_row(
            str(c.name),
            _fmt_int(c.records),
            str(c.dimension) if c.dimension is not None else "?",
            str(c.space),
            _fmt_int(c.hnsw.element_count) if c.hnsw else "-",
            f"{_index_bytes(c.segment_path) / 1e6:,.2f}",
            _fmt_int(c.wal_rows),
            covers,
        )
    console.print(table)


@app.command(
    epilog=(
        "Examples:\n\n  safechroma info ./chroma-data\n\n  safechroma info ./chroma-data --json"
    )
)
def info(path: PathArg, json_out: JsonOpt = False) -> int:
    """Collections with records, dimension, space, index size and WAL coverage."""
    if json_out:
        rep = check_directory(path, deep=False, wal_coverage=True)
        print(json.dumps(rep.to_dict(), indent=1))
        return 0 if rep.status != "unknown" else 2
    rep = _checked(path, deep=False, wal_coverage=True)
    if rep.sqlite_status != "ok":
        if _is_terminal(sys.stdout):
            render_check(rep, _stdout())
        else:
            _plain_check(rep, sys.stdout)
        return 2
    if _is_terminal(sys.stdout):
        render_info(rep, _stdout())
        return 0
    purge = {True: "on (Chroma default)", False: "off (full WAL kept)", None: "unknown"}[
        rep.wal_purge
    ]
    print(f"{rep.path}\n  WAL purge: {purge}")
    print(
        f"  {'collection':24} {'records':>8} {'dim':>5} {'space':6} {'index':>8} {'index MB':>9} "
        f"{'WAL rows':>9}  WAL covers all"
    )
    for c in rep.collections:
        idx = c.hnsw.element_count if c.hnsw else "-"
        print(
            f"  {str(c.name):24} {c.records!s:>8} {c.dimension!s:>5} {c.space:6} {idx!s:>8} "
            f"{_index_bytes(c.segment_path) / 1e6:9.2f} {c.wal_rows:>9}  {c.wal_covers_all}"
        )
    return 0


def _error(message: str) -> None:
    if _is_terminal(sys.stderr):
        _stderr().print(Text.assemble(("error: ", "bold red"), message))
    else:
        print(f"error: {message}", file=sys.stderr)


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
            rc, lines, err = _write_back(path, pending, bar, task)
            if rc != 0 or not lines:
                _error(
                    f"write-back of salvaged vectors failed (rc={rc}); the backup is "
                    f"in {rep.backup_dir}; run repair again\n{err[-2000:]}"
                )
                return 1
            applied = json.loads(lines[-1][7:])
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


def _write_back(
    path: str, pending: list[str], bar: Progress | None, task: Any
) -> tuple[int, list[str], str]:
    """Run the write-back child; returns its exit code, its RESULT lines and its stderr."""
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", _APPLY, path, *pending],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=private_env(),
        )
        assert proc.stdout is not None
        results: list[str] = []
        t0 = time.perf_counter()
        done = 0
        for line in proc.stdout:
            if line.startswith("RESULT "):
                results.append(line)
            elif bar is not None and line.startswith("TOTAL "):
                bar.update(
                    task, total=int(line.split()[1]), completed=0, description="writing back"
                )
            elif bar is not None and line.startswith("PROGRESS "):
                done += int(line.split()[1])
                rate = done / max(time.perf_counter() - t0, 1e-9)
                bar.update(task, completed=done, detail=f"{rate:,.0f} vectors/s")
        rc = proc.wait()
        err.seek(0)
        return rc, results, err.read()


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


# How many incomplete records the text output names one by one; the rest are in the file.
_NAMED = 100


def _print_repair(
    path: str,
    rep: Any,
    applied: list[dict[str, Any]],
    after: DirectoryReport | None,
    incomplete: list[dict[str, Any]] | None = None,
) -> None:
    lines: list[Text] = []
    style = {"repaired": "bold green", "nothing_to_do": "bold green", "planned": "bold cyan"}.get(
        rep.status, "bold red"
    )
    word = rep.status.upper()
    if rep.incomplete_records or rep.losses_file:
        # Issue 21: never "REPAIRED" alone when records did not come back whole.
        word = f"{word} WITH LOSSES" if rep.status != "planned" else "PLANNED WITH LOSSES"
        style = "bold red"
        where = f", listed in {rep.losses_file}" if rep.losses_file else ""
        lines.append(
            Text.assemble((word, style), f": {rep.incomplete_records:,} records incomplete{where}")
        )
        lines.append(Text(f"  {rep.message}"))
    else:
        lines.append(Text.assemble((word, style), f": {rep.message}"))
    for c in rep.collections:
        covers = {True: "yes", False: "no", None: "unknown"}[c.wal_covers_all]
        lines.append(
            Text(
                f"  {c.name}: {', '.join(c.reasons)} -> {c.action}; salvaged {c.salvaged:,}; "
                f"not recoverable {len(c.not_recovered):,}; WAL covers all: {covers}"
            )
        )
    for s in applied:
        removed = s.get("removed") or []
        done = f"  wrote back {s['recovered']:,} vectors to {s['collection']}"
        if s.get("reembedded"):
            done += f"; {s['reembedded']:,} re-embedded"
        lines.append(Text(done))
        if removed:
            lines.append(
                Text.assemble(
                    ("  removed ", "bold yellow"),
                    f"{len(removed):,} records whose vectors exist nowhere; their documents and "
                    f"metadata are saved in {s['salvage_file']}.removed.json: put them back with "
                    f"`safechroma reembed {path} --collection {s['collection']} "
                    "--embedding-function MODULE:FN`",
                )
            )
        for r in s["not_recovered"][:10]:
            lines.append(Text(f"      {r['id']}: {str(r['document'])[:60]!r}"))
    for r in (incomplete or [])[:_NAMED]:
        if r.get("id") is None and "rowid" in r:
            lines.append(Text(f"      (row {r['rowid']}): its record's id was lost"))
            continue
        lines.append(
            Text(
                f"      {r.get('collection')}/{r.get('id')}: missing "
                f"{', '.join(r.get('missing') or ['?'])}"
                + (f" (keys {', '.join(r['missing_keys'])})" if r.get("missing_keys") else "")
            )
        )
    if incomplete and len(incomplete) > _NAMED:
        lines.append(Text(f"      ... {len(incomplete) - _NAMED:,} more in {rep.losses_file}"))
    if after is not None:
        status = Text(after.status, _STATUS_STYLE[after.status])
        if (rep.incomplete_records or rep.losses_file) and after.status == "healthy":
            status = Text.assemble(
                ("files healthy", "green"),
                "; ",
                (f"{rep.incomplete_records:,} records incomplete", "bold red"),
                f" (until `safechroma check {path} --ack-losses`)",
            )
        lines.append(Text.assemble("  after repair: ", status))
    if _is_terminal(sys.stdout):
        console = _stdout()
        for line in lines:
            console.print(line)
    else:
        for line in lines:
            print(line.plain)


# The re-embedding child reports each add on stdout, for the progress bar (as _APPLY does).
_REEMBED = """
import json, sys
import chromadb
from safechroma.storage import wal
from safechroma.storage.recovery import restore_saved_records


class Counting:
    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def add(self, ids, **kwargs):
        out = self._inner.add(ids=ids, **kwargs)
        print("PROGRESS " + str(len(ids)), flush=True)
        return out

    def upsert(self, ids, **kwargs):
        out = self._inner.upsert(ids=ids, **kwargs)
        print("PROGRESS " + str(len(ids)), flush=True)
        return out


class Client(Counting):
    def get_collection(self, *args, **kwargs):
        return Counting(self._inner.get_collection(*args, **kwargs))


wal.take_over(sys.argv[1])  # purge off before Chroma's first read: the WAL is our second copy
client = Client(chromadb.PersistentClient(sys.argv[1]))
spec = sys.argv[3] or None
out = restore_saved_records(client, sys.argv[1], sys.argv[2], spec)
print("RESULT " + json.dumps(out), flush=True)
"""


def _run_counting(
    args: list[str], bar: Progress | None, task: Any, unit: str
) -> tuple[int, list[str], str]:
    """Run a child that prints PROGRESS/TOTAL/RESULT lines; returns rc, RESULT lines, stderr."""
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=err, text=True, env=private_env()
        )
        assert proc.stdout is not None
        results: list[str] = []
        t0 = time.perf_counter()
        done = 0
        for line in proc.stdout:
            if line.startswith("RESULT "):
                results.append(line)
            elif bar is not None and line.startswith("TOTAL "):
                bar.update(task, total=int(line.split()[1]), completed=0)
            elif bar is not None and line.startswith("PROGRESS "):
                done += int(line.split()[1])
                rate = done / max(time.perf_counter() - t0, 1e-9)
                bar.update(task, completed=done, detail=f"{done:,} {unit} · {rate:,.0f} {unit}/s")
        rc = proc.wait()
        err.seek(0)
        return rc, results, err.read()


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
            rc, lines, err = _run_counting(
                [sys.executable, "-c", _REEMBED, path, collection, embedding_function or ""],
                bar,
                task,
                "records",
            )
    finally:
        os.close(fd)
    if rc != 0 or not lines:
        _error(f"re-embedding failed (rc={rc})\n{err[-2000:]}")
        return 2
    out = json.loads(lines[-1][7:])
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


def _cmd_serve(a: argparse.Namespace) -> int:
    """``safechroma serve PATH``: Chroma's server on PATH, supervised, until SIGTERM/SIGINT.

    Exit 0 after a requested stop; 1 when it gave up (crash loop, damage it could not repair,
    Chroma would not start); 2 when it could not begin (port in use, directory in use, a
    directory written by a newer chromadb).
    """
    import datetime
    import signal

    from safechroma._errors import (
        CrashLoopError,
        DirectoryLockedError,
        IncompatibleDirectoryError,
        RecoveryError,
        ServeError,
    )
    from safechroma._policy import Event
    from safechroma.server import ServeOptions, Server, describe

    def log(event: Event) -> None:
        stamp = datetime.datetime.fromtimestamp(event.time, datetime.UTC)
        sys.stderr.write(f"{stamp:%Y-%m-%dT%H:%M:%S}Z safechroma serve: {describe(event)}\n")
        if event.kind == "chroma_died" and event.detail.get("log_tail", "").strip():
            for line in event.detail["log_tail"].strip().splitlines()[-15:]:
                sys.stderr.write(f"    | {line}\n")
        sys.stderr.flush()
        if event.kind == "chroma_ready":
            print(f"serving {a.path} at {event.detail['address']}", flush=True)

    options = ServeOptions(
        host=a.host,
        port=a.port,
        stop_grace=a.stop_grace,
        health_interval=a.health_interval,
        health_timeout=a.health_timeout,
        health_grace=a.health_grace,
        health_failures=a.health_failures,
        chroma_log=a.chroma_log,
        on_event=log,
    )
    server = Server(a.path, options)
    previous = {
        sig: signal.signal(sig, lambda _signo, _frame: server.stop())
        for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        server.run()
    except (DirectoryLockedError, IncompatibleDirectoryError, ServeError) as exc:
        print(f"safechroma serve: error: {exc}", file=sys.stderr)
        return 1 if getattr(exc, "reason", None) == "start_failed" else 2
    except (CrashLoopError, RecoveryError) as exc:
        print(f"safechroma serve: gave up: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


@app.command(
    epilog=(
        "Examples:\n\n"
        "  safechroma serve ./chroma-data\n\n"
        "  safechroma serve ./chroma-data --host 0.0.0.0 --port 8000 --chroma-log chroma.log\n\n"
        "Exit codes: 0 after a requested stop (SIGTERM, SIGINT), 1 gave up (crash loop, damage "
        "it could not repair, Chroma would not start), 2 could not begin (port or directory in "
        "use, a directory written by a newer chromadb)."
    )
)
def serve(
    path: PathArg,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    stop_grace: Annotated[float, typer.Option(help="Seconds from SIGTERM to SIGKILL.")] = 10.0,
    health_interval: Annotated[float, typer.Option(help="Seconds between health checks.")] = 5.0,
    health_timeout: Annotated[
        float, typer.Option(help="Seconds one health check may take.")
    ] = 10.0,
    health_grace: Annotated[
        float, typer.Option(help="Seconds after a start that are not counted.")
    ] = 30.0,
    health_failures: Annotated[
        int, typer.Option(help="Failed checks in a row before a restart.")
    ] = 3,
    chroma_log: Annotated[
        str | None, typer.Option(help="Append Chroma's own output to this file.")
    ] = None,
) -> int:
    """Run Chroma's server on a directory, supervised (repair, restart, watchdog)."""
    return _cmd_serve(
        argparse.Namespace(
            path=path,
            host=host,
            port=port,
            stop_grace=stop_grace,
            health_interval=health_interval,
            health_timeout=health_timeout,
            health_grace=health_grace,
            health_failures=health_failures,
            chroma_log=chroma_log,
        )
    )


@app.command(
    epilog="Example:\n\n  safechroma release ./chroma-data && python my_plain_chromadb_app.py"
)
def release(path: PathArg) -> int:
    """Hand a directory back to plain chromadb: stop a warm idle worker, restore Chroma's WAL purge.

    safechroma keeps Chroma's WAL purge off while it manages a directory (a second copy of
    every vector, for repairs) and turns it back on whenever its last process leaves; this
    does it now, also after a crash left it off. Exit codes: 0 released, 2 in use by a running
    program (close it first) or not a Chroma directory.
    """
    from safechroma.storage import wal

    if not os.path.isfile(os.path.join(path, "chroma.sqlite3")):
        _error(f"{path} is not a Chroma directory (no chroma.sqlite3)")
        return 2
    fd = _lock(path, "release")
    if fd is None:
        _error(
            f"{path} is in use by a running program (it holds {LOCK_NAME}); close it first, "
            "then run safechroma release again"
        )
        return 2
    try:
        wal.maintain(path)
        purge = wal.release(path)
    finally:
        os.close(fd)
    how = "Chroma's WAL purge is on again" if purge else 'WAL retention "full" kept'
    print(f"released {path}: no safechroma worker holds it; {how}")
    return 0


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
    epilog="Example:\n\n  safechroma run -- chroma-mcp --client-type persistent --data-dir ./db",
)
def run(ctx: typer.Context) -> int:
    """Run a program unchanged; every chromadb.PersistentClient it creates is supervised.

    ``safechroma run [OPTIONS] -- COMMAND [ARGS...]``; ``safechroma run --help`` lists the
    options. (The command line's entry point runs this without importing typer.)
    """
    from safechroma.launch.run import main as run_main

    return run_main(list(ctx.args))


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
    epilog="Example:\n\n  safechroma demo",
)
def demo(ctx: typer.Context) -> int:
    """Run the crash-safety demo: build a Chroma directory, break it, survive, recover."""
    from safechroma._demo import main as demo_main  # type: ignore[import-not-found,unused-ignore]

    return int(demo_main(list(ctx.args)))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=args, prog_name="safechroma", standalone_mode=False)
    except typer.Exit as e:  # pragma: no cover - returned, not raised, when not standalone
        return int(e.exit_code)
    except ClickException as e:
        e.show()
        return 2
    except typer.Abort:
        print("Aborted.", file=sys.stderr)
        return 1
    return int(rv) if isinstance(rv, int) else 0
