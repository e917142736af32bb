"""The warm worker template: new workers in milliseconds instead of an interpreter start.

Linux only, and not in ``SAFECHROMA_PORTABLE`` mode (:func:`.platform.use_fork_template`):
elsewhere workers are spawned (macOS's system frameworks do not survive a fork of a process
that imported numpy reliably, the reason CPython made ``spawn`` the default there).

What it owns: one process per caller process (the *template*), a fresh interpreter started with
``subprocess`` that imports chromadb and the worker code and then only forks. Each new worker is
a fork of it: chromadb is already imported, so a worker answers its first call after opening the
directory (tens of milliseconds) instead of after an interpreter start and ``import chromadb``
(~0.7-0.9 s, CHROMA_FACTS.md section 5). The first client of a process pays that start once.

Why a fork is safe here: the template never opens a directory, never creates a client and never
starts a thread, so no Rust runtime, no SQLite handle and no lock exists when it forks.
Measured: ``import chromadb`` starts no thread of its own; numpy's OpenBLAS starts a pool, so the
template runs with ``OPENBLAS_NUM_THREADS=1`` (and the OpenMP and MKL equivalents), which its
workers inherit: a worker's work is Chroma's Rust core, not BLAS. Before every fork the template
checks that it has exactly one thread (``/proc/self/task``); if not, it refuses and the caller
starts the worker with ``subprocess`` as before.

The protocol over its socket pair, fixed 12-byte messages ``<4sii``:

- caller -> template: ``FORK`` with the worker's start-up facts (JSON, length in the second
  field) and its descriptors (control socket, first channel, directory lock) as ``SCM_RIGHTS``;
- template -> caller: ``FORK pid`` with a pidfd of the new worker, or ``FAIL``; and ``EXIT pid
  status`` when a worker it forked has exited (the template is their parent and reaps them, so
  it reports the status the caller needs to name the signal).

The caller sees a forked worker as a :class:`Forked` process: a pidfd to wait on and to signal
(no pid reuse race), and the exit status from the template. When the caller exits, the
template's socket closes; its private workers exit on their own when the caller is gone, and the
template exits once its last shared worker (:mod:`.rendezvous`), which serves on for other
processes, has exited and its status is recorded where those processes read it.

Memory: the template holds ~85 MB resident (chromadb imported); forked workers share those
pages copy-on-write until they write them.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any, Final

from .._env import mark_own_process, private_env
from . import platform
from .process import WorkerProc, record_status

MESSAGE: Final = struct.Struct("<4sii")
_ENV: Final = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
_START_TIMEOUT: Final = 120.0

_BOOT: Final = (
    "import sys; sys.path[:0] = __import__('json').loads(sys.argv[1]); "
    "from safechroma.runtime.template import serve; serve(int(sys.argv[2]))"
)


class _TemplateGone(Exception):
    pass


class Template:
    """The caller's handle on the template process."""

    def __init__(self) -> None:
        self.owner = os.getpid()
        mine, theirs = platform.socketpair()
        env = {**private_env(), **_ENV}
        path = json.dumps([p for p in sys.path if p])
        self.popen = subprocess.Popen(
            [sys.executable, "-c", _BOOT, path, str(theirs.fileno())],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=[theirs.fileno()],
            close_fds=True,
            env=env,
            # Its own session: a shared worker forked from it outlives this process (kept
            # warm for the next command, serving other processes), so a signal to this
            # program's process group (a terminal's hang-up, a CI step's or a timer's kill)
            # must not take it. Each worker still follows its own rules for when to exit.
            start_new_session=True,
        )
        theirs.close()
        self.sock = mine
        self._lock = threading.Lock()  # one reader and one writer of the socket at a time
        self.statuses: dict[int, int] = {}
        self.broken = False

    def fork(self, info: dict[str, Any], fds: list[int]) -> Forked | None:
        """A new worker forked from the template, or None if the template cannot fork one."""
        if sys.platform != "linux":  # the template forks with pidfds
            raise RuntimeError("the warm worker template is Linux-only")
        data = json.dumps(info).encode()
        with self._lock:
            if self.broken:
                return None
            try:
                socket.send_fds(self.sock, [MESSAGE.pack(b"FORK", len(data), len(fds)) + data], fds)
                while True:
                    kind, pid, code, got = self._read(_START_TIMEOUT)
                    if kind == b"EXIT":
                        self.statuses[pid] = code
                        continue
                    if kind == b"FORK" and got:
                        return Forked(self, pid, got[0])
                    for fd in got:
                        os.close(fd)
                    self.broken = True  # it refused (a thread appeared): stop using it
                    return None
            except (OSError, _TemplateGone):
                self.broken = True
                return None

    def status(self, pid: int, timeout: float) -> int | None:
        """The exit status of worker ``pid`` (which has exited), as the template reports it."""
        give_up = time.monotonic() + timeout
        while True:
            with self._lock:
                if pid in self.statuses:
                    return self.statuses.pop(pid)
                if self.broken:
                    return None
                try:
                    kind, other, code, got = self._read(max(0.001, give_up - time.monotonic()))
                except TimeoutError:  # an OSError too: no answer yet is not a broken template
                    return None
                except (OSError, _TemplateGone):
                    self.broken = True
                    return None
                for fd in got:
                    os.close(fd)
                if kind == b"EXIT":
                    self.statuses[other] = code

    def _read(self, timeout: float) -> tuple[bytes, int, int, list[int]]:
        if sys.platform != "linux":  # the template forks with pidfds
            raise RuntimeError("the warm worker template is Linux-only")
        self.sock.settimeout(timeout)
        buf = b""
        fds: list[int] = []
        while len(buf) < MESSAGE.size:
            msg, got, _flags, _addr = socket.recv_fds(self.sock, MESSAGE.size - len(buf), 4)
            fds.extend(got)
            if not msg:
                for fd in fds:
                    os.close(fd)
                raise _TemplateGone
            buf += msg
        kind, a, b = MESSAGE.unpack(buf)
        return kind, a, b, fds

    def close(self) -> None:
        self.sock.close()
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()

    def leave(self, grace: float) -> None:
        """At exit: hang up and give the template ``grace`` seconds to exit. It exits at once
        unless a worker it forked still serves other processes; then it stays until that
        worker exits, to record its status (it is left running, not killed)."""
        self.sock.close()
        try:
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            pass


