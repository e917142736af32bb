"""``safechroma check`` and ``safechroma info``: read a directory, never open it in Chroma."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from safechroma.storage.recovery import acknowledge_losses, unacknowledged_losses
from safechroma.storage.validate import check_directory

from ._app import JsonOpt, PathArg, _sqlite_gone_journal_kept, app
from ._present import (
    _EXIT,
    _checked,
    _index_bytes,
    _is_terminal,
    _plain_check,
    _print_losses,
    _stdout,
    render_check,
    render_info,
)


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
