"""Worker processes: how one is started, one ahead of need, and healthy ones replaced.

- :func:`spawn`: the supervisor's default starter, a worker process from the template, with
  the limits the options set (:func:`file_size_limit`); a test may hand the supervisor
  another starter (an in-process fake worker);
- :class:`Standby`: one spare worker process (``Options.standby``), spawned after the current
  worker has served a call and taken by the next replacement, so a crash costs the caller
  Chroma's open and not Python's import of chromadb. Exclusive directories keep one; shared
  ones only where workers are spawned (macOS, portable mode: Linux forks them from the warm
  template in milliseconds), in the process that started the current worker; such a spare
  is handed the directory lock when promoted (:func:`promote`).
- :func:`worn_out`: gunicorn's ``max_requests`` and a resident-memory ceiling
  (``Options.max_worker_rss``): whether to retire a healthy worker between calls, which no
  caller sees.

Neither emits events nor touches the supervisor's state; the standby keeps its own small lock
and never holds it while a process starts or stops.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from .._policy import Options
from . import platform
from .transport import AttachedWorker, PeerDied, WorkerProcess

if TYPE_CHECKING:
    from .supervisor import Supervisor

__all__ = [
    "Standby",
    "file_size_limit",
    "promote",
    "shared_wants_spare",
    "spawn",
    "spawn_spare",
    "worn_out",
]

# How often a worker's resident memory is read when max_worker_rss is set (seconds).
_RSS_CHECK_EVERY: Final = 1.0


class Standby:
    """At most one spare worker process, not yet opened on the directory."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.process: WorkerProcess | None = None  # the spare, if any (under _lock)
        self.refilling = False  # a spare is being spawned (under _lock; read unlocked)

    def refill(
        self,
        spawn: Callable[[], WorkerProcess],
        ready: Callable[[], bool],
        keep: Callable[[], bool],
    ) -> None:
        """Spawn a spare unless one exists or is being spawned, or ``ready()`` is False (no
        worker serves: the replacement needs the cores); ``keep()``, asked after the spawn,
        False means the supervisor no longer wants it (it was closed meanwhile)."""
        with self._lock:
            if self.refilling or self.process is not None or not ready():
                return
            self.refilling = True
        try:
            spare = spawn()
        finally:
            with self._lock:
                self.refilling = False
        with self._lock:
            kept = self.process is None and keep()
            if kept:
                self.process = spare
        if not kept:
            spare.kill()
            spare.close()

    def take(self) -> WorkerProcess | None:
        """The spare, if it is still alive (a dead one is reaped)."""
        with self._lock:
            spare, self.process = self.process, None
        if spare is not None and not spare.alive():
            spare.wait(None)
            spare.close()
            return None
        return spare

    def discard(self) -> None:
        """Kill the spare, if any (at close)."""
        with self._lock:
            spare, self.process = self.process, None
        if spare is not None:
            spare.kill()
            spare.close()


def spawn_spare(sup: Supervisor, starter: Callable[[Supervisor], WorkerProcess]) -> WorkerProcess:
    """A spare worker. A shared directory's never inherits the lock (a replacement in progress
    may hold it): it is handed the lock when promoted (:func:`promote`)."""
    if sup.shared and starter is spawn:
        return spawn(sup, lock=False)
    return starter(sup)


def shared_wants_spare(options: Options, process: WorkerProcess) -> bool:
    """Whether this process keeps a spare for a shared directory whose worker is ``process``:
    only where workers are spawned (no fork template: macOS, portable mode) and only the
    process that started it (not one attached to another's worker)."""
    return (
        options.standby
        and not isinstance(process, AttachedWorker)
        and not platform.use_fork_template()
    )


def promote(spare: Standby, lock_fd: int, timeout: float) -> WorkerProcess | None:
    """The spare of a shared directory, made its next worker: handed the lock ``lock_fd``
    (held by the process replacing the worker). None: there is no live spare, or it did not
    take the lock within ``timeout`` seconds (it is killed)."""
    process = spare.take()
    if process is None:
        return None
    try:
        process.hand_lock(lock_fd, timeout)
    except PeerDied:
        process.kill()
        process.close()
        return None
    return process


def worn_out(worker: WorkerProcess, options: Options) -> bool:
    """Whether to replace a healthy worker between calls (no caller sees it)."""
    max_requests = options.max_requests
    if max_requests is not None and worker.served >= max_requests:
        return True
    ceiling = options.max_worker_rss
    if ceiling is None:
        return False
    now = time.monotonic()
    if now - worker.rss_checked < _RSS_CHECK_EVERY:
        return False  # reading /proc costs ~20 us: not on every call
    worker.rss_checked = now
    rss = worker.rss_bytes()
    return rss is not None and rss > ceiling


def spawn(sup: Supervisor, lock: bool = True) -> WorkerProcess:
    """The default starter: a worker process from the template, for ``sup``'s directory.

    ``lock``: the worker inherits the directory lock ``sup`` holds. A spare for a shared
    directory does not: it is handed the lock when it is promoted (:func:`promote`).
    """
    options = sup.options
    return WorkerProcess(
        log_dir=sup.log_dir,
        lock_fd=sup.lock_fd if lock else None,
        memory_limit=options.memory_limit,
        max_reply_bytes=options.max_reply_bytes,
        file_limit=file_size_limit(sup.path, options.max_file_bytes),
        journal=options.journal,  # issue 21: the worker keeps the write journal
        share={"address": sup.address, "keep_warm": options.keep_warm} if sup.shared else None,
    )


def file_size_limit(path: str, setting: int | str | None) -> int | None:
    """The largest file the worker may write (``RLIMIT_FSIZE``), from ``Options.max_file_bytes``.

    ``"auto"``: the smaller of two bounds, so that a runaway write (chroma-core/chroma#7510: a
    ``link_lists.bin`` grown to 231 GiB) kills the worker instead of filling the disk, while
    legitimate growth within one worker's life has room. One is what the index geometry can
    explain (:func:`safechroma.storage.limits.plausible_max_file_bytes`: a million more
    records, twice over); the other keeps the disk: the largest file in the directory now plus
    half the free space of its file system (at least 64 MiB more). Each new worker recomputes
    it.
    """
    if setting is None:
        return None
    if isinstance(setting, int):
        return setting
    largest = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                largest = max(largest, os.path.getsize(os.path.join(root, name)))
            except OSError:
                continue
    from ..storage.limits import plausible_max_file_bytes

    try:
        free: int = shutil.disk_usage(path).free  # statvfs's f_bavail, and on Windows too
    except OSError:
        return None
    return min(largest + max(64 << 20, free // 2), plausible_max_file_bytes(path))
