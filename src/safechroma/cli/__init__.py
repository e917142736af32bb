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

The parts: :mod:`._app` (the typer app, shared argument types, the directory lock),
:mod:`._present` (consoles, progress bars, the views), and one module per group of commands:
:mod:`._inspect` (check, info), :mod:`._repair` (repair, reembed), :mod:`._serve` (serve,
release, run, demo). Work that opens a directory with Chroma runs as a job
(:mod:`safechroma.jobs`), never in this process.

Adding a subcommand: one function decorated with ``@app.command()`` in one of those modules,
whose parameters are ``typer`` arguments and options; it returns its exit code (an ``int``).
Print through ``_present._stdout`` / ``_stderr``, and use ``_present._progress_bar`` for long
work.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import typer

try:  # recent typer releases carry their own copy of click; older ones use click itself
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import ClickException  # type: ignore[assignment,unused-ignore]

# The command modules register their commands on `app` when imported, in this order (the
# order `safechroma --help` lists them).
from . import _inspect, _repair, _serve  # noqa: F401
from ._app import LOCK_NAME, _lock, app
from ._present import render_check, render_info

__all__ = ["LOCK_NAME", "_lock", "app", "main", "render_check", "render_info"]


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
