"""The platform seam: every mechanism that differs between Linux, macOS and Windows, chosen once.

What it owns: the answer to "how, on this system?" for each thing the runtime does with
processes, and nothing else. Each mechanism has one interface here and one implementation per
system (the shape of CPython's ``multiprocessing/popen_*.py`` and filelock's
``UnixFileLock``/``WindowsFileLock``):

==========================  ==========================  ==================================
mechanism                   Linux                       portable (macOS, ``SAFECHROMA_PORTABLE``)
==========================  ==========================  ==================================
a worker's exit, watched    a pidfd (``pidfd_open``)    a pipe only the worker can write to:
together with its channel                               readable (EOF) once it has exited,
                                                        passed to attaching processes with
                                                        ``SCM_RIGHTS`` (multiprocessing's
                                                        *sentinel*)
starting a worker           fork of the warm template   ``subprocess`` spawn (the supervisor's
                            (:mod:`..template`)         warm standby keeps respawns fast)
the peer's user             ``SO_PEERCRED``             ``LOCAL_PEERCRED`` on macOS (its
                                                        ``xucred``), ``SO_PEERCRED`` on Linux;
                                                        always inside a 0700 folder of the
                                                        user, the only wall where the system
                                                        names no peer
the directory lock          ``flock``                   ``flock``
memory ceiling              ``RLIMIT_AS``               an RSS watchdog thread in the worker
                                                        (/proc/self/statm; macOS: the peak,
                                                        ``ru_maxrss``)
largest file written        ``RLIMIT_FSIZE``            ``RLIMIT_FSIZE``
crash names                 signals                     signals
a shared worker's exit      its parent, the template    its parent, the starting process (a
status, for attachers                                   reaper thread); lost if that process
                                                        has gone
==========================  ==========================  ==================================

Windows (:mod:`.windows`, type-checked, not run here): the lock is ``msvcrt.locking``, taken
by the worker itself; a crash is named from its NTSTATUS exit code
(:func:`safechroma._errors.signal_name`); processes are watched through their handles. The
worker transport (Unix sockets handing descriptors over) does not exist there: building a
``SafeClient`` raises :class:`~safechroma._errors.UnsupportedPlatformError` naming what works
(``SafeHttpClient`` against ``safechroma serve``), and ``import safechroma`` always works.

``SAFECHROMA_PORTABLE=1`` in the environment (read once, when this module is imported; worker
processes inherit it) makes a Linux process use the portable column: no pidfd anywhere in the
caller, spawn instead of the fork template, the RSS watchdog instead of ``RLIMIT_AS``. That is
how the macOS mechanisms are exercised on Linux.

Nothing here imports the rest of the runtime; the runtime imports this.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from typing import Any, Final

from ..._errors import UnsupportedPlatformError
from ._common import ExitSentinel

__all__ = [
    "PORTABLE",
    "ExitSentinel",
    "attach_watch",
    "check_worker_transport",
    "close_watch",
    "exited",
    "kill",
    "limit_file_size",
    "limit_memory",
    "new_exit_sentinel",
    "nonblocking_pipe",
    "peer_uid",
    "rss_of",
    "socketpair",
    "try_lock",
    "unsupported",
    "use_fork_template",
    "wait_parent_gone",
    "watch_popen",
]

PORTABLE: Final[bool] = sys.platform != "linux" or os.environ.get(
    "SAFECHROMA_PORTABLE", ""
).strip() not in ("", "0")

if sys.platform == "win32":
    from . import windows
else:
    from . import posix

    if sys.platform == "linux":
        from . import linux

_NATIVE_LINUX: Final = sys.platform == "linux" and not PORTABLE


# -- a worker's exit, watched together with its channel --------------------------------------


def new_exit_sentinel() -> ExitSentinel:
    """What lets the caller see a worker it is about to spawn exit (see :class:`ExitSentinel`)."""
    if sys.platform == "linux" and _NATIVE_LINUX:
        return linux.PidfdSentinel()
    if sys.platform == "win32":
        return windows.HandleSentinel()
    else:
        return posix.PipeSentinel()


def attach_watch(pid: int, passed: int | None) -> int | None:
    """A descriptor that becomes readable when ``pid`` (a worker another process started)
    exits: a pidfd on Linux, else ``passed``, the worker's sentinel received with SCM_RIGHTS
    (closed or kept as the system needs).

    Raises:
        OSError: the process is gone, or no sentinel came where one is needed.
    """
    if sys.platform == "linux" and _NATIVE_LINUX:
        return linux.attach_watch(pid, passed)
    if sys.platform == "win32":
        return windows.open_handle(pid)
    else:
        return posix.attach_watch(pid, passed)


def exited(watch: int | None, timeout: float | None) -> bool:
    """Whether the process behind ``watch`` has exited, waiting up to ``timeout`` seconds
    (None: until it does). No watch descriptor: True (it was closed after the exit)."""
    if watch is None:
        return True
    if sys.platform == "win32":
        return windows.exited(watch, timeout)
    else:
        return posix.exited(watch, timeout)


def close_watch(watch: int) -> None:
    """Release an exit watch (a descriptor; on Windows a process handle)."""
    if sys.platform == "win32":
        windows.close(watch)
    else:
        os.close(watch)


def kill(pid: int, watch: int | None) -> None:
    """SIGKILL (Windows: terminate) a worker that has not been seen to exit yet; a pidfd on
    Linux, so a recycled pid is never hit; elsewhere only while its sentinel says it lives."""
    if sys.platform == "linux" and _NATIVE_LINUX and watch is not None:
        linux.kill(watch)
    elif sys.platform == "win32":
        windows.kill(pid, watch)
    else:
        posix.kill(pid, watch)


def watch_popen(popen: subprocess.Popen[Any]) -> int:
    """A descriptor readable once ``popen`` (a child of this process) has exited: a pidfd on
    Linux; elsewhere a pipe whose write end a thread closes when ``popen.wait()`` returns (so
    that thread reaps the child, as ``Popen`` would). The caller closes the descriptor."""
    if sys.platform == "linux" and _NATIVE_LINUX:
        return os.pidfd_open(popen.pid)
    read, write = os.pipe()

    def reap() -> None:
        try:
            popen.wait()
        finally:
            os.close(write)

    threading.Thread(target=reap, name="safechroma-reap", daemon=True).start()
    return read


def nonblocking_pipe() -> tuple[int, int]:
    """A self-pipe (read end, write end), non-inheritable, non-blocking where the system can."""
    read, write = os.pipe()
    if sys.platform != "win32":
        os.set_blocking(read, False)
        os.set_blocking(write, False)
    return read, write


def wait_parent_gone(ppid: int) -> None:
    """In a worker: return once the process ``ppid`` (the caller) has exited."""
    if sys.platform == "linux" and _NATIVE_LINUX:
        linux.wait_parent_gone(ppid)
    elif sys.platform == "win32":
        windows.wait_parent_gone(ppid)
    else:
        posix.wait_parent_gone(ppid)


# -- starting workers ------------------------------------------------------------------------


def use_fork_template() -> bool:
    """Whether new workers are forked from the warm template (Linux, not portable mode);
    elsewhere they are spawned, and the supervisor's warm standby hides the start."""
    return _NATIVE_LINUX and hasattr(os, "fork") and hasattr(os, "pidfd_open")


