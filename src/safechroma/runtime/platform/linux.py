"""The Linux mechanisms: pidfds and ``RLIMIT_AS`` (not used in ``SAFECHROMA_PORTABLE`` mode).

A pidfd refers to one process for as long as it is open, so waiting on it and signalling
through it never reaches a process that reused the pid.
"""

from __future__ import annotations

import os
import resource
import select
import signal
import sys

from . import posix
from ._common import ExitSentinel

if sys.platform != "linux":  # the type checker reads no further for other systems
    raise ImportError("safechroma.runtime.platform.linux is for Linux")


class PidfdSentinel(ExitSentinel):
    """Nothing to hand the child: the caller opens a pidfd of it once it is started."""

    def started(self, pid: int) -> int | None:
        try:
            return os.pidfd_open(pid)
        except OSError:  # pragma: no cover - pre-5.3 kernels
            return None


def attach_watch(pid: int, passed: int | None) -> int:
    if passed is not None:
        os.close(passed)  # the worker's sentinel: a pidfd says the same, and signals safely
    return os.pidfd_open(pid)


def kill(pidfd: int) -> None:
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_parent_gone(ppid: int) -> None:
    try:
        pidfd = os.pidfd_open(ppid)
    except ProcessLookupError:
        return
    except OSError:  # pragma: no cover - kernels without pidfd
        posix.wait_parent_gone(ppid)
        return
    select.select([pidfd], [], [])


def limit_address_space(limit: int) -> None:
    # An address-space ceiling turns a runaway allocation (a corrupt header with huge counts
    # makes hnswlib allocate without bound, CHROMA_FACTS.md section 3) into a failed malloc in
    # this process instead of memory pressure on the whole machine.
    posix.set_limit(resource.RLIMIT_AS, limit)
