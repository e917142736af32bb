"""The ``safechroma`` command's entry point: ``run`` and ``--version`` without typer.

``safechroma run`` starts a program, so it must cost one small import, not the CLI's (typer,
rich, the storage modules); everything else goes to :mod:`safechroma.cli`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["run"]:
        from .launch.run import main as run_main

        return run_main(args[1:])
    if args[:1] in (["--version"], ["-V"]):
        from . import __version__

        print(f"safechroma {__version__}")
        return 0
    from .cli import main as cli_main

    return cli_main(args)
