"""The ``safechroma`` typer application, the argument types the commands share, and the
directory helpers more than one command needs (the lock, "is this a managed directory")."""

from __future__ import annotations

import os
from typing import Annotated

import typer

LOCK_NAME = ".safechroma.lock"

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
