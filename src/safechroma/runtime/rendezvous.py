"""Sharing one directory's worker between processes: the rendezvous socket and the shared state.

What it owns: how a process finds the worker that serves a directory, proves it may use it, and
hands the worker's life on to the next worker. Nothing here talks to Chroma.

- **The rendezvous** is a Unix stream socket in a per-user folder (``$XDG_RUNTIME_DIR`` or the
  temp folder, ``safechroma-<uid>``, mode 0700, checked to be ours) named after the directory's
  real path, mode 0600. The worker listens on it once it has opened the directory; its address
  is written into the directory's lock file (``share <socket>``) by the process that started it.
  Both ends check the other's user (``SO_PEERCRED`` on Linux, ``LOCAL_PEERCRED`` on macOS:
  :func:`.platform.peer_uid`): a process of another user cannot reach the socket (0700 folder,
  0600 socket) and is refused if it somehow does. Requests carry
  cloudpickle, so only a process of the same user may ever send one.
- **A connection** opens with a handshake, one length-prefixed JSON object each way: the
  client's kind (``session``: one per attached process, its life is the process's membership;
  ``channel``: one call at a time, exactly like a channel of the starting process) and versions;
  the worker's pid, its log and its versions, and for a session the worker's exit sentinel
  (a pipe only the worker writes to, sent with ``SCM_RIGHTS``: readable once it has exited,
  how a portable-mode or macOS process watches a worker it did not start). Different
  safechroma, chromadb or protocol versions refuse to talk: the client raises naming both.
- **The shared state** (``<dir>/.safechroma/share.json``) is written only by the process that
  holds the directory lock while no worker runs: the last worker started (pid, the files where
  its exit status, its first served call and its orderly end are recorded) and the crash-loop
  breaker's history of deaths. Whichever process replaces a dead worker reads how it ended from
  there, so one death is counted once for the directory, whoever noticed it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import stat
import struct
import sys
import tempfile
import threading
import time
from typing import Any, Final

from .._errors import DirectoryLockedError, IncompatibleWorkerError, SafeChromaError
from . import platform

PROTOCOL: Final = 1
_LENGTH: Final = struct.Struct("<I")
_MAX_HELLO: Final = 1 << 16
STATE_FILE: Final = "share.json"
HANDSHAKE_TIMEOUT: Final = 5.0
# A Unix socket's address holds 108 bytes on Linux (104 on macOS); a socket's name in the
# folder (20 hex digits, ".sock", and a marker's ".<pid>.status") needs this much room.
_SUN_PATH: Final = 104
_NAME_ROOM: Final = 27


def versions() -> dict[str, Any]:
    """What must match between a client and the worker it attaches to."""
    import chromadb

    from .. import __version__

    return {"protocol": PROTOCOL, "safechroma": __version__, "chromadb": chromadb.__version__}


# -- where the socket lives ----------------------------------------------------------------


def socket_folder() -> str:
    """This user's folder for rendezvous sockets, created 0700 and checked to be ours.

    Raises:
        UnsupportedPlatformError: no Unix sockets here (Windows): SafeClient cannot run.
        PermissionError: no such folder can be made.
    """
    platform.check_worker_transport()
    if sys.platform == "win32":  # for the type checker: the line above has raised
        raise OSError("no Unix sockets")
    uid = os.getuid()
    bases = [os.environ.get("XDG_RUNTIME_DIR") or "", tempfile.gettempdir(), "/tmp"]
    for base in bases:
        if not base or not os.path.isdir(base) or not os.access(base, os.W_OK):
            continue
        folder = os.path.join(base, f"safechroma-{uid}")
        if len(os.fsencode(folder)) + _NAME_ROOM > _SUN_PATH:
            continue  # a deep TMPDIR: the socket's address would not fit (AF_UNIX path too long)
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            pass
        except OSError:
            continue
        st = os.lstat(folder)
        if stat.S_ISDIR(st.st_mode) and st.st_uid == uid and not st.st_mode & 0o077:
            return folder
    raise PermissionError(
        f"no private folder for safechroma's rendezvous sockets: {bases[-1]}/safechroma-{uid} "
        "exists but is not a folder of this user with mode 0700"
    )


def socket_path(path: str) -> str:
    """The rendezvous socket for the persist directory ``path`` (a real path)."""
    digest = hashlib.blake2b(path.encode(), digest_size=10).hexdigest()
    return os.path.join(socket_folder(), f"{digest}.sock")


def announce(lock_fd: int, worker_pid: int, address: str) -> None:
    """Write into the held lock file who serves the directory and where to attach."""
    write_lock_file(lock_fd, f"{worker_pid}\nshare {address}\n")


def write_lock_file(lock_fd: int, text: str) -> None:
    """Replace the held lock file's text with no instant at which it is empty (a reader then
    sees the old text, or the new lines followed by the old text's tail)."""
    if sys.platform == "win32":  # no Unix sockets: SafeClient refuses to start there
        raise platform.unsupported()
    data = text.encode()
    os.pwrite(lock_fd, data, 0)
    os.ftruncate(lock_fd, len(data))


