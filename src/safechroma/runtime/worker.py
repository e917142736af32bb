"""The worker: the only process that opens the persist directory with Chroma.

Started by :class:`safechroma.runtime.transport.WorkerProcess` as ``python -c <boot> <json>``
(or forked from the warm template on Linux).
It imports chromadb at once (so a standby worker is warm before it is needed; a worker forked
from the warm template has it already), then serves each channel the parent opens in a thread
of its own, until told to exit or until its parent is gone.

What it guarantees to the caller:

- Every exception, including ``pyo3_runtime.PanicException`` (a BaseException), becomes an error
  reply; only a real crash (signal, abort) ends the process mid-call.
- ``faulthandler`` writes the native stack of a fatal signal to the log whose tail the caller's
  ``WorkerCrashedError`` carries. stdout and stderr also go to that log, never to the socket.
- When the parent dies, the worker exits: at once when idle, after at most ``PARENT_GRACE``
  seconds when a call is in flight (so a write in progress usually completes).
- A *shared* worker (the default, :mod:`.rendezvous`) outlives the process that started it: once
  that process asks (``Op.SHARE``), it also serves the processes that attach on the rendezvous
  socket, counts their sessions (the starting process's control socket is one), and exits when
  the last session ends: at once when it said goodbye, after ``IDLE_GRACE`` seconds when it
  vanished. It opens Chroma only while it holds the directory lock, which it inherited.
"""

from __future__ import annotations

import faulthandler
import functools
import importlib
import inspect
import itertools
import os
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any, Final

from .._env import mark_own_process
from ..storage import wal
from . import functions, journal_hook, platform
from .framing import FrameReader, PeerDied, send_frame
from .protocol import Op, Status, decode_request, encode, error_info, is_panic

PARENT_GRACE: Final = 1.5
# A shared worker whose last session vanished (its process was killed) waits this long for a
# new one (a restarted web-server worker) before it exits and releases the directory.
IDLE_GRACE: Final = 0.5
# How long a retiring shared worker lets the calls in flight finish before it exits anyway.
DRAIN_GRACE: Final = 30.0
# The worker's log (its stdout and stderr: Chroma's own output, faulthandler's stacks) is cut to
# its last LOG_KEEP bytes whenever it passes LOG_CAP, checked every LOG_CHECK seconds: a crash
# report needs the tail, and a long-lived chatty worker must not fill the disk.
LOG_CAP: Final = 4 << 20
LOG_KEEP: Final = 256 << 10
LOG_CHECK: Final = 5.0
# Requests come from the trusted parent; the bound only stops a runaway frame.
_MAX_REQUEST: Final = 1 << 40


_local = threading.local()


def current_channel() -> socket.socket | None:
    """The socket of the channel whose request this thread is serving (None outside a call).

    For code run with ``run_in_worker`` that must reach below the protocol (the test suite's
    hostile-worker tests write raw bytes on it)."""
    return getattr(_local, "sock", None)


