"""What a caller raises: every exception of a call, built from the facts of one reply or death.

No I/O and no state here: these functions take what :class:`~.generation.Lease` and
:class:`~.generation.Generation` found (a decoded reply, a worker's :class:`~.generation.End`)
and build the exception the caller raises, with a message that says what to do next. They are
used in one place, :meth:`Supervisor.exchange <.supervisor.Supervisor.exchange>` (httpx's
``map_httpcore_exceptions`` role), and by the replacement path for what it reports.

Errors raised by Chroma in the worker are rebuilt as the same type when that is safe
(:func:`rebuild_error`), with the remote traceback as ``__cause__``.
"""

from __future__ import annotations

import builtins
import copy
import re
import sys
from typing import Any

from .._errors import (
    ChromaPanicError,
    CrashLoopError,
    ProtocolError,
    RemoteError,
    SafeChromaError,
    WorkerCrashedError,
    WorkerError,
    WorkerStartError,
    WorkerTimeoutError,
)
from .breaker import Breaker
from .functions import FUNCTIONS
from .generation import End
from .protocol import ErrorInfo

__all__ = [
    "DamageRetry",
    "RemoteTraceback",
    "Retired",
    "copy_error",
    "crash_loop",
    "crashed",
    "died_between_calls",
    "means_damage",
    "misbehaved",
    "panicked",
    "rebuild_error",
    "remote_error",
    "start_failed",
    "timed_out",
]

# Chroma errors that mean the files on disk are damaged (CHROMA_FACTS.md section 3).
_DAMAGE = re.compile(
    r"Error loading hnsw index|Error deserializing pickle file|Error finding id|"
    r"Error getting embedding|Error querying knn|Failed to apply logs to the hnsw segment"
    r"|database disk image is malformed|file is not a database",
    re.IGNORECASE,
)


class RemoteTraceback(Exception):
    """The traceback of an exception raised in the worker, attached as ``__cause__``."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return "\n\n" + self.tb


class Retired(Exception):
    """Internal: a shared worker that is stopping refused the request unrun; try the next."""


class DamageRetry(Exception):
    """Internal: Chroma raised an error meaning on-disk damage; validate and maybe retry."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error

    def __reduce__(self) -> tuple[Any, ...]:  # copy.copy() for callers sharing a failed start
        return (DamageRetry, (self.error,))


def copy_error(error: BaseException) -> BaseException:
    """A copy of a shared error, so each waiting caller raises its own exception object."""
    try:
        dup = copy.copy(error)
    except Exception:  # noqa: BLE001 - an exception that does not copy is raised as is
        return error
    dup.__cause__ = error.__cause__
    return dup


def _with_tail(tail: str) -> str:
    return f"\n--- worker log (tail) ---\n{tail}" if tail.strip() else ""


def crashed(path: str, pid: int, end: End, operation: str) -> WorkerCrashedError:
    """The worker ended (``end``) while ``operation`` was in flight on this caller's channel."""
    if end.kind == "timeout":
        how = f"was killed (SIGKILL) because {end.operation} passed its deadline"
    elif end.kind == "protocol":
        how = f"was killed (SIGKILL) because it sent an invalid reply to {end.operation}"
    elif end.signal:
        how = f"was killed by {end.signal}({end.exitcode})"
    elif end.exitcode is None:
        how = "ended (its exit status is recorded only by the process that started it)"
    else:
        how = f"exited with status {end.exitcode}"
    return WorkerCrashedError(
        f"safechroma worker (pid {pid}) for {path} {how} during {operation}. "
        "Your process is fine; the next call starts a fresh worker after checking the "
        "directory. Reads are retried; a write in flight may or may not have been applied."
        + _with_tail(end.tail),
        pid=pid,
        exitcode=end.exitcode,
        signal=end.signal,
        operation=operation,
        crash_log=end.tail,
        outcome_unknown=False,
    )


def died_between_calls(path: str, pid: int, end: End) -> WorkerCrashedError:
    """The worker died with no call running (what the counters and events record)."""
    sig, code = end.signal, end.exitcode
    how = f"was killed by {sig}({code})" if sig else f"exited with status {code}"
    return WorkerCrashedError(
        f"safechroma worker (pid {pid}) for {path} {how} between calls; it was "
        "replaced before the next call, which no caller noticed." + _with_tail(end.tail),
        pid=pid,
        exitcode=code,
        signal=sig,
        operation=None,
        crash_log=end.tail,
        outcome_unknown=False,
    )