def announced(lock_path: str) -> str | None:
    """The rendezvous address written in the lock file, or None."""
    try:
        with open(lock_path) as f:
            lines = f.read().split("\n")
    except OSError:
        return None
    shared = [ln[6:] for ln in lines if ln.startswith("share ")]
    return shared[0] if shared else None


# -- the lock, taken without waiting -------------------------------------------------------


def try_lock(lock_path: str) -> int | None:
    """The lock file's descriptor with the lock held, or None when a worker (or a replacement
    in progress) holds it. Never waits."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        if platform.try_lock(fd):
            return fd
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


def ask_idle_worker_to_leave(path: str, lock_path: str, timeout: float = 5.0) -> bool:
    """Ask the shared worker of ``path`` to exit now if no process uses it (one kept warm
    after its last process ended, ``Options.keep_warm``), and wait until the lock is free.

    For a process that needs the directory to itself: a repair, an exclusive client,
    ``safechroma release``. True when the worker left and the lock was free within
    ``timeout``; False when there is no such worker or it is in use.
    """
    address = announced(lock_path)
    if address is None:
        return False
    try:
        sock, reply = connect(address, path, "leave", lock_path)
    except (ConnectionError, OSError, SafeChromaError):
        return False
    sock.close()
    if not reply.get("leaving"):
        return False
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        fd = try_lock(lock_path)
        if fd is not None:
            os.close(fd)
            return True
        time.sleep(0.02)
    return False


def take_lock(path: str, lock_path: str) -> int | None:
    """The lock of a directory that a process needs to itself (a repair, ``safechroma serve``,
    ``safechroma release``), taken without waiting: a shared worker kept warm with no process
    using it is asked to leave first. None when another process holds it."""
    fd = try_lock(lock_path)
    if fd is None and ask_idle_worker_to_leave(path, lock_path):
        fd = try_lock(lock_path)
    return fd


# -- the handshake -------------------------------------------------------------------------


def peer_is_us(sock: socket.socket) -> bool:
    """Whether the process at the other end of a Unix socket runs as this user (True where the
    system cannot tell: the 0700 folder then is the wall)."""
    uid = platform.peer_uid(sock)
    return uid is None or sys.platform == "win32" or uid == os.getuid()


def send_json(sock: socket.socket, obj: dict[str, Any]) -> None:
    data = json.dumps(obj).encode()
    sock.sendall(_LENGTH.pack(len(data)) + data)


def recv_json(sock: socket.socket) -> dict[str, Any]:
    head = _recv_exact(sock, _LENGTH.size)
    (size,) = _LENGTH.unpack(head)
    if size > _MAX_HELLO:
        raise ConnectionError(f"handshake of {size} bytes")
    obj = json.loads(_recv_exact(sock, size))
    if not isinstance(obj, dict):
        raise ConnectionError("handshake is not an object")
    return obj


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed during the handshake")
        buf += chunk
    return buf


def connect(
    address: str, path: str, kind: str, lock_path: str
) -> tuple[socket.socket, dict[str, Any]]:
    """Connect to the worker at ``address`` and shake hands; returns the socket and its reply.

    Raises:
        ConnectionError: nobody listens there (a worker that is gone), or it hung up.
        DirectoryLockedError: the socket belongs to another user (no attach is possible).
        IncompatibleWorkerError: the worker runs other versions of safechroma or chromadb.
    """
    platform.check_worker_transport()
    if sys.platform == "win32":  # for the type checker: the line above has raised
        raise OSError("no Unix sockets")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(HANDSHAKE_TIMEOUT)
        try:
            sock.connect(address)
        except PermissionError:
            raise _foreign(path, lock_path, address) from None
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise ConnectionError(str(exc)) from None
        uid = platform.peer_uid(sock)
        if uid is not None and uid != os.getuid():
            raise _foreign(path, lock_path, address, uid)
        mine = versions()
        send_json(sock, {**mine, "kind": kind, "pid": os.getpid()})
        reply = recv_json(sock)
        theirs = {k: reply.get(k) for k in mine}
        if theirs != mine:
            raise IncompatibleWorkerError(
                f"{path} is served by a safechroma worker (pid {reply.get('pid')}) running "
                f"safechroma {theirs['safechroma']} with chromadb {theirs['chromadb']} "
                f"(protocol {theirs['protocol']}); this process has safechroma "
                f"{mine['safechroma']} with chromadb {mine['chromadb']} (protocol "
                f"{mine['protocol']}). Processes sharing a directory must run the same "
                "versions: upgrade one side, or wait until the other programs have closed it.",
                path=path,
                worker_versions=theirs,
                client_versions=mine,
            )
        if not reply.get("ok"):
            raise ConnectionError(str(reply.get("error", "refused")))
        if reply.get("sentinel"):
            _msg, fds, _flags, _addr = socket.recv_fds(sock, 1, 1)
            reply["sentinel"] = fds[0] if fds else None
        sock.settimeout(None)
        return sock, reply
    except BaseException:
        sock.close()
        raise


def _foreign(
    path: str, lock_path: str, address: str, uid: int | None = None
) -> DirectoryLockedError:
    owner = f"user {uid}" if uid is not None else "another user"
    return DirectoryLockedError(
        f"{path} is served by a safechroma worker of {owner} (rendezvous {address}); only the "
        "user who owns that worker can attach to it, and Chroma is not safe with two owners. "
        "Run this program as that user, or connect to a `safechroma serve` of the directory.",
        path=path,
        lock_path=lock_path,
    )


# -- the shared state ----------------------------------------------------------------------


def state_path(path: str) -> str:
    from ..storage.wal import STATE_DIR

    return os.path.join(path, STATE_DIR, STATE_FILE)


def load_state(path: str) -> dict[str, Any]:
    """The shared state (empty when there is none or it cannot be read)."""
    try:
        with open(state_path(path)) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def save_state(path: str, state: dict[str, Any]) -> None:
    """Replace the shared state atomically (call with the directory lock held)."""
    target = state_path(path)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(state, f)
    os.replace(tmp, target)


def marker_paths(address: str, pid: int) -> dict[str, str]:
    """Where a worker's life is recorded: its exit status (written by its parent), its first
    served call and its orderly end (written by the worker)."""
    base = f"{address}.{pid}"
    return {"status": f"{base}.status", "served": f"{base}.served", "end": f"{base}.end"}


def worker_files(record: dict[str, Any]) -> dict[str, str]:
    """Every file a worker recorded in ``share.json`` left behind: its markers and its log."""
    return {
        **marker_paths(str(record["address"]), int(record["pid"])),
        "log": str(record.get("log", "")),
    }


def read_marker(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def remove_markers(paths: dict[str, str]) -> None:
    for p in paths.values():
        try:
            os.unlink(p)
        except OSError:
            pass


def wait_marker(path: str, timeout: float) -> str | None:
    """A marker that its writer is about to write (an exit status right after the exit)."""
    give_up = time.monotonic() + timeout
    while True:
        value = read_marker(path)
        if value is not None or time.monotonic() >= give_up:
            return value
        time.sleep(0.005)


# -- leftovers of dead workers -------------------------------------------------------------

# A file must be this old before it is swept: the processes that saw a worker die read its
# markers within moments (its exit status, whether it served), and a socket is bound and
# listened on in one go.
SWEEP_AGE: Final = 5.0
_MARKER = re.compile(r"^[0-9a-f]+\.sock\.(\d+)\.(?:end|served|status|status\.tmp)$")
_SOCKET = re.compile(r"^[0-9a-f]+\.sock$")
_LOG = re.compile(r"^worker-\d+-\d+\.log$")


def sweep(folder: str | None = None, *, now: float | None = None) -> list[str]:
    """Remove what dead workers left in the rendezvous folder; returns what was removed.

    - a marker (``<socket>.<pid>.end|served|status``) of a worker that is not alive;
    - a socket nobody listens on;
    - a worker log no process has open (workers write theirs until they exit).

    Only files older than :data:`SWEEP_AGE`. Never raises: a file another process removes
    first, or one it cannot read, is left to the next sweep.
    """
    try:
        folder = socket_folder() if folder is None else folder
        names = os.listdir(folder)
    except OSError:
        return []
    now = time.time() if now is None else now
    removed: list[str] = []
    logs: list[str] = []
    for name in names:
        path = os.path.join(folder, name)
        try:
            if now - os.lstat(path).st_mtime < SWEEP_AGE:
                continue
        except OSError:
            continue
        marker = _MARKER.match(name)
        if marker is not None:
            if not _pid_alive(int(marker.group(1))):
                removed += _unlink(path)
        elif _SOCKET.match(name):
            if not _listened_on(path):
                removed += _unlink(path)
        elif _LOG.match(name):
            logs.append(path)
    if logs and os.path.isdir("/proc"):  # without /proc no log can be known to be unheld
        held = _open_files(folder)
        for path in logs:
            if path not in held:
                removed += _unlink(path)
    return removed


_swept_at = 0.0
_sweep_lock = threading.Lock()
SWEEP_EVERY: Final = 30.0


def sweep_soon() -> None:
    """Sweep in a background thread, at most once per :data:`SWEEP_EVERY` seconds per process
    (called whenever this process starts a shared worker: it then knows of the latest death)."""
    global _swept_at
    with _sweep_lock:
        now = time.monotonic()
        if now - _swept_at < SWEEP_EVERY:
            return
        _swept_at = now
    threading.Thread(target=sweep, name="safechroma-sweep", daemon=True).start()


def _unlink(path: str) -> list[str]:
    try:
        os.unlink(path)
    except OSError:
        return []
    return [path]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's (a reused pid): not ours to judge
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _listened_on(address: str) -> bool:
    if sys.platform == "win32":  # no Unix sockets: SafeClient refuses to start there
        raise platform.unsupported()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(1.0)
        sock.connect(address)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return True  # busy, or not ours to judge
    finally:
        sock.close()
    return True


def _open_files(folder: str) -> set[str]:
    """The files in ``folder`` that some process of this user has open (from /proc)."""
    held: set[str] = set()
    prefix = folder.rstrip("/") + "/"
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return held
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue  # gone, or another user's: it cannot hold a file in our 0700 folder
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith(prefix):
                held.add(target)
    return held
