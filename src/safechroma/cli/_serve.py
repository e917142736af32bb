"""``safechroma serve``, ``release``, ``run`` and ``demo``: the commands that run something on
a directory or hand it back."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Annotated

import typer

from ._app import LOCK_NAME, PathArg, _lock, app
from ._present import _error


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
    from safechroma.http.serve import ServeOptions, Server, describe

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