class _Worker:
    """The worker's state, shared by the threads that serve its channels.

    Each channel is served by a thread of its own (:meth:`serve`), so calls on different
    channels run in Chroma at the same time, as they would in one process; Chroma is thread-safe
    and its Rust core releases the GIL (CHROMA_FACTS.md section 7). Handles are taken from an
    atomic counter and kept in a dict, both safe to touch from several threads.
    """

    def __init__(self) -> None:
        self.initialised = False
        self.handles: dict[int, Any] = {}
        self._ids = itertools.count(1)
        self._busy_lock = threading.Lock()
        self._open_lock = threading.Lock()
        self.busy = 0  # calls being served, for the parent watcher's grace period
        self.share: dict[str, Any] | None = None  # the rendezvous, for a shared worker
        self.lock_fd: int | None = None  # the inherited directory lock
        self.sessions = 1  # processes using this worker; the starter's control socket is one
        self.closing = False  # set once: no new session, no new call
        self.retiring = False  # a retire was asked for: calls get Status.RETIRED
        self._sessions_lock = threading.Lock()
        self._served_marked = False
        self.listener: socket.socket | None = None
        self.keep_warm = 0.0  # seconds to stay after the last process ended (Options)
        self.idle_since: float | None = None
        self.path: str | None = None  # the persist directory, once opened
        self.journal = True  # Options.journal (issue 21): keep the write journal
        # The read end of a pipe whose only write end is ours: handed to each attaching
        # process (SCM_RIGHTS), it turns readable when this process exits (platform.posix).
        self.sentinel: int | None = None
        self._sentinel_w: int | None = None

    @property
    def next_handle(self) -> int:
        return next(self._ids)

    def accept(self, ctl: socket.socket) -> bool:
        """Serve each channel the parent hands over the control socket, in a thread of its own.

        Returns when the control socket closes (the parent closed this worker or died): False,
        or when a shared worker's starting process said goodbye on it: True.
        """
        if sys.platform == "win32":  # no Unix sockets: SafeClient refuses to start there
            raise platform.unsupported()
        while True:
            try:
                msg, fds, _flags, _addr = socket.recv_fds(ctl, 16, 16)
            except OSError:
                return False
            if not msg and not fds:
                return False
            if msg == b"L" and len(fds) == 1 and self.lock_fd is None:
                # A standby made the directory's shared worker: the lock it holds from now on
                # (the process that promotes it waits for the answer before it asks anything).
                self.lock_fd = fds[0]
                ctl.sendall(b"k")
                continue
            for fd in fds:
                self.start_channel(socket.socket(fileno=fd))
            if msg in (b"b", b"w"):  # goodbye from the starting process, which keeps going
                self.end_session(ctl, polite=True, linger=msg == b"w")
                return True

    def start_channel(self, sock: socket.socket) -> None:
        threading.Thread(
            target=self.serve, args=(sock,), name="safechroma-channel", daemon=True
        ).start()

    # -- sessions (a shared worker) --------------------------------------------------------

    def listen(self) -> None:
        """Start serving other processes on the rendezvous socket (``Op.SHARE``)."""
        if self.share is None or self.listener is not None:
            return
        from . import rendezvous

        if sys.platform == "win32":  # no Unix sockets: SafeClient refuses to start there
            return
        address = self.share["address"]
        try:
            os.unlink(address)  # a dead worker's socket: we hold the lock, it is not in use
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            listener.bind(address)
        finally:
            os.umask(old)
        os.chmod(address, 0o600)
        listener.listen(128)
        if self.sentinel is None:
            # Both ends non-inheritable: no child of ours may keep the write end open.
            self.sentinel, self._sentinel_w = os.pipe()
        self.listener = listener
        self._rendezvous = rendezvous
        threading.Thread(target=self._accept_loop, name="safechroma-accept", daemon=True).start()

    def _accept_loop(self) -> None:
        listener = self.listener
        assert listener is not None
        while True:
            try:
                conn, _addr = listener.accept()
            except OSError:
                return  # closed: the worker is exiting
            threading.Thread(
                target=self._handshake, args=(conn,), name="safechroma-handshake", daemon=True
            ).start()

    def _handshake(self, conn: socket.socket) -> None:
        if sys.platform == "win32":  # no Unix sockets: SafeClient refuses to start there
            raise platform.unsupported()
        rv = self._rendezvous
        try:
            if not rv.peer_is_us(conn):  # the 0600 socket stops them; this is the second wall
                conn.close()
                return
            conn.settimeout(rv.HANDSHAKE_TIMEOUT)
            hello = rv.recv_json(conn)
            mine = rv.versions()
            ok = {k: hello.get(k) for k in mine} == mine
            with self._sessions_lock:
                ok = ok and not self.closing
                if ok and hello.get("kind") == "session":
                    self.sessions += 1
            leaving = ok and hello.get("kind") == "leave" and self.leave_if_idle()
            sentinel = self.sentinel if ok and hello.get("kind") == "session" else None
            rv.send_json(
                conn,
                {
                    **mine,
                    "ok": ok,
                    "pid": os.getpid(),
                    "log": self.share.get("log", ""),
                    "leaving": leaving,
                    "sentinel": sentinel is not None,
                }
                if self.share
                else {"ok": False},
            )
            if sentinel is not None:
                socket.send_fds(conn, [b"s"], [sentinel])
            conn.settimeout(None)
        except (OSError, ValueError, ConnectionError):
            conn.close()
            return
        if not ok or hello.get("kind") == "leave":
            conn.close()
            return
        if hello.get("kind") == "session":
            self._session(conn)
        else:
            self.start_channel(conn)

    def _session(self, conn: socket.socket) -> None:
        try:
            msg = conn.recv(1)
        except OSError:
            msg = b""
        self.end_session(conn, polite=msg in (b"b", b"w"), linger=msg == b"w")

    def end_session(self, conn: socket.socket, *, polite: bool, linger: bool = False) -> None:
        """A process left: politely (it waits to hear whether we exit) or by vanishing.

        The last process to leave ends the worker: at once when it closed its clients, after
        ``keep_warm`` seconds when it just ended (``linger``: the next short command on the
        directory joins this worker instead of starting one), after ``IDLE_GRACE`` when it
        vanished (a killed program's directory is free again within about two seconds).
        """
        if self.share is None:
            return
        stay = linger and self.keep_warm > 0
        with self._sessions_lock:
            self.sessions -= 1
            last = self.sessions <= 0 and not self.closing
            if last and polite and not stay:
                self.closing = True
        if polite:
            try:
                conn.sendall(b"x" if last and not stay else b"s")
            except OSError:
                pass
        conn.close()
        if not last:
            return
        if polite and not stay:
            self.finish("closed")
            return
        self.idle_since = time.monotonic()
        wait = self.keep_warm if stay else IDLE_GRACE
        threading.Timer(wait, self._exit_if_idle, args=(self.idle_since,)).start()

    def _exit_if_idle(self, since: float | None = None) -> None:
        with self._sessions_lock:
            if self.sessions > 0 or self.closing:
                return
            if since is not None and since != self.idle_since:
                return  # a process came and went since: its own timer decides
            self.closing = True
        self.finish("idle")

    def leave_if_idle(self) -> bool:
        """Another process needs the directory (a repair, an exclusive client, ``safechroma
        release``): exit now if no process uses this worker. True when it is leaving."""
        with self._sessions_lock:
            if self.sessions > 0 or self.closing:
                return False
            self.closing = True
        threading.Thread(target=self.finish, args=("asked to leave",), daemon=True).start()
        return True

    def finish(self, why: str) -> None:
        """Stop taking sessions and calls, let the calls in flight end, record why, exit."""
        with self._sessions_lock:
            self.closing = True
        if self.listener is not None:
            self.listener.close()
        if why in ("idle", "asked to leave") and self.path is not None:
            # No process of ours is left to do it after us: hand the WAL back to Chroma's own
            # purge, so that plain chromadb used next never grows it without bound.
            give_up = time.monotonic() + PARENT_GRACE
            while self.busy > 0 and time.monotonic() < give_up:
                time.sleep(0.01)
            wal.release(self.path)
        if self.share is not None:
            if self.listener is not None:
                # Only the worker that bound the address removes it: a standby that was never
                # promoted shares the address of the directory's live worker.
                try:
                    os.unlink(self.share["address"])
                except OSError:
                    pass
            _write(self.share["markers"]["end"], why)
        orderly = why in ("closed", "idle", "asked to leave")
        give_up = time.monotonic() + (PARENT_GRACE if orderly else DRAIN_GRACE)
        while self.busy > 0 and time.monotonic() < give_up:
            time.sleep(0.01)
        _exit()

    def mark_served(self) -> None:
        if self._served_marked or self.share is None:
            return
        self._served_marked = True
        _write(self.share["markers"]["served"], "1")

    def serve(self, sock: socket.socket) -> None:
        """Serve one channel: one request, then its reply, until the parent closes it."""
        reader = FrameReader(sock, _MAX_REQUEST)
        _local.sock = sock
        while True:
            try:
                data, buffers = reader.read_frame()
            except (PeerDied, OSError):
                sock.close()
                return  # the parent closed this channel or is gone
            with self._busy_lock:
                self.busy += 1
            start = time.perf_counter()
            status = Status.OK
            op = None
            try:
                # Decoding can fail too (an embedding function pickled by reference to a module
                # this process cannot import): that is the call's error, not the worker's death.
                request = decode_request(data, buffers)
                del data, buffers
                op = request[0]
                if self.retiring and op != Op.EXIT:
                    status, payload = Status.RETIRED, None  # not run: the next worker runs it
                    raise _Retired
                payload = self.dispatch(op, request[1])
                if op in (Op.CALL, Op.RUN) and not self._served_marked:
                    self.mark_served()
            except _Retired:
                pass
            except BaseException as exc:  # noqa: BLE001 - every failure becomes a reply
                if isinstance(exc, (SystemExit, KeyboardInterrupt)) and not is_panic(exc):
                    raise
                status = Status.PANIC if is_panic(exc) else Status.ERROR
                payload = error_info(exc, traceback.format_exc())
            elapsed = time.perf_counter() - start
            try:
                out, bufs = encode((int(status), payload, elapsed))
            except Exception as exc:  # noqa: BLE001 - an unencodable result is the call's error
                info = error_info(
                    TypeError(f"the result of this call cannot be sent to the caller: {exc}"),
                    traceback.format_exc(),
                )
                out, bufs = encode((int(Status.ERROR), info, elapsed))
            del payload
            try:
                send_frame(sock, out, bufs)
            except OSError:
                sock.close()
                return
            finally:
                with self._busy_lock:
                    self.busy -= 1
            if op == Op.EXIT:
                if self.share is None:
                    _exit()
                self.finish(str(request[1] or "retired"))

    def dispatch(self, op: int, body: Any) -> Any:
        if op == Op.CALL:
            handle, method, args, kwargs = body
            target = self.handles[handle]
            if method == "add" and _is_collection(target):
                return _add_new_only(target, args, kwargs)
            return self.export(getattr(target, method)(*args, **kwargs))
        if op == Op.PING:
            return None
        if op == Op.OPEN:
            return self.open(*body)
        if op == Op.OPEN_HANDLE:
            client_handle, collection_id, kwargs = body
            client = self.handles[client_handle]
            return self.export(client.get_collection_by_id(collection_id, **kwargs))
        if op == Op.RELEASE:
            for handle in body:
                self.handles.pop(handle, None)
            return None
        if op == Op.RUN:
            client_handle, fn, args = body
            if isinstance(fn, str):
                module, _, name = fn.partition(":")
                fn = getattr(importlib.import_module(module), name)
            return fn(self.handles[client_handle], *args)
        if op == Op.EXIT:
            # A shared worker may have calls from other processes in flight: new calls get
            # Status.RETIRED (never run), those in flight finish, then it exits (finish()).
            self.retiring = True
            return None
        if op == Op.SHARE:
            self.listen()
            return None
        if op == Op.REGISTER:
            functions.register(body)
            return None
        if op == Op.DEFINE:
            return functions.define(*body)
        raise ValueError(f"unknown operation {op!r}")

    def open(
        self, path: str, settings: Any, tenant: str, database: str, init: Any
    ) -> tuple[str, int, str]:
        # One open at a time: chromadb's per-path system cache is not built for racing opens.
        with self._open_lock:
            self._check_lock()
            if init is not None and not self.initialised:
                init()
            self.initialised = True
            import chromadb

            # Purge off before Chroma's first read too (a read may purge, FACTS §3); again
            # after the open for a directory whose tables the open created.
            wal.take_over(path)
            lost = journal_hook.enabled(path, self.journal) and journal_hook.sqlite_lost(path)
            client = chromadb.PersistentClient(
                path=path, settings=settings, tenant=tenant, database=database
            )
            wal.take_over(path)  # before any write: Chroma's WAL purge off (storage/wal.py)
            journal_hook.setup(client, path, self.journal)  # issue 21: the write journal
            if lost:  # chroma.sqlite3 was gone: every collection back from the journal
                journal_hook.restore(client, path, journal_hook.installed(client))
            self.path = path
        handle = self.next_handle
        self.handles[handle] = client
        return ("client", handle, str(chromadb.__version__))

    def _check_lock(self) -> None:
        """Never open Chroma without holding the directory lock (a shared worker's rule)."""
        if self.lock_fd is None:
            if self.share is not None:
                raise RuntimeError("a shared worker started without the directory lock")
            return
        # flock succeeds at once when our open file description already holds it; on Windows
        # this is where the worker takes the lock itself (locks are not inherited there).
        try:
            held = platform.try_lock(self.lock_fd)
        except OSError:
            held = False
        if not held:
            raise RuntimeError("this worker does not hold the directory lock; another process does")

    def export(self, result: Any) -> Any:
        """Replace Chroma Collection objects (which do not pickle) by (handle, model) refs."""
        Collection = _collection_class()
        if isinstance(result, Collection):
            return self._ref(result)
        if isinstance(result, list) and result and isinstance(result[0], Collection):
            return [self._ref(c) for c in result]
        return result

    def _ref(self, collection: Any) -> tuple[str, int, Any]:
        handle = self.next_handle
        self.handles[handle] = collection
        return ("collection", handle, collection.get_model())


