"""The directory lock: one owner per persist directory, across processes.

Owns ``<path>/.safechroma.lock`` and nothing else. The supervisor holds the lock for as long as
it lives and passes the locked descriptor to each worker, so the directory never has two owners,
not even while a worker is being replaced or after the parent died with a call in flight (the
worker keeps the inherited ``flock`` until it exits). How the lock is taken is the platform
seam's (:func:`.platform.try_lock`: ``flock`` on POSIX; on Windows ``msvcrt.locking``, which a
child does not inherit, so there the worker takes it itself).
"""

from __future__ import annotations

import os
import time
from typing import Final

from .._errors import DirectoryLockedError
from . import platform

LOCK_NAME: Final = ".safechroma.lock"


class DirectoryLock:
    """An exclusive ``flock`` on ``<path>/.safechroma.lock``, taken on construction.

    Args:
        path: the persist directory (created if missing).
        timeout: seconds to wait for another process to let go (0: fail at once).

    Raises:
        DirectoryLockedError: another process holds the lock after ``timeout``.
    """

    def __init__(self, path: str, timeout: float) -> None:
        platform.check_worker_transport()  # Windows: the one clear error, before any file
        os.makedirs(path, exist_ok=True)
        self.path = path
        self.lock_path = os.path.join(path, LOCK_NAME)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        give_up = time.monotonic() + timeout
        asked = False
        while True:
            try:
                if platform.try_lock(fd):
                    break
            except OSError:
                os.close(fd)
                raise
            if not asked:
                # A shared worker kept warm with no process using it leaves at once.
                asked = True
                from .rendezvous import ask_idle_worker_to_leave

                if ask_idle_worker_to_leave(path, self.lock_path):
                    continue
            if time.monotonic() >= give_up:
                os.close(fd)
                raise locked_error(path, self.lock_path)
            time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd: int | None = fd

    def release(self) -> None:
        """Close the descriptor (workers that inherited it keep the lock until they exit)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def locked_error(path: str, lock_path: str) -> DirectoryLockedError:
    """The error for a directory another process holds and does not share."""
    served = _served_at(lock_path)
    if served is not None:
        pid, address = served
        return DirectoryLockedError(
            f"{path} is served by `safechroma serve` at {address} "
            f"(pid {pid}); connect to it with "
            "safechroma.SafeHttpClient(host, port) instead of opening the "
            "directory (Chroma is not safe with two owners).",
            path=path,
            lock_path=lock_path,
            address=address,
        )
    holder = _holder(lock_path)
    what = {
        "repair": "`safechroma repair`",
        "release": "`safechroma release`",
    }.get(holder[1] if len(holder) > 1 else "", "an exclusive client or a repair")
    pid = f", pid {holder[0]}" if holder and holder[0].isdigit() else ""
    return DirectoryLockedError(
        f"{path} is in use by another process ({what}{pid}; it holds {lock_path}) that does "
        "not share it; Chroma is not safe with two owners. Wait for it to finish, or pass "
        "lock_timeout=<seconds> to wait for it.",
        path=path,
        lock_path=lock_path,
    )


def _holder(lock_path: str) -> list[str]:
    try:
        with open(lock_path) as f:
            return [ln for ln in f.read().split("\n") if ln]
    except OSError:
        return []


def being_shared(lock_path: str) -> bool:
    """Whether the lock's holder is a shared worker, or a process replacing one (or a holder
    that has not yet written who it is: worth waiting for)."""
    try:
        with open(lock_path) as f:
            lines = f.read().split("\n")
    except OSError:
        return False
    if not any(lines):
        return True  # its holder has only just taken it and not yet said who it is
    return any(ln.startswith("share ") or ln == "cycle" for ln in lines)


def _served_at(lock_path: str) -> tuple[str, str] | None:
    """(pid, address) when ``safechroma serve`` holds the lock: it writes "<pid>\nserve <url>"."""
    try:
        with open(lock_path) as f:
            holder = f.read().split("\n")
    except OSError:
        return None
    served = [ln[6:] for ln in holder if ln.startswith("serve ")]
    return (holder[0], served[0]) if served else None
