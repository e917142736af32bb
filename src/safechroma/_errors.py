"""The exceptions safechroma raises.

Chroma's own exceptions (``chromadb.errors.NotFoundError``, ``ValueError``, ...) raised inside the
worker reach the caller as the same type; everything below is about the worker itself::

    SafeChromaError                          base of everything safechroma adds
    ├── ClientClosedError                    you closed the client; not a fault
    ├── DirectoryLockedError                 another process owns the persist directory
    ├── WorkerError                          the worker broke under you
    │   ├── WorkerCrashedError               it died (signal or exit) while serving a call
    │   │   └── WorkerStartError             it died (or hung) while opening the directory
    │   ├── WorkerTimeoutError (TimeoutError)  a call passed its deadline; the worker was killed
    │   ├── ProtocolError                    it sent bytes the caller refuses to decode
    │   └── PoisonRequestError               this exact call killed workers again and again
    ├── CrashLoopError                       too many deaths in a short time: breaker is open
    ├── RecoveryError                        the directory is damaged and recovery failed
    ├── IncompatibleDirectoryError           a newer chromadb wrote it: not opened, not touched
    ├── ChromaPanicError                     Chroma's Rust core panicked (the worker is replaced)
    ├── RemoteError                          an error of a type the caller will not rebuild
    ├── UnsupportedPlatformError             SafeClient's worker transport is missing here
    ├── ServerError                          a Chroma server broke under a SafeHttpClient
    │   ├── ServerUnavailableError           it refused or dropped the connection
    │   └── ServerTimeoutError (TimeoutError)  it did not answer within the deadline
    └── ServeError                           `safechroma serve` could not start Chroma's server

``CrashLoopError`` is also what a ``SafeHttpClient`` raises while its breaker is open.

Every exception pickles, so it can cross process boundaries (``__reduce__`` rebuilds it from
its constructor arguments).
"""

from __future__ import annotations

import signal as _signal
from typing import Any

__all__ = [
    "ChromaPanicError",
    "ClientClosedError",
    "CrashLoopError",
    "DirectoryLockedError",
    "IncompatibleDirectoryError",
    "PoisonRequestError",
    "ProtocolError",
    "RecoveryError",
    "RemoteError",
    "SafeChromaError",
    "ServeError",
    "ServerError",
    "ServerTimeoutError",
    "ServerUnavailableError",
    "UnsupportedPlatformError",
    "WorkerCrashedError",
    "WorkerError",
    "WorkerStartError",
    "WorkerTimeoutError",
    "exit_name",
    "signal_name",
]

# Windows reports a crash as the process's exit code, an NTSTATUS: these are the ones a
# native extension's crash produces (chroma-core/chroma#5175 and #6052: 0xC0000005).
NTSTATUS_NAMES = {
    0xC0000005: "ACCESS_VIOLATION",  # Windows' SIGSEGV
    0xC0000006: "IN_PAGE_ERROR",  # a mapped file's page could not be read: Windows' SIGBUS
    0xC000001D: "ILLEGAL_INSTRUCTION",
    0xC0000094: "INTEGER_DIVIDE_BY_ZERO",
    0xC00000FD: "STACK_OVERFLOW",
    0xC0000409: "STACK_BUFFER_OVERRUN",  # __fastfail: abort() of the MSVC runtime, Rust panics
}


def exit_name(exitcode: int | None) -> str | None:
    """Name how a process ended from its exit status, on any system; None for a plain exit.

    A negative ``Popen.returncode`` is a POSIX signal (``-7`` -> ``"SIGBUS"``); a Windows crash
    is an NTSTATUS exit code, read unsigned (``0xC0000005``, as ``Popen`` reports it) or as the
    signed 32-bit number some tools print (``-1073741819``): ``"ACCESS_VIOLATION"``.
    """
    if exitcode is None:
        return None
    code = exitcode & 0xFFFFFFFF if -(1 << 31) <= exitcode < (1 << 32) else exitcode
    if code in NTSTATUS_NAMES:
        return NTSTATUS_NAMES[code]
    if exitcode >= 0:
        return None
    try:
        return _signal.Signals(-exitcode).name
    except ValueError:
        return f"signal {-exitcode}"