class _Retired(Exception):
    pass


def _write(path: str, text: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError:
        pass


@functools.cache
def _collection_class() -> Any:
    from chromadb.api.models.Collection import Collection

    return Collection


@functools.cache
def _add_signature() -> inspect.Signature:
    return inspect.signature(_collection_class().add)


def _is_collection(obj: Any) -> bool:
    return isinstance(obj, _collection_class())


def _add_new_only(col: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """``col.add(...)`` exactly as chromadb does it, minus the ids the collection already has.

    Chroma ignores an ``add`` of an existing id, but the ignored row still goes into its WAL,
    where a re-application (chromadb's vector swap, see :mod:`safechroma.runtime.guard`) can
    give the record the ignored write's vector. Not sending ids that exist keeps the WAL to rows
    that took effect; everything the caller sees is the same: validation, embedding and errors
    are chromadb's own steps, in chromadb's order.
    """
    try:
        bound = _add_signature().bind(col, *args, **kwargs)
    except TypeError:
        col.add(*args, **kwargs)  # chromadb raises its own TypeError
        return None
    a = bound.arguments
    request = col._validate_and_prepare_add_request(
        ids=a.get("ids"),
        embeddings=a.get("embeddings"),
        metadatas=a.get("metadatas"),
        documents=a.get("documents"),
        images=a.get("images"),
        uris=a.get("uris"),
    )
    ids = request["ids"]
    existing = set(col.get(ids=ids, include=[])["ids"])
    if existing:
        # Chroma checks the dimension of every row, existing ids included, before it ignores
        # them: so do we, with its message.
        stored = col.get(ids=[next(iter(existing))], include=["embeddings"])["embeddings"]
        if stored is not None and len(stored):
            expected = len(stored[0])
            for emb in request["embeddings"] or []:
                if len(emb) != expected:
                    from chromadb.errors import InvalidArgumentError

                    raise InvalidArgumentError(
                        f"Collection expecting embedding with dimension of {expected}, "
                        f"got {len(emb)}"
                    )
        keep = [i for i, rid in enumerate(ids) if rid not in existing]
        if not keep:
            return None
        request = {
            key: (
                [value[i] for i in keep]
                if value is not None and not isinstance(value, str) and len(value) == len(ids)
                else value
            )
            for key, value in request.items()
        }
    col._client._add(
        collection_id=col.id,
        ids=request["ids"],
        embeddings=request["embeddings"],
        metadatas=request["metadatas"],
        documents=request["documents"],
        uris=request["uris"],
        tenant=col.tenant,
        database=col.database,
    )
    return None


def _watch_parent(ppid: int, worker: _Worker, forked: bool) -> None:
    """Exit when the parent dies: at once if idle, after PARENT_GRACE if a call is running."""
    # A worker forked by the template is the template's child; a spawned one is ours.
    if not forked and os.getppid() != ppid:
        os._exit(0)
    platform.wait_parent_gone(ppid)
    _exit_after_grace(worker)


def _exit_after_grace(worker: _Worker) -> None:
    give_up = time.monotonic() + PARENT_GRACE
    while worker.busy and time.monotonic() < give_up:
        time.sleep(0.02)
    _exit()


def _exit() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    # Chroma keeps nothing unflushed that a normal exit would write (its WAL is in SQLite,
    # CHROMA_FACTS.md section 2); skipping interpreter teardown avoids waiting on Rust threads.
    os._exit(0)


def _cap_log(path: str) -> None:
    """Keep the log (this process's fd 1 and 2, opened for appending) under LOG_CAP."""
    while True:
        time.sleep(LOG_CHECK)
        try:
            size = os.fstat(2).st_size
            if size <= LOG_CAP:
                continue
            with open(path, "rb") as f:
                f.seek(size - LOG_KEEP)
                tail = f.read(LOG_KEEP)
            os.ftruncate(2, 0)
            os.write(2, b"[safechroma: log cut to its last %d bytes]\n" % len(tail) + tail)
        except OSError:
            return


def _restore_threads(threads: dict[str, str | None] | None) -> None:
    """Give the embedding function the caller's BLAS/OpenMP thread settings.

    A worker forked from the template inherits its ``*_NUM_THREADS=1`` (runtime/template.py),
    and an embedding model then ran 1.9x slower than in the caller (issue 20: 15.8 s against
    8.3 s for 64 documents). torch and ONNX Runtime read the variables when they load, which
    in a worker is after this; numpy's OpenBLAS, loaded in the template, is told directly.
    """
    if threads is None:
        return
    for var, value in threads.items():
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value
    wanted = threads.get("OPENBLAS_NUM_THREADS") or threads.get("OMP_NUM_THREADS")
    try:
        count = int(wanted) if wanted else (os.cpu_count() or 1)
    except ValueError:
        return
    _set_openblas_threads(count)


def _set_openblas_threads(count: int) -> None:
    try:
        with open("/proc/self/maps") as f:
            libs = {ln.split()[-1] for ln in f if "openblas" in ln.lower() and "/" in ln}
    except OSError:
        return
    import ctypes

    for lib in libs:
        try:
            handle = ctypes.CDLL(lib)
        except OSError:
            continue
        for symbol in (
            "openblas_set_num_threads",
            "scipy_openblas_set_num_threads64_",
            "openblas_set_num_threads64_",
        ):
            setter = getattr(handle, symbol, None)
            if setter is not None:
                setter(count)
                break


def main(info: dict[str, Any]) -> None:
    """Entry point of the worker process (see ``safechroma.runtime.transport._BOOT`` and
    ``safechroma.runtime.template``)."""
    # Never patched by the launcher's start-up hook: this process opens Chroma itself.
    mark_own_process()
    # Ctrl-C in a terminal reaches the whole process group; the caller decides what to do.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    faulthandler.enable(file=sys.stderr, all_threads=True)
    # The memory ceiling: RLIMIT_AS on Linux, an RSS watchdog elsewhere (platform); the file
    # size ceiling: RLIMIT_FSIZE, with SIGXFSZ's default action restored.
    platform.limit_memory(info.get("memory_limit"))
    platform.limit_file_size(info.get("file_limit"))
    if info.get("sentinel") is not None:
        # The write end of the caller's exit sentinel: held, never written, closed by the exit
        # alone; not inherited by any process this one starts.
        os.set_inheritable(int(info["sentinel"]), False)
    _restore_threads(info.get("threads"))
    if info.get("log"):
        threading.Thread(
            target=_cap_log, args=(info["log"],), name="safechroma-log-cap", daemon=True
        ).start()
    worker = _Worker()
    share = info.get("share")
    if share is not None:
        from .rendezvous import marker_paths

        share = {**share, "markers": marker_paths(share["address"], os.getpid())}
    worker.share = share
    worker.keep_warm = float((share or {}).get("keep_warm") or 0.0)
    worker.lock_fd = info.get("lock_fd")
    worker.journal = bool(info.get("journal", True))  # Options.journal (issue 21)
    if worker.share is None:
        threading.Thread(
            target=_watch_parent,
            args=(info["ppid"], worker, bool(info.get("forked"))),
            name="safechroma-parent-watch",
            daemon=True,
        ).start()
    ctl = socket.socket(fileno=info["ctl"])
    # Warm up while the caller does other things: a standby worker is ready when promoted.
    import chromadb  # noqa: F401

    from .guard import install as install_guard

    install_guard()  # before any request is served
    worker.start_channel(socket.socket(fileno=info["fd"]))
    try:
        polite = worker.accept(ctl)
        if worker.share is not None:
            # The starting process left (or vanished): other processes may still use us.
            if not polite:
                worker.end_session(ctl, polite=False)
            threading.Event().wait()  # the sessions' threads decide when to exit
        # The control socket closed: the parent closed this worker (it stops it right after)
        # or died; either way finish what is running, briefly, and go.
        _exit_after_grace(worker)
    finally:
        _exit()
