"""The worker process, and the channels between it and the caller.

Only this module (with :mod:`.template`, which forks workers) knows about processes and sockets.
A :class:`WorkerProcess` is forked from the process-wide warm template (a fresh interpreter that
imported chromadb and started no thread), or started with ``subprocess`` when there is none.
Never a fork of the caller itself: forking after Chroma's Rust runtime has started is unsafe
(CHROMA_FACTS.md section 4), and the user's ``__main__`` is never re-imported, so scripts need no
``if __name__ == "__main__"`` guard.

A worker has one control socket and any number of :class:`Channel` s. Each channel carries one
exchange at a time and is served by a thread of its own in the worker, so calls on different
channels run in parallel (Chroma's Rust core releases the GIL) and a reply can only reach the
caller that sent the request.

Death is detected without ever blocking on a dead peer: a caller polls its channel's socket and
the worker's exit watch together (a pidfd on Linux, a sentinel pipe in portable mode and on
macOS: :mod:`.platform`; either becomes readable the moment the process exits), so a crash is
seen within a poll wake-up by every caller in flight, whatever state the socket is in. Where
there is no fork template (portable mode, macOS), workers are spawned.

Frames are :mod:`.framing`'s, the process handles :mod:`.process`'s; their names used by the
supervisor are re-exported here.
"""

from __future__ import annotations

import itertools
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Final

from .._env import private_env
from . import platform
from .framing import FrameReader, PeerDied, PeerMisbehaved, PeerTimedOut, send_frame
from .process import Attached, Spawned, WorkerProc

__all__ = [
    "THREAD_VARS",
    "AttachedWorker",
    "Channel",
    "FrameReader",
    "PeerDied",
    "PeerMisbehaved",
    "PeerTimedOut",
    "WorkerProcess",
    "send_frame",
]

# Thread-count variables of BLAS and OpenMP runtimes (numpy, torch, onnxruntime's OpenMP).
THREAD_VARS: Final = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
_SOCKET_BUFFER: Final = 4 << 20

# The worker's bootstrap: put the caller's import path first (so that embedding functions
# pickled by reference, e.g. from a test module, resolve), then run the worker loop.
_BOOT: Final = (
    "import sys, json; info = json.loads(sys.argv[1]); "
    "sys.path[:0] = info['sys_path']; "
    "from safechroma.runtime.worker import main; main(info)"
)

_serial = itertools.count(1)


class Channel:
    """One socket to the worker, carrying one exchange at a time (a request, then its reply).

    A worker serves each channel in a thread of its own, so calls on different channels run in
    the worker at the same time, and a reply can only ever reach the caller that sent the request
    on that channel: there are no request ids to mix up. A channel that saw anything but a clean
    exchange (death, deadline, a bad frame) is discarded, never reused.
    """

    def __init__(self, sock: socket.socket, watch: int | None, max_reply_bytes: int) -> None:
        # Non-blocking: every wait is one poll() on the socket and the worker's exit watch,
        # bounded by the call's deadline (a socket timeout would cost an extra poll and two
        # ioctls per exchange inside CPython, and could not watch the process).
        sock.setblocking(False)
        self.sock = sock
        self._sock_fd = sock.fileno()
        self._watch = watch
        self._poll = _poller(self._sock_fd, watch)
        self._deadline: float | None = None
        self.reader = FrameReader(sock, max_reply_bytes, self._wait_readable)
        self.closed = False

    def exchange(
        self, data: bytes, buffers: list[memoryview], deadline: float | None
    ) -> tuple[Any, list[Any]]:
        """Send a request and wait for its reply frame.

        Raises:
            PeerDied: the worker exited or closed the socket.
            PeerTimedOut: ``deadline`` (a ``time.monotonic`` value) passed.
            PeerMisbehaved: the reply is not a valid frame.
        """
        self._deadline = deadline
        try:
            send_frame(self.sock, data, buffers, self._wait_writable)
            self._wait_readable()  # a reply is never there yet: sleep before the first read
            frame = self.reader.read_frame()
        except OSError as exc:
            raise PeerDied(str(exc)) from exc
        if self.reader.buffered:
            raise PeerMisbehaved("the worker sent bytes after its reply")
        return frame

    def _wait_readable(self) -> None:
        self._wait(self._poll)

    def _wait_writable(self) -> None:
        if sys.platform == "win32":  # no Unix sockets: SafeClient refuses to start there
            raise platform.unsupported()
        # Rare: only a request bigger than the socket buffer waits for the worker to read.
        poller = select.poll()
        poller.register(self._sock_fd, select.POLLOUT)
        if self._watch is not None:
            poller.register(self._watch, select.POLLIN)
        self._wait(poller)

    def _wait(self, poller: Any) -> None:
        deadline = self._deadline
        while True:
            if deadline is None:
                events = poller.poll()
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise PeerTimedOut
                events = poller.poll(int(remaining * 1000) + 1)
            if not events:
                continue  # the deadline is checked above
            # Data first: a reply that arrived before the exit is still a reply.
            for fd, _ in events:
                if fd == self._sock_fd:
                    return
            raise PeerDied("process exited")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()


