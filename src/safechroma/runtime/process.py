"""What the caller knows of a worker process, however it was started.

What it owns: :class:`WorkerProc`, the one interface (pid, exit watch, poll, wait, kill) over
the three ways a worker comes to be: spawned by this process (:class:`Spawned`), forked by the
warm template (``template.Forked``), or started by another process and attached to
(:class:`Attached`). The exit watch is a descriptor that turns readable once the process has
exited (a pidfd on Linux, a sentinel pipe elsewhere: :mod:`.platform`), so a channel can wait
on its socket and on the process together.
"""

from __future__ import annotations

import os
import subprocess
import threading

from . import platform


class WorkerProc:
    """A worker process as its caller sees it.

    Attributes:
        pid: its process id.
        watch: a descriptor readable once it has exited (None: not watchable, or closed).
    """

    pid: int
    watch: int | None

    @property
    def returncode(self) -> int | None:
        raise NotImplementedError

    def poll(self) -> int | None:
        raise NotImplementedError

    def wait(self, timeout: float | None) -> int | None:
        raise NotImplementedError

    def kill(self) -> None:
        raise NotImplementedError


class Spawned(WorkerProc):
    """A worker this process started with ``subprocess``: reaped here.

    Args:
        popen: the started process.
        watch: its exit watch (:meth:`platform.ExitSentinel.started`).
        status_path: for a shared worker, where its exit status is recorded for the processes
            attached to it (the template does this for the workers it forks); a thread reaps it
            as soon as it exits, so the status is there when they look.
    """

    def __init__(
        self, popen: subprocess.Popen[bytes], watch: int | None, status_path: str | None = None
    ) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.watch = watch
        if status_path is not None:
            threading.Thread(
                target=self._record, args=(status_path,), name="safechroma-reap", daemon=True
            ).start()

    def _record(self, status_path: str) -> None:
        record_status(status_path, self.popen.wait())

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float | None) -> int | None:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.popen.returncode is None:
            try:
                self.popen.kill()  # not reaped yet: the pid is still this worker's
            except ProcessLookupError:  # pragma: no cover - raced with exit
                pass


class Attached(WorkerProc):
    """A worker another process started: watched through ``watch`` (a pidfd, or the
    worker's sentinel it handed over); its exit status is what its parent recorded, when it
    did (:func:`.rendezvous.marker_paths`)."""

    def __init__(self, pid: int, status_path: str, watch: int | None) -> None:
        self.pid = pid
        self.watch = watch
        self.status_path = status_path
        self._code: int | None = None
        self.gone = False
        self._reaping = threading.Lock()  # several threads may notice the exit at once

    @property
    def returncode(self) -> int | None:
        return self._code

    def poll(self) -> int | None:
        self.wait(0)
        return self._code

    def wait(self, timeout: float | None) -> int | None:
        if not self.gone:
            if self.watch is not None and not platform.exited(self.watch, timeout):
                return None
            with self._reaping:
                if not self.gone:  # read the status before saying it is gone
                    from .rendezvous import wait_marker

                    text = wait_marker(self.status_path, 0.5)
                    self._code = int(text) if text and text.lstrip("-").isdigit() else None
                    self.gone = True
        return self._code

    def kill(self) -> None:
        if self.gone or self.watch is None:
            return
        platform.kill(self.pid, self.watch)


def record_status(target: str, code: int) -> None:
    """Write a shared worker's exit status where attached processes read it (atomically: they
    may look at any moment). Done by its parent: the template, or the process that spawned it."""
    tmp = f"{target}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(str(code))
        os.replace(tmp, target)
    except OSError:
        pass