class Forked(WorkerProc):
    """A worker forked by the template: waited on and signalled through its pidfd."""

    def __init__(self, template: Template, pid: int, pidfd: int) -> None:
        self.template = template
        self.pid = pid
        self.watch = pidfd
        self._code: int | None = None
        self._gone = False
        # Several threads notice the same exit (a channel's poll, ``alive()``, the crash path):
        # one asks the template, the others wait for its answer instead of asking again.
        self._reaping = threading.Lock()

    @property
    def returncode(self) -> int | None:
        return self._code

    def _exited(self, timeout: float | None) -> bool:
        if self._gone:
            return True
        return platform.exited(self.watch, timeout)  # no watch: closed after it was reaped

    def poll(self) -> int | None:
        if not self._gone and self._exited(0):
            self._reap()
        return self._code if self._gone else None

    def wait(self, timeout: float | None) -> int | None:
        if not self._gone:
            if not self._exited(timeout):
                return None
            self._reap()
        return self._code

    def _reap(self) -> None:
        # The template reaps it at once and reports the status, once: asking twice would make
        # the second asker wait for an answer that never comes and overwrite the status with
        # None. If the template is gone, the status is lost (None) but the process is gone.
        with self._reaping:
            if not self._gone:
                self._code = self.template.status(self.pid, 5.0)
                self._gone = True

    def kill(self) -> None:
        if self._gone or self.watch is None:
            return
        platform.kill(self.pid, self.watch)


_template: Template | None = None
_template_lock = threading.Lock()


@atexit.register
def _leave_at_exit() -> None:
    """Hang up on this process's template at interpreter exit. Registered when this module is
    imported, which the supervisor does before it registers its own hook that closes every
    client: hooks run last-registered first, so the clients are closed by then."""
    template = _template
    if template is not None and template.owner == os.getpid():
        template.leave(0.5)


def fork_worker(info: dict[str, Any], fds: list[int]) -> Forked | None:
    """Fork a worker from this process's template (started on first use), or None."""
    template = warm()
    if template is None:
        return None
    return template.fork({**info, "forked": True}, fds)


