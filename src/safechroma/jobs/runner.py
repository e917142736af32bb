"""The job runner: a ``python -m safechroma.jobs.<name>`` child, and the lines it speaks.

A job is work that opens the directory with Chroma beside (never inside) the process that
supervises it: the CLI and ``safechroma serve`` never import chromadb for a directory they
guard (FACTS §4: one owner per directory; a fresh process is the clean reset after a repair).
Both faces start jobs with :func:`run_job`; the job modules speak the protocol below with
:func:`say` and :class:`Counting`.

Protocol, one line each on the child's stdout (anything else is ignored)::

    TOTAL <n>       how many units the job will write (for a progress bar)
    PROGRESS <n>    n more units written
    RESULT <json>   the job's result; the last one counts

The child's stderr goes to a temporary file; its tail is in :class:`JobResult`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Counting", "JobResult", "run_job", "say"]


@dataclass
class JobResult:
    """How a job ended.

    Attributes:
        returncode: the child's exit status (negative: killed by that signal).
        result: the JSON of its last ``RESULT`` line, None when it printed none.
        stderr: the last ``stderr_limit`` characters of its stderr.
    """

    returncode: int
    result: Any
    stderr: str

    @property
    def ok(self) -> bool:
        """Exit status 0 and a ``RESULT`` line."""
        return self.returncode == 0 and self.result is not None


def run_job(
    module: str,
    args: Sequence[str],
    *,
    env: Mapping[str, str],
    on_line: Callable[[str, int], None] | None = None,
    new_session: bool = False,
    stderr_limit: int = 2000,
) -> JobResult:
    """Run ``python -m safechroma.jobs.<module> ARGS...`` to its end.

    Args:
        module: the job's module name under ``safechroma.jobs``.
        args: its command-line arguments.
        env: its environment (the caller's private one: never patched by the launcher).
        on_line: called with ``("TOTAL", n)`` and ``("PROGRESS", n)`` as the lines arrive.
        new_session: start it in its own session, so that a Ctrl-C in the terminal reaches
            the caller only, which then lets the job finish.
        stderr_limit: how much of the end of its stderr to keep.
    """
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", f"safechroma.jobs.{module}", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=dict(env),
            start_new_session=new_session,
        )
        assert proc.stdout is not None
        result: str | None = None
        with proc.stdout:
            for line in proc.stdout:
                word, _, rest = line.rstrip("\n").partition(" ")
                if word == "RESULT":
                    result = rest
                elif word in ("TOTAL", "PROGRESS") and on_line is not None:
                    on_line(word, int(rest))
        rc = proc.wait()
        err.seek(0)
        tail = err.read()[-stderr_limit:]
    return JobResult(rc, None if result is None else json.loads(result), tail)


def say(word: str, value: Any) -> None:
    """Print one protocol line (``TOTAL``, ``PROGRESS`` or ``RESULT``) and flush it."""
    text = json.dumps(value, default=str) if word == "RESULT" else str(int(value))
    print(f"{word} {text}", flush=True)


class Counting:
    """A chromadb client or collection that says ``PROGRESS <n>`` after each write of n records.

    ``get_collection`` hands out counting collections, so a storage function given this client
    reports its progress without knowing about it.
    """

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def get_collection(self, *args: Any, **kwargs: Any) -> Counting:
        return Counting(self._inner.get_collection(*args, **kwargs))

    def add(self, ids: Any, **kwargs: Any) -> Any:
        out = self._inner.add(ids=ids, **kwargs)
        say("PROGRESS", len(ids))
        return out

    def upsert(self, ids: Any, **kwargs: Any) -> Any:
        out = self._inner.upsert(ids=ids, **kwargs)
        say("PROGRESS", len(ids))
        return out