def signal_name(exitcode: int | None) -> str | None:
    """Name the signal (or the Windows crash) behind an exit status (see :func:`exit_name`)."""
    return exit_name(exitcode)


class SafeChromaError(Exception):
    """Base class of every exception that safechroma itself raises."""

    def __init__(self, message: str, **facts: Any) -> None:
        super().__init__(message)
        self.message = message
        for key, value in facts.items():
            setattr(self, key, value)
        self._facts = facts

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self._facts))

    def __str__(self) -> str:
        return self.message


def _rebuild(cls: type[SafeChromaError], message: str, facts: dict[str, Any]) -> SafeChromaError:
    return cls(message, **facts)


class ClientClosedError(SafeChromaError, RuntimeError):
    """The client (or the collection's owner) was closed by the caller."""


class DirectoryLockedError(SafeChromaError):
    """Another process owns the persist directory; Chroma is not safe with two owners.

    Attributes:
        path: the persist directory.
        lock_path: the lock file that is held.
        address: when ``safechroma serve`` holds it, the address it serves (connect with
            ``safechroma.SafeHttpClient``); otherwise absent.
    """

    path: str
    lock_path: str


class WorkerError(SafeChromaError):
    """The worker process failed; the caller is fine and the next call gets a new worker.

    Attributes:
        pid: the worker's process id.
        operation: the method that was in flight (e.g. ``"query"``), or None.
        outcome_unknown: True when a write was in flight, so it may or may not have been
            applied. Writes are not replayed unless the client was built with
            ``replay_writes=True``; check with ``get`` before retrying a non-idempotent call.
    """

    pid: int | None
    operation: str | None
    outcome_unknown: bool


class WorkerCrashedError(WorkerError):
    """The worker died while serving a call.

    Attributes:
        exitcode: the worker's exit status (negative for a signal, as in ``Popen``).
        signal: the signal's name (``"SIGBUS"``, ``"SIGSEGV"``, ...) or None for a plain exit.
        crash_log: the tail of the worker's ``faulthandler`` output and stderr.
    """

    exitcode: int | None
    signal: str | None
    crash_log: str


class WorkerTimeoutError(WorkerError, TimeoutError):
    """A call passed its deadline; the worker was killed so that it cannot hold the directory.

    Attributes:
        timeout: the deadline in seconds that was exceeded.
    """

    timeout: float


class WorkerStartError(WorkerCrashedError):
    """A new worker died or hung while opening the directory (``signal`` says how)."""


class ProtocolError(WorkerError):
    """The worker sent a malformed or forbidden message; it was killed and will be replaced."""


class PoisonRequestError(WorkerError):
    """This exact call (same collection, method and arguments) killed two workers on a
    directory the validator calls healthy, so it is not sent again; other calls are served.

    Raised for the call whose second death made it poison (then ``sent`` is True, and a write's
    ``outcome_unknown`` is True as for any death), and for every later identical call, which is
    refused before it reaches a worker (``sent`` False). ``reset_breaker()`` forgets it, and so
    does a recovery that found the directory damaged.

    Attributes:
        fingerprint: a hex digest naming the call (target, method, arguments).
        deaths: descriptions of the deaths it caused, oldest first.
        sent: whether this attempt reached a worker.
    """

    fingerprint: str
    deaths: list[str]
    sent: bool


class CrashLoopError(SafeChromaError):
    """The worker died too often in a short time, so no new one is started.

    Calls fail fast until ``client.reset_breaker()`` is called or the cooldown passes.

    Attributes:
        path: the persist directory.
        deaths: descriptions of the recent deaths, oldest first.
        retry_after: seconds until the cooldown ends.
    """

    path: str
    deaths: list[str]
    retry_after: float


class RecoveryError(SafeChromaError):
    """The directory failed validation and the recovery hook could not repair it.

    Attributes:
        path: the persist directory.
        report: the validator's report (see ``safechroma.check_directory``).
    """

    path: str
    report: Any


