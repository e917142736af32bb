"""The Windows mechanisms (type-checked with ``mypy --platform win32``; not run here).

Windows has no worker transport in safechroma yet (no Unix sockets handing descriptors over:
:func:`safechroma.runtime.platform.check_worker_transport` says so at ``SafeClient(...)``).
What is here is what the runtime needs from the system once it does: the directory lock
(``msvcrt.locking``: Windows does not hand locks to children, so the worker takes it itself),
process handles to wait on and to end, and the resident memory for the RSS watchdog. Crash
names (NTSTATUS exit codes) are :func:`safechroma._errors.signal_name`'s.
"""

from __future__ import annotations

import os
import signal
import sys

if sys.platform == "win32":
    import _winapi
    import ctypes
    import msvcrt
    from ctypes import wintypes

    from ._common import ExitSentinel
    from ._common import start_rss_watchdog as _start_watchdog

    _SYNCHRONIZE = 0x00100000
    _PROCESS_TERMINATE = 0x0001

    class HandleSentinel(ExitSentinel):
        """Nothing to hand the child: the caller opens a handle of the started process, which
        is signalled when it exits (what ``multiprocessing``'s sentinel is on Windows)."""

        def started(self, pid: int) -> int | None:
            return open_handle(pid)

    def open_handle(pid: int) -> int:
        """A handle of process ``pid`` to wait on and to end (OSError when it is gone)."""
        return int(_winapi.OpenProcess(_SYNCHRONIZE | _PROCESS_TERMINATE, False, pid))

    def close(handle: int) -> None:
        _winapi.CloseHandle(handle)

    def exited(handle: int, timeout: float | None) -> bool:
        ms = _winapi.INFINITE if timeout is None else int(timeout * 1000)
        return _winapi.WaitForSingleObject(handle, ms) == _winapi.WAIT_OBJECT_0

    def kill(pid: int, handle: int | None) -> None:
        try:
            if handle is not None:  # the handle, not the pid: never another process
                _winapi.TerminateProcess(handle, 1)
            else:
                os.kill(pid, signal.SIGTERM)  # TerminateProcess on Windows
        except OSError:
            pass

    def wait_parent_gone(ppid: int) -> None:
        try:
            handle = _winapi.OpenProcess(_SYNCHRONIZE, False, ppid)
        except OSError:
            return  # gone already
        try:
            _winapi.WaitForSingleObject(handle, _winapi.INFINITE)
        finally:
            _winapi.CloseHandle(handle)

    def try_lock(fd: int) -> bool:
        os.lseek(fd, 0, os.SEEK_SET)  # msvcrt.locking locks bytes from the file position
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    class _Counters(ctypes.Structure):
        _fields_ = [
            ("cb", wintypes.DWORD),
            ("PageFaultCount", wintypes.DWORD),
            ("PeakWorkingSetSize", ctypes.c_size_t),
            ("WorkingSetSize", ctypes.c_size_t),
            ("QuotaPeakPagedPoolUsage", ctypes.c_size_t),
            ("QuotaPagedPoolUsage", ctypes.c_size_t),
            ("QuotaPeakNonPagedPoolUsage", ctypes.c_size_t),
            ("QuotaNonPagedPoolUsage", ctypes.c_size_t),
            ("PagefileUsage", ctypes.c_size_t),
            ("PeakPagefileUsage", ctypes.c_size_t),
        ]

    def self_rss() -> int | None:
        """This process's working set (GetProcessMemoryInfo)."""
        counters = _Counters()
        counters.cb = ctypes.sizeof(counters)
        try:
            psapi = ctypes.WinDLL("psapi")
            process = ctypes.windll.kernel32.GetCurrentProcess()
            ok = psapi.GetProcessMemoryInfo(process, ctypes.byref(counters), counters.cb)
        except OSError:
            return None
        return int(counters.WorkingSetSize) if ok else None

    def start_rss_watchdog(limit: int) -> None:
        _start_watchdog(limit, self_rss, lambda: os._exit(1))