class WorkerProcess:
    """One worker: a process running :func:`safechroma.runtime.worker.serve_channels`.

    It is either forked from the process-wide warm template (chromadb already imported: a new
    worker in milliseconds) or, when there is no template, started as a fresh interpreter.
    Each worker has a control socket, over which the caller hands it new channels (the
    channel's socket travels as ``SCM_RIGHTS``), and one channel opened with it.

    Args:
        log_dir: folder for the worker's log (its stderr, stdout and faulthandler output).
        lock_fd: the open, locked directory lock file; the worker inherits it so the lock is
            held as long as any of our processes lives.
        memory_limit: address-space ceiling in bytes for the worker, or None.
        max_reply_bytes: largest reply frame the caller accepts.
        file_limit: largest file the worker may write (``RLIMIT_FSIZE``), or None.
        use_template: fork from the warm template when it is available.
    """

    def __init__(
        self,
        *,
        log_dir: str,
        lock_fd: int | None,
        memory_limit: int | None,
        max_reply_bytes: int,
        file_limit: int | None = None,
        use_template: bool = True,
        share: dict[str, Any] | None = None,
        journal: bool = True,  # Options.journal (issue 21), read by the worker's open
    ) -> None:
        platform.check_worker_transport()
        self.serial = next(_serial)
        self.log_path = os.path.join(log_dir, f"worker-{os.getpid()}-{self.serial}.log")
        if share is not None:
            share = {**share, "log": self.log_path}
        self.share = share
        self.max_reply_bytes = max_reply_bytes
        parent_ctl, child_ctl = platform.socketpair()
        parent_sock, child_sock = _socketpair()
        info = {
            "ctl": child_ctl.fileno(),
            "fd": child_sock.fileno(),
            "sys_path": [p for p in sys.path if p],
            "log": self.log_path,
            "ppid": os.getpid(),
            # The caller's thread settings: the template runs single-threaded (its workers'
            # own work is Chroma's), but an embedding function must run as in the caller.
            "threads": {var: os.environ.get(var) for var in THREAD_VARS},
            "memory_limit": memory_limit,
            "file_limit": file_limit,
            "share": share,
            "lock_fd": lock_fd,
            "journal": journal,  # Options.journal (issue 21)
        }
        fds = [child_ctl.fileno(), child_sock.fileno()] + ([lock_fd] if lock_fd is not None else [])
        self.forked = False
        try:
            proc: WorkerProc | None = None
            if use_template and platform.use_fork_template():
                from . import template

                proc = template.fork_worker(info, fds)
                self.forked = proc is not None
            if proc is None:
                proc = self._spawn(info, fds)
        finally:
            child_ctl.close()
            child_sock.close()
        self.proc = proc
        self.pid = proc.pid
        self.started = time.monotonic()
        self.ctl = parent_ctl
        self._ctl_lock = threading.Lock()
        self.first_channel: Channel | None = Channel(parent_sock, proc.watch, max_reply_bytes)
        self.closed = False
        self.opened = False  # it answered the open of the directory
        self.served = 0  # calls answered (results or Chroma errors): the breaker's "progress"
        self.rss_checked = self.started  # when max_worker_rss last read the worker's RSS

    def _spawn(self, info: dict[str, Any], fds: list[int]) -> WorkerProc:
        sentinel = platform.new_exit_sentinel()
        if sentinel.child_fd is not None:
            info = {**info, "sentinel": sentinel.child_fd}
            fds = [*fds, sentinel.child_fd]
        try:
            # Appending: the worker caps its log by cutting it to its tail (worker._cap_log).
            with open(self.log_path, "ab") as log:
                popen = subprocess.Popen(
                    [sys.executable, "-c", _BOOT, json.dumps(info)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    pass_fds=fds,
                    close_fds=True,
                    env=private_env(),
                    start_new_session=self.share is not None,  # as the template (template.py)
                )
        except BaseException:
            sentinel.abandon()
            raise
        status = None
        if self.share is not None:  # what the template does for the shared workers it forks
            from .rendezvous import marker_paths

            status = marker_paths(self.share["address"], popen.pid)["status"]
        return Spawned(popen, sentinel.started(popen.pid), status)

    # -- channels --------------------------------------------------------------------------

    def open_channel(self) -> Channel:
        """A new channel to this worker, served by a new thread in it.

        Raises:
            PeerDied: the worker is gone (its control socket is closed).
        """
        if sys.platform == "win32":  # no Unix sockets: SafeClient refuses to start there
            raise platform.unsupported()
        first, self.first_channel = self.first_channel, None
        if first is not None:
            return first
        mine, theirs = _socketpair()
        try:
            with self._ctl_lock:
                socket.send_fds(self.ctl, [b"c"], [theirs.fileno()])
        except OSError as exc:
            mine.close()
            raise PeerDied(str(exc)) from exc
        finally:
            theirs.close()
        return Channel(mine, self.proc.watch, self.max_reply_bytes)

    def hand_lock(self, fd: int, timeout: float) -> None:
        """Give a standby started for a shared directory the directory lock it now holds.

        It answers once it has the lock (after its import of chromadb, if that is still under
        way), before anything is asked of it: only then may it open the directory.

        Raises:
            PeerDied: it is gone, or did not answer within ``timeout`` seconds.
        """
        if sys.platform == "win32":  # no Unix sockets: SafeClient refuses to start there
            raise platform.unsupported()
        try:
            with self._ctl_lock:
                self.ctl.settimeout(timeout)
                socket.send_fds(self.ctl, [b"L"], [fd])
                answer = self.ctl.recv(1)
        except OSError as exc:
            raise PeerDied(str(exc)) from exc
        if answer != b"k":
            raise PeerDied("the standby did not take the lock")

    def leave(self, linger: bool = False) -> bool:
        """Say goodbye to a shared worker; True when it exits because we were its last user
        (the caller then waits for its exit before touching the directory).

        ``linger``: this process is ending without having closed its clients; a worker left
        with no process stays warm for ``keep_warm`` seconds instead of exiting at once.
        """
        try:
            with self._ctl_lock:
                self.ctl.settimeout(5.0)
                self.ctl.sendall(b"w" if linger else b"b")
                answer = self.ctl.recv(1)
        except OSError:
            return not self.alive()
        return answer != b"s"

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the worker and reap it (no-op if already gone)."""
        self.proc.kill()
        self.wait(None)

    def wait(self, timeout: float | None) -> int | None:
        """Reap the worker; returns its exit status, or None if still running after timeout."""
        return self.proc.wait(timeout)

    def close(self) -> None:
        """Release the caller's ends: control socket, first channel, exit watch. Reap first."""
        if self.closed:
            return
        self.closed = True
        if self.first_channel is not None:
            self.first_channel.close()
            self.first_channel = None
        self.ctl.close()
        if self.proc.watch is not None:
            platform.close_watch(self.proc.watch)
            self.proc.watch = None

    def log_tail(self, limit: int = 4000) -> str:
        """The last ``limit`` characters of the worker's log (faulthandler output, stderr)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - limit))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def rss_bytes(self) -> int | None:
        """Resident memory of the worker (Linux's /proc); None where the system cannot say."""
        return platform.rss_of(self.pid)


class AttachedWorker(WorkerProcess):
    """A worker that another process of this user started and shares (see :mod:`.rendezvous`).

    The same interface as :class:`WorkerProcess`: channels are connections to its rendezvous
    socket; this process's *session* connection is its membership, and closing it politely
    (:meth:`leave`) lets the worker exit when no process uses it any more.
    """

    def __init__(self, address: str, path: str, lock_path: str, max_reply_bytes: int) -> None:
        from .rendezvous import connect, marker_paths

        self.serial = next(_serial)
        self.address = address
        self.dir_path = path
        self.lock_path = lock_path
        self.max_reply_bytes = max_reply_bytes
        session, hello = connect(address, path, "session", lock_path)
        pid = int(hello["pid"])
        self.share = {"address": address, "markers": marker_paths(address, pid)}
        try:
            watch = platform.attach_watch(pid, hello.get("sentinel"))
        except OSError:
            session.close()
            raise ConnectionError(f"worker {pid} is gone") from None
        self.proc = Attached(pid, self.share["markers"]["status"], watch)
        self.pid = pid
        self.log_path = str(hello.get("log", ""))
        self.started = time.monotonic()
        self.ctl = session
        self._ctl_lock = threading.Lock()
        self.first_channel = None
        self.closed = False
        self.opened = True
        self.served = 0
        self.rss_checked = self.started
        self.forked = False

    def open_channel(self) -> Channel:
        from .rendezvous import connect

        try:
            sock, _hello = connect(self.address, self.dir_path, "channel", self.lock_path)
        except ConnectionError as exc:
            raise PeerDied(str(exc)) from exc
        return Channel(sock, self.proc.watch, self.max_reply_bytes)

    def alive(self) -> bool:
        return self.proc.poll() is None and not getattr(self.proc, "gone", False)


def _poller(sock_fd: int, watch: int | None) -> Any:
    """A poll object watching a channel's socket for data and the worker's exit."""
    if sys.platform == "win32":  # no Unix sockets: SafeClient refuses to start there
        raise platform.unsupported()
    poller = select.poll()
    poller.register(sock_fd, select.POLLIN)
    if watch is not None:
        poller.register(watch, select.POLLIN)
    return poller


def _socketpair() -> tuple[socket.socket, socket.socket]:
    a, b = platform.socketpair()
    for sock in (a, b):
        # A Unix stream socket moves at most its send buffer per wake-up of the reader;
        # the default (~208 KiB) costs a context switch every 208 KiB of a bulk transfer.
        # The kernel caps the value at net.core.wmem_max.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
    return a, b
