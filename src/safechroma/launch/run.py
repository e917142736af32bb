"""``safechroma run [OPTIONS] -- COMMAND [ARGS...]``: protect a program nobody rewrote.

Sets ``SAFECHROMA_RUN=1`` and the options' ``SAFECHROMA_*`` variables, then replaces itself with
COMMAND (``exec``: the same pid, so signals from a terminal or an MCP host reach the program
itself, and its stdin/stdout/stderr are the ones it was given, byte for byte). The start-up
hook (``safechroma-run.pth`` in site-packages, :mod:`safechroma.launch.hook`) then patches
chromadb in COMMAND's Python process and in every Python child it starts, whatever it does
to ``PYTHONPATH``.

Kept apart from the typer CLI so that starting a program costs one small import, not typer's
and rich's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import site
import sys
from collections.abc import Sequence

from .options import OPTIONS, RUN_VAR, OptionError, check, to_env

PTH_NAME = "safechroma-run.pth"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="safechroma run",
        description=(
            "Run COMMAND unchanged, with every chromadb.PersistentClient it creates (in its own "
            "process and its Python children) served by a supervised safechroma worker."
        ),
        epilog=(
            "Every option can also be set as SAFECHROMA_<NAME> in the environment (flags win). "
            "Example: safechroma run --replay-writes -- chroma-mcp --client-type persistent "
            "--data-dir ./db"
        ),
    )
    for spec in OPTIONS:
        parser.add_argument(spec.flag, dest=spec.field, metavar=spec.kind.upper(), help=spec.help)
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="print no line on stderr when a worker dies or a directory is repaired",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the program and its arguments")
    return parser


def hook_installed() -> str | None:
    """The path of the start-up hook in this interpreter's site-packages, or None."""
    folders = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        folders.append(site.getusersitepackages())
    for folder in folders:
        candidate = os.path.join(folder, PTH_NAME)
        if os.path.isfile(candidate):
            return candidate
    return None


def main(argv: Sequence[str]) -> int:
    """Parse, set the environment, exec COMMAND; returns only on an error (exit code)."""
    args = list(argv)
    parser = _parser()
    if "--" in args:
        cut = args.index("--")
        ns = parser.parse_args(args[:cut])
        command = args[cut + 1 :]
    else:
        ns = parser.parse_args(args)
        command = list(ns.command)
    if not command:
        parser.print_usage(sys.stderr)
        print(
            "safechroma run: no COMMAND given (safechroma run -- COMMAND [ARGS...])",
            file=sys.stderr,
        )
        return 2
    given = {spec.field: getattr(ns, spec.field) for spec in OPTIONS}
    try:
        env = to_env({k: v for k, v in given.items() if v is not None})
        # Variables already in the environment are checked here too, once, not in each child.
        for spec in OPTIONS:
            if spec.env in os.environ and spec.env not in env:
                check(spec, os.environ[spec.env])
    except OptionError as exc:
        print(f"safechroma run: {exc}", file=sys.stderr)
        return 2
    if hook_installed() is None:
        print(
            f"safechroma run: the start-up hook ({PTH_NAME}) is not in this Python's "
            f"site-packages ({', '.join(site.getsitepackages())}), so programs would run "
            "unprotected. Reinstall safechroma with pip into this environment.",
            file=sys.stderr,
        )
        return 2
    os.environ.update(env)
    os.environ[RUN_VAR] = "1"
    if ns.quiet:
        os.environ["SAFECHROMA_EVENTS"] = "0"
    program = shutil.which(command[0]) or command[0]
    if not os.path.exists(program):
        print(f"safechroma run: command not found: {command[0]}", file=sys.stderr)
        return 127
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(program, command)
    except OSError as exc:
        print(f"safechroma run: cannot run {command[0]}: {exc}", file=sys.stderr)
        return 126
    return 0  # pragma: no cover - exec does not return