class IncompatibleDirectoryError(SafeChromaError):
    """The directory was written by a newer chromadb than the installed one.

    Its SQLite schema has migrations the installed chromadb does not know (chroma#5909).
    chromadb 1.5.9 would open it anyway and write into a schema it does not understand, so no
    worker is started, no repair is attempted and nothing in the directory is written.
    Upgrade chromadb, or open the directory with the version that wrote it.

    Attributes:
        path: the persist directory.
        installed_version: the installed chromadb's version.
        directory_schema: highest migration version per migration dir in the directory.
        unknown_migrations: the migrations the installed chromadb lacks
            (``"dir version filename"``).
    """

    path: str
    installed_version: str | None
    directory_schema: dict[str, int]
    unknown_migrations: list[str]


class IncompatibleWorkerError(SafeChromaError):
    """The worker serving the directory for another process runs other versions.

    Processes that share a directory's worker must run the same safechroma and chromadb (and
    wire protocol): requests travel as pickles between them. The message names both sides.

    Attributes:
        path: the persist directory.
        worker_versions: ``{"protocol", "safechroma", "chromadb"}`` of the worker.
        client_versions: the same for this process.
    """

    path: str
    worker_versions: dict[str, Any]
    client_versions: dict[str, Any]


class ChromaPanicError(SafeChromaError, RuntimeError):
    """Chroma's Rust core panicked (``pyo3_runtime.PanicException``) during the call.

    The panic is caught inside the worker and reported as this error; because a panic can leave
    Rust state poisoned, the worker is retired and the next call gets a fresh one.
    """

    operation: str | None


class RemoteError(SafeChromaError):
    """An exception raised in the worker whose type the caller does not rebuild.

    The caller only rebuilds builtin exceptions and ``chromadb.errors`` types; anything else
    arrives as this, naming the original type.

    Attributes:
        type_name: ``module.QualName`` of the original exception.
    """

    type_name: str


class ServerError(SafeChromaError):
    """A Chroma server (``chroma run``, ``safechroma serve``, a distributed or cloud deployment)
    failed a ``SafeHttpClient`` call; Chroma's own errors (``NotFoundError``, ...) are not this.

    Attributes:
        url: the server's API address.
        operation: what was in flight, e.g. ``"query"`` or ``"add"``.
        outcome_unknown: True when a write reached the server and no answer came back, so it
            may or may not have been applied (writes are not replayed unless the client was
            built with ``replay_writes=True``; check with ``get`` before retrying).
        attempts: how many times the request was sent or tried.
    """

    url: str
    operation: str
    outcome_unknown: bool
    attempts: int


class ServerUnavailableError(ServerError):
    """The server refused the connection for longer than the client waits for a restart, or
    dropped it in the middle of a call.

    Attributes:
        cause: ``"refused"`` (nothing was sent: down, restarting, wrong address) or
            ``"dropped"`` (the connection closed before the answer: the server died or was
            restarted mid-call).
    """

    cause: str


class ServerTimeoutError(ServerError, TimeoutError):
    """No answer within the call's deadline (``timeout=`` or ``safechroma.call_timeout``).

    The server may be hung (a stopped process, a locked SQLite) or just slow; the client
    stays usable, and ``safechroma serve``'s health watchdog restarts a server that stays hung.

    Attributes:
        timeout: the deadline in seconds that passed.
    """

    timeout: float


class ServeError(SafeChromaError):
    """``safechroma serve`` could not run Chroma's server (``CrashLoopError`` and
    ``RecoveryError`` say when it gave up after deaths or damage).

    Attributes:
        reason: ``"port_in_use"``, ``"start_failed"`` or ``"not_a_directory"``.
        address: the address it was to serve, e.g. ``"http://127.0.0.1:8000"``.
    """

    reason: str
    address: str


class UnsupportedPlatformError(SafeChromaError):
    """This system lacks what ``SafeClient``'s worker transport needs (Windows): the message
    names what works instead (``SafeHttpClient`` against ``safechroma serve``)."""