def unsupported() -> UnsupportedPlatformError:
    """The one error of a system without the worker transport (Windows): what works there."""
    return UnsupportedPlatformError(
        f"safechroma's SafeClient runs Chroma in a worker process reached over Unix sockets, "
        f"which this system ({sys.platform}) does not provide. What works here: "
        "safechroma.SafeHttpClient(host, port) against a Chroma server (`chroma run --path "
        "<path>`, or `safechroma serve <path>` on a Linux or macOS machine), which keeps "
        "Chroma's crashes out of this process.",
        platform=sys.platform,
    )


def socketpair() -> tuple[socket.socket, socket.socket]:
    """A connected pair of Unix stream sockets (descriptors can travel over them).

    Raises:
        UnsupportedPlatformError: not on this system (Windows).
    """
    if sys.platform == "win32":
        raise unsupported()
    else:
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


def check_worker_transport() -> None:
    """Raise the one clear error of a system without the worker transport (Windows).

    Raises:
        UnsupportedPlatformError: no Unix sockets with descriptor passing here.
    """
    if sys.platform == "win32" or not hasattr(socket, "AF_UNIX"):
        raise unsupported()


# -- the peer, the lock ----------------------------------------------------------------------


def peer_uid(sock: socket.socket) -> int | None:
    """The user id of the process at the other end of a Unix socket; None where the system
    cannot say (then the 0700 folder the socket lives in is the only wall)."""
    if sys.platform == "win32":
        return None
    else:
        return posix.peer_uid(sock)


def try_lock(fd: int) -> bool:
    """Take the exclusive lock of the open lock file ``fd`` without waiting; False when
    another process holds it. ``flock`` on POSIX (inherited by a worker with the descriptor),
    ``msvcrt.locking`` on Windows (not inherited: the worker takes it itself)."""
    if sys.platform == "win32":
        return windows.try_lock(fd)
    else:
        return posix.try_lock(fd)


# -- resource limits (in the worker) ---------------------------------------------------------


def limit_memory(limit: int | None) -> None:
    """Cap the worker's memory: ``RLIMIT_AS`` on Linux (a runaway allocation becomes a
    ``MemoryError``); elsewhere a watchdog thread that ends the worker, with a line in its
    log, once its resident memory passes ``limit`` (macOS rejects or ignores ``RLIMIT_AS``)."""
    if not limit:
        return
    if sys.platform == "linux" and _NATIVE_LINUX:
        linux.limit_address_space(limit)
    elif sys.platform == "win32":
        windows.start_rss_watchdog(limit)
    else:
        posix.start_rss_watchdog(limit)


def limit_file_size(limit: int | None) -> None:
    """Cap the size of any file the worker writes (``RLIMIT_FSIZE``, where it exists)."""
    if not limit:
        return
    if sys.platform != "win32":
        posix.limit_file_size(limit)


def rss_of(pid: int) -> int | None:
    """Resident memory of process ``pid`` in bytes, where the system tells (Linux's /proc,
    portable mode included); None elsewhere."""
    if sys.platform == "win32":
        return None
    else:
        return posix.rss_of(pid)
