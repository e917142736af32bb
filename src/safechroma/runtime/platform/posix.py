"""The portable POSIX mechanisms: macOS, other Unixes, and Linux in ``SAFECHROMA_PORTABLE`` mode.

Only what POSIX (and macOS's own socket options) provides: a sentinel pipe for a worker's exit,
``kill`` guarded by that sentinel, ``flock``, ``RLIMIT_FSIZE``, and an RSS watchdog instead of
``RLIMIT_AS``. Some readings (a peer's user, resident memory) use the best the running system
has, and say None where it has nothing.
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import select
import signal
import socket
import struct
import sys
import time
from typing import Final

from ._common import ExitSentinel
from ._common import start_rss_watchdog as _start_watchdog

if sys.platform == "win32":  # the type checker reads no further for Windows
    raise ImportError("safechroma.runtime.platform.posix is for POSIX systems")


# macOS <sys/un.h>: SOL_LOCAL and LOCAL_PEERCRED, which returns a struct xucred
# {u_int cr_version; uid_t cr_uid; short cr_ngroups; gid_t cr_groups[16]} (76 bytes).
_SOL_LOCAL: Final = 0
_LOCAL_PEERCRED: Final = 1
_XUCRED: Final = struct.Struct("=IIh")
_XUCRED_SIZE: Final = 76
_PARENT_POLL: Final = 0.2


class PipeSentinel(ExitSentinel):
    """A pipe whose only write end the worker holds: the read end, kept by the caller, turns
    readable (EOF) when the worker exits, whoever reaps it (CPython multiprocessing's
    ``sentinel``). Both ends are created non-inheritable; the spawn hands the write end to the
    worker alone (``pass_fds``), and the worker keeps it from its own children."""

    def __init__(self) -> None:
        self._read, self.child_fd = os.pipe()

    def started(self, pid: int) -> int | None:
        if self.child_fd is not None:
            os.close(self.child_fd)
            self.child_fd = None
        return self._read

    def abandon(self) -> None:
        if self.child_fd is not None:
            os.close(self.child_fd)
            self.child_fd = None
        os.close(self._read)


def attach_watch(pid: int, passed: int | None) -> int:
    """The sentinel a shared worker handed over (SCM_RIGHTS); it is the only watch there is."""
    if passed is None:
        raise OSError(errno.ESRCH, f"worker {pid} sent no exit sentinel")
    return passed


def exited(watch: int, timeout: float | None) -> bool:
    readable, _, _ = select.select([watch], [], [], timeout)
    return bool(readable)


def kill(pid: int, watch: int | None) -> None:
    # The sentinel says whether the pid is still the worker's: once it is readable the worker
    # has exited and the pid may be anyone's.
    if watch is not None and exited(watch, 0):
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_parent_gone(ppid: int) -> None:
    # A process whose parent exits is re-parented (to init or a subreaper).
    while os.getppid() == ppid:
        time.sleep(_PARENT_POLL)


def peer_uid(sock: socket.socket) -> int | None:
    if sys.platform == "linux":
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        return int(uid)
    if sys.platform == "darwin":
        raw = sock.getsockopt(_SOL_LOCAL, _LOCAL_PEERCRED, _XUCRED_SIZE)
        _version, uid, _ngroups = _XUCRED.unpack_from(raw)
        return int(uid)
    return None


def try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def set_limit(which: int, limit: int) -> None:
    """Lower the soft limit ``which`` to ``limit`` (never above the hard limit)."""
    _soft, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(which, (limit, hard))


def limit_file_size(limit: int) -> None:
    # A runaway write (chroma-core/chroma#7510) then kills this process with SIGXFSZ, and the
    # disk keeps its free space. CPython starts with SIGXFSZ ignored, which would turn the
    # signal into an EFBIG that hnswlib does not check (a silently torn file): restore the
    # default action, so the supervisor sees a death and validates the directory.
    set_limit(resource.RLIMIT_FSIZE, limit)
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)


def self_rss() -> int | None:
    """This process's resident memory: current on Linux (/proc/self/statm), the peak on macOS
    (``ru_maxrss``, in bytes there), which only ever errs towards ending earlier."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    if sys.platform == "darwin":
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return None


def start_rss_watchdog(limit: int) -> None:
    # SIGKILL, as the system's own out-of-memory killer would: the caller names the death.
    _start_watchdog(limit, self_rss, lambda: os.kill(os.getpid(), signal.SIGKILL))


def rss_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None
