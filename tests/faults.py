"""Real faults, run inside the worker with ``SafeClient.run_in_worker`` or as ``worker_init``.

Each one really happens to the worker process: a genuine SIGBUS from reading a memory mapping
whose file was truncated, a genuine SIGSEGV from dereferencing NULL, a real abort, a real kill.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import signal
import tempfile
import time
from typing import Any


def sigbus(*_: Any) -> None:
    """Map a file, truncate it, read the mapping: the kernel sends SIGBUS."""
    fd, path = tempfile.mkstemp()
    os.write(fd, b"x" * mmap.PAGESIZE * 4)
    mapped = mmap.mmap(fd, mmap.PAGESIZE * 4)
    os.ftruncate(fd, 0)
    os.unlink(path)
    mapped[mmap.PAGESIZE * 2]  # the page is gone: SIGBUS


def sigsegv(*_: Any) -> None:
    """Dereference NULL."""
    ctypes.string_at(0)


def sigabrt(*_: Any) -> None:
    os.abort()


def sigkill(*_: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def exit3(*_: Any) -> None:
    os._exit(3)


def hang(*_: Any) -> None:
    time.sleep(3600)


FAULTS = {
    "SIGBUS": sigbus,
    "SIGSEGV": sigsegv,
    "SIGABRT": sigabrt,
    "SIGKILL": sigkill,
    "exit": exit3,
    "hang": hang,  # the table's sixth way (tests/crash_matrix.py): a call's deadline ends it
}


class CrashWhenPickled:
    """A result whose pickling (while the worker encodes its reply) runs a fault."""

    def __init__(self, fault: str) -> None:
        self.fault = fault

    def __reduce__(self) -> Any:
        FAULTS[self.fault]()
        raise AssertionError("unreachable")


def crash_in_reply(_client: Any, fault: str) -> CrashWhenPickled:
    return CrashWhenPickled(fault)


def fault_once(marker: str, fault: str) -> None:
    """Run ``fault`` if ``marker`` exists, removing it first: only the first worker dies."""
    try:
        os.unlink(marker)
    except FileNotFoundError:
        return
    FAULTS[fault]()
