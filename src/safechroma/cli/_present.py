"""What the command line shows: consoles, progress bars, the check, info and repair views.

In a terminal, colour, tables and progress bars on stderr; piped or redirected, plain text
lines and no progress. ``NO_COLOR`` turns colour off (rich reads it).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

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

from safechroma.storage.validate import DirectoryReport, check_directory

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


def _error(message: str) -> None:
    if _is_terminal(sys.stderr):
        _stderr().print(Text.assemble(("error: ", "bold red"), message))
    else:
        print(f"error: {message}", file=sys.stderr)


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