def timed_out(path: str, pid: int, operation: str, timeout: float | None) -> WorkerTimeoutError:
    """``operation`` passed its deadline and this caller killed the worker."""
    return WorkerTimeoutError(
        f"{operation} on {path} did not finish within {timeout} s; the worker "
        f"(pid {pid}) was killed so it cannot keep the directory. The next call "
        "starts a fresh worker. Raise the deadline with timeout= or "
        "safechroma.call_timeout() if the call is legitimately long.",
        pid=pid,
        operation=operation,
        timeout=timeout,
        outcome_unknown=False,
    )


def misbehaved(pid: int, operation: str, why: str) -> ProtocolError:
    """The worker's reply to ``operation`` was invalid and this caller killed the worker."""
    return ProtocolError(
        f"safechroma worker (pid {pid}) sent an invalid reply to {operation}: "
        f"{why}. It was killed and will be replaced.",
        pid=pid,
        operation=operation,
        outcome_unknown=False,
    )


def panicked(operation: str, info: ErrorInfo) -> ChromaPanicError:
    """Chroma's Rust core panicked during ``operation`` (the worker is being replaced)."""
    error = ChromaPanicError(
        f"Chroma's Rust core panicked during {operation}: {info[3]}. The worker was "
        "replaced; the next call gets a fresh one.",
        operation=operation,
    )
    error.__cause__ = RemoteTraceback(info[4])
    return error


def remote_error(info: ErrorInfo) -> BaseException:
    """The exception a call raised in the worker, as the caller raises it.

    A ``ValueError`` about an embedding function the worker could not build says which one
    and why (runtime/functions.py).
    """
    error = rebuild_error(info)
    if type(error) is ValueError and (fuller := FUNCTIONS.explain(str(error))):
        error = ValueError(fuller).with_traceback(None)
        error.__cause__ = RemoteTraceback(info[4])
    return error


def start_failed(path: str, pid: int, exc: WorkerError) -> WorkerStartError:
    """A new worker could not open ``path``: ``exc`` is what its start handshake raised."""
    error = WorkerStartError(
        f"a new worker for {path} could not open it: {exc}",
        pid=pid,
        operation="start",
        outcome_unknown=False,
        exitcode=getattr(exc, "exitcode", None),
        signal=getattr(exc, "signal", None)
        or ("timeout" if isinstance(exc, WorkerTimeoutError) else None),
        crash_log=getattr(exc, "crash_log", ""),
    )
    error.__cause__ = exc
    return error


def crash_loop(path: str, breaker: Breaker, now: float, blocked: float) -> CrashLoopError:
    """No worker is started for ``blocked`` seconds more: the breaker is open."""
    return CrashLoopError(
        f"the worker for {path} is in a crash loop "
        f"({breaker.reason(now)}), so no new worker is started for "
        f"{blocked:.1f} s more. Check the directory with "
        f"`safechroma check {path}`; call reset_breaker() to try at once.",
        path=path,
        deaths=breaker.recent(now),
        retry_after=blocked,
    )


def means_damage(info: ErrorInfo) -> bool:
    """Whether an error Chroma raised means the files on disk are damaged."""
    module, qualname, _args, message, _tb = info
    if module.startswith("chromadb") and qualname == "InternalError":
        return bool(_DAMAGE.search(message))
    if module == "sqlite3" and qualname == "DatabaseError":
        return bool(_DAMAGE.search(message))
    return False


def rebuild_error(info: ErrorInfo) -> BaseException:
    """Rebuild an exception reported by the worker as the same type, when it is safe to.

    The closed set of types the caller rebuilds: exception classes it has *already imported*
    (builtins, chromadb's errors, httpx's, the caller's own embedding function's ...), looked up
    in ``sys.modules`` without importing anything, and constructed from plain arguments
    (strings, numbers). Anything else arrives as :class:`RemoteError` naming the type.
    """
    module, qualname, args, message, tb = info
    mod = builtins if module == "builtins" else sys.modules.get(module)
    cls = getattr(mod, qualname, None) if mod is not None and "." not in qualname else None
    error: BaseException
    if (
        isinstance(cls, type)
        and issubclass(cls, Exception)
        and not issubclass(cls, SafeChromaError)
        and all(a is None or isinstance(a, (str, int, float, bool, bytes)) for a in args)
    ):
        try:
            error = cls(*args)
        except Exception:  # noqa: BLE001 - a constructor we cannot satisfy
            error = RemoteError(f"{module}.{qualname}: {message}", type_name=f"{module}.{qualname}")
    else:
        error = RemoteError(f"{module}.{qualname}: {message}", type_name=f"{module}.{qualname}")
    error.__cause__ = RemoteTraceback(tb)
    return error