def warm() -> Template | None:
    """Start this process's template now if it is not running (the one-time set-up)."""
    global _template
    with _template_lock:
        template = _template
        if template is not None and template.owner == os.getpid() and not template.broken:
            return template
        if not platform.use_fork_template():
            return None
        try:
            _template = Template()
        except OSError:
            return None
        return _template


# -- inside the template process ------------------------------------------------------------


def serve(fd: int) -> None:
    """The template's loop: fork a worker per request, report each worker's exit."""
    if sys.platform != "linux":
        raise RuntimeError("the warm template forks with pidfds: Linux only")
    mark_own_process()  # never patched by the launcher's start-up hook
    # Ctrl-C in a terminal reaches the whole process group; the caller decides what to do.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    # Everything a worker needs before its first call, imported once here.
    import chromadb  # noqa: F401
    from chromadb.api.models.Collection import Collection  # noqa: F401
    from chromadb.api.rust import RustBindingsAPI  # noqa: F401

    from . import framing, guard, protocol, worker  # noqa: F401

    children: dict[int, int] = {}  # pidfd -> pid
    status_files: dict[int, str] = {}  # pid -> where a shared worker's exit status goes
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    caller = True
    while caller or children:
        for fd_ready, _ in poller.poll():
            if fd_ready == sock.fileno():
                if not _serve_one(sock, children, poller, status_files):
                    # The caller is gone. Its private workers exit on their own; a shared
                    # worker serves other processes on, and its exit status is still recorded.
                    caller = False
                    poller.unregister(fd_ready)
            else:
                pid = children.pop(fd_ready)
                poller.unregister(fd_ready)
                os.close(fd_ready)
                _, status = os.waitpid(pid, 0)
                code = os.waitstatus_to_exitcode(status)
                target = status_files.pop(pid, None)
                if target is not None:
                    record_status(target, code)
                if caller:
                    try:
                        sock.sendall(MESSAGE.pack(b"EXIT", pid, code))
                    except OSError:
                        caller = False
    os._exit(0)


def _serve_one(
    sock: socket.socket, children: dict[int, int], poller: Any, status_files: dict[int, str]
) -> bool:
    if sys.platform != "linux":  # the template forks with pidfds
        raise RuntimeError("the warm worker template is Linux-only")
    head, fds, _flags, _addr = socket.recv_fds(sock, MESSAGE.size, 16)
    while head and len(head) < MESSAGE.size:
        more, extra, _f, _a = socket.recv_fds(sock, MESSAGE.size - len(head), 16)
        if not more:
            break
        head += more
        fds.extend(extra)
    if len(head) < MESSAGE.size:
        return False
    _kind, size, _count = MESSAGE.unpack(head)
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return False
        data += chunk
    info = json.loads(data)
    if len(os.listdir("/proc/self/task")) != 1:  # never fork a process with threads
        for fd in fds:
            os.close(fd)
        sock.sendall(MESSAGE.pack(b"FAIL", 0, 0))
        return True
    pid = os.fork()
    if pid == 0:  # the worker
        try:
            _become_worker(sock, info, fds, list(children))
        finally:
            os._exit(70)
    for fd in fds:  # the worker has them; the template must not keep the directory lock
        os.close(fd)
    pidfd = os.pidfd_open(pid)
    mine = os.dup(pidfd)
    children[mine] = pid
    share = info.get("share")
    if share:
        from .rendezvous import marker_paths

        status_files[pid] = marker_paths(share["address"], pid)["status"]
    poller.register(mine, select.POLLIN)
    socket.send_fds(sock, [MESSAGE.pack(b"FORK", pid, 0)], [pidfd])
    os.close(pidfd)
    return True


def _become_worker(
    sock: socket.socket, info: dict[str, Any], fds: list[int], siblings: list[int]
) -> None:
    sock.close()
    for fd in siblings:  # the template's pidfds of other workers
        os.close(fd)
    # Appending: the worker caps its log by cutting it to its tail (worker._cap_log).
    log = os.open(info["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    sys.path[:0] = [p for p in info["sys_path"] if p not in sys.path]
    info["ctl"], info["fd"] = fds[0], fds[1]  # the numbers they have in this process
    if len(fds) > 2:
        info["lock_fd"] = fds[2]
    from .worker import main

    main(info)
