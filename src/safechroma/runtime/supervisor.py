"""Lifecycle of the worker that owns one persist directory: lock, start, call, crash, respawn.

One :class:`Supervisor` exists per persist directory per process (see :func:`acquire`); every
``SafeClient`` and ``SafeCollection`` on that directory shares it. It:

- holds an exclusive ``flock`` on ``<path>/.safechroma.lock`` for as long as it lives, and passes
  the locked descriptor to each worker, so the directory never has two owners, not even while a
  worker is being replaced or after the parent died with a call in flight;
- runs the validator (and, on damage, the recovery hook) before the first start and before each
  respawn, then starts a fresh worker (a warm standby when there is one);
- turns every way a worker can fail into one precise exception, counts deaths, and opens the
  crash-loop breaker when they come too fast.

States, as the supervisor sees its worker::

    NO_WORKER   no live worker: the next call validates, recovers if needed, and starts one
    READY       a live worker has opened the directory and serves calls
    BROKEN      too many deaths: the breaker is open, calls fail fast with CrashLoopError
    CLOSED      closed by the caller: calls raise ClientClosedError
"""

from __future__ import annotations

import atexit
import builtins
import enum
import errno
import fcntl
import functools
import hashlib
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from typing import Any, Final

import tenacity

from .._errors import (
    ChromaPanicError,
    ClientClosedError,
    CrashLoopError,
    DirectoryLockedError,
    PoisonRequestError,
    ProtocolError,
    RecoveryError,
    RemoteError,
    SafeChromaError,
    WorkerCrashedError,
    WorkerError,
    WorkerStartError,
    WorkerTimeoutError,
    signal_name,
)
from .._policy import Event, HookContext, Options, Stats
from ..storage import wal
from .breaker import Breaker
from .protocol import ErrorInfo, Op, Status, decode_reply, encode, is_error_info
from .transport import PeerDied, PeerMisbehaved, PeerTimedOut, WorkerProcess

logger = logging.getLogger("safechroma")
# A library does not configure logging; without a handler Python would print WARNINGs to
# stderr through its last-resort handler.
logger.addHandler(logging.NullHandler())

LOCK_NAME: Final = ".safechroma.lock"

# Chroma errors that mean the files on disk are damaged (CHROMA_FACTS.md section 3).
_DAMAGE = re.compile(
    r"Error loading hnsw index|Error deserializing pickle file|Error finding id|"
    r"Error getting embedding|Error querying knn|Failed to apply logs to the hnsw segment"
    r"|database disk image is malformed|file is not a database",
    re.IGNORECASE,
)


class State(enum.Enum):
    NO_WORKER = "no worker"  # next call validates, recovers if needed, starts one
    READY = "ready"  # a live worker serves calls
    BROKEN = "broken"  # the breaker is open; calls fail fast
    CLOSED = "closed"  # closed by the caller


class RemoteTraceback(Exception):
    """The traceback of an exception raised in the worker, attached as ``__cause__``."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return "\n\n" + self.tb


class _Remote:
    """A caller-side object that has a handle in the worker (a client or a collection)."""

    _handle: int = 0
    _handle_serial: int = -1

    def _reopen_request(self, sup: Supervisor, worker: WorkerProcess) -> tuple[Op, Any, bool]:
        raise NotImplementedError


class Supervisor:
    """Owns the worker of one persist directory. Thread-safe: one call at a time."""

    def __init__(self, path: str, options: Options, primary: tuple[Any, str, str]) -> None:
        self.path = path
        self.owner = os.getpid()
        self.options = options
        self.primary = primary  # settings, tenant, database of the first client
        self.refs = 0
        self.lock = threading.RLock()
        self.state = State.NO_WORKER
        self.worker: WorkerProcess | None = None
        self.standby: WorkerProcess | None = None
        self.primary_handle = 0
        self.log_dir = tempfile.mkdtemp(prefix="safechroma-")
        self.lock_fd = self._lock_directory()
        self.breaker = Breaker(options.breaker)
        self.pending_reason: str | None = "start"
        self.pending_crash: BaseException | None = None
        self.pending_salvage: list[str] = []
        self.released: list[tuple[int, int]] = []
        self.chroma_version = ""
        # stats
        self.calls = 0
        self.errors = 0
        self.death_counts: dict[str, int] = {}
        self.respawns = 0
        self.timeouts = 0
        self.recoveries = 0
        self.started_workers = 0
        self.last_crash: BaseException | None = None
        self.last_worker_seconds = 0.0

    # -- the directory lock ----------------------------------------------------------------

    def _lock_directory(self) -> int:
        os.makedirs(self.path, exist_ok=True)
        lock_path = os.path.join(self.path, LOCK_NAME)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        give_up = time.monotonic() + self.options.lock_timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                if time.monotonic() >= give_up:
                    os.close(fd)
                    shutil.rmtree(self.log_dir, ignore_errors=True)
                    # `safechroma serve` writes "<pid>\nserve <url>\n" into the lock file.
                    try:
                        with open(lock_path) as f:
                            holder = f.read().split("\n")
                    except OSError:
                        holder = []
                    served = [ln[6:] for ln in holder if ln.startswith("serve ")]
                    if served:
                        raise DirectoryLockedError(
                            f"{self.path} is served by `safechroma serve` at {served[0]} "
                            f"(pid {holder[0]}); connect to it with "
                            "safechroma.SafeHttpClient(host, port) instead of opening the "
                            "directory (Chroma is not safe with two owners).",
                            path=self.path,
                            lock_path=lock_path,
                            address=served[0],
                        ) from None
                    raise DirectoryLockedError(
                        f"{self.path} is in use by another process (it holds {lock_path}); "
                        "Chroma is not safe with two owners. Close the other program, or pass "
                        "lock_timeout=<seconds> to wait for it.",
                        path=self.path,
                        lock_path=lock_path,
                    ) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd

    # -- calling ---------------------------------------------------------------------------

    def call(
        self,
        owner: _Remote,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        read: bool,
        replay: bool,
        retries: int,
        timeout: float | None,
        by_value: bool = False,
    ) -> Any:
        """Call ``method`` on ``owner``'s object in the worker and return its result.

        Args:
            read: the call is an idempotent read, retried on a fresh worker after a crash.
            replay: the call is a write that may be replayed (caller opted in).
            retries: how many retries reads (and replayable writes) get.
            timeout: deadline in seconds, or None.
            by_value: encode with cloudpickle (the call carries an embedding function).
        """
        try:
            return self._attempt(owner, method, args, kwargs, timeout, by_value, read)
        except (WorkerCrashedError, ProtocolError, _DamageRetry) as first:
            if not (read or replay) or retries <= 0:
                if isinstance(first, _DamageRetry):
                    raise first.error from None
                raise
            logger.info("retrying %s after: %s", method, first)

        retry_on = tenacity.retry_if_exception_type(
            (WorkerCrashedError, ProtocolError, _DamageRetry)
        )
        try:
            for attempt in tenacity.Retrying(
                stop=tenacity.stop_after_attempt(retries),
                retry=retry_on,
                reraise=True,
                sleep=lambda _s: None,
            ):
                with attempt:
                    return self._attempt(owner, method, args, kwargs, timeout, by_value, read)
        except _DamageRetry as exc:
            raise exc.error from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _attempt(
        self,
        owner: _Remote,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        by_value: bool,
        read: bool,
    ) -> Any:
        with self.lock:
            poison = _Fingerprint(owner, method, args, kwargs, by_value)
            worker = self._ready_worker()  # an open breaker says more than a poison refusal
            self._refuse_poison(poison, method)
            handle = self._handle_of(worker, owner)
            request = (Op.CALL, (handle, method, args, kwargs))
            try:
                result = self._exchange(worker, request, method, timeout, by_value)
            except WorkerError as exc:
                # Only a failure after the request was sent leaves a write's outcome unknown;
                # failures while starting or reopening happen before anything was sent.
                exc.outcome_unknown = exc._facts["outcome_unknown"] = not read
                if isinstance(exc, WorkerCrashedError):
                    self._strike(poison, exc)
                raise
            self.breaker.served()  # a served call ends a run of deaths without progress
            if self.standby is None:
                self._refill_standby()
            # Collections come back as ("collection", handle, model): tag them with the worker
            # they live in, under the lock, so a respawn in between cannot mix them up.
            if type(result) is tuple and result[:1] == ("collection",):
                return (*result, worker.serial)
            if (
                type(result) is list
                and result
                and type(result[0]) is tuple
                and (result[0][:1] == ("collection",))
            ):
                return [(*ref, worker.serial) for ref in result]
            return result

    def run(self, owner: _Remote, fn: Any, args: tuple[Any, ...], timeout: float | None) -> Any:
        """Run ``fn(chroma_client, *args)`` in the worker (fn is carried by cloudpickle)."""
        with self.lock:
            name = getattr(fn, "__name__", "run")
            poison = _Fingerprint(owner, "run_in_worker", (fn, *args), {}, True)
            worker = self._ready_worker()
            self._refuse_poison(poison, name)
            request = (Op.RUN, (self._handle_of(worker, owner), fn, args))
            try:
                result = self._exchange(worker, request, name, timeout, True)
            except WorkerCrashedError as exc:
                self._strike(poison, exc)
                raise
            self.breaker.served()
            return result

    # -- poison requests -------------------------------------------------------------------

    def _refuse_poison(self, call: _Fingerprint, operation: str) -> None:
        if self.breaker.poison and self.breaker.is_poison(call.digest()):
            raise PoisonRequestError(
                f"{operation} on {self.path} was not sent: this exact call (same target, method "
                f"and arguments) killed {self.options.breaker.poison_strikes} workers while "
                "the directory checked healthy, so it would likely kill the next one too. "
                "Other calls are served. reset_breaker() forgets it.",
                pid=None,
                operation=operation,
                outcome_unknown=False,
                fingerprint=call.digest().hex(),
                deaths=self.breaker.recent(time.monotonic()),
                sent=False,
            )

    def _strike(self, call: _Fingerprint, crash: WorkerCrashedError) -> None:
        """The worker died with ``call`` in flight; if it is now poison, say so instead.

        Only with a validator: it is what tells a call that kills healthy workers from a
        damaged directory that kills every worker (a recovery then forgives every strike). And
        only for deaths a call can cause (a crash signal, an exit): a SIGKILL or SIGTERM comes
        from outside (the OOM killer, an operator), so it says nothing about the call."""
        if self.options.validator is None or crash.signal in _NOT_SELF_INFLICTED:
            return
        digest = call.digest()
        if not self.breaker.strike(digest):
            return
        unknown = "It was a write: it may or may not have been applied. "
        raise PoisonRequestError(
            f"{crash.operation} on {self.path} killed the worker again (pid {crash.pid}, "
            f"{crash.signal or 'exit ' + str(crash.exitcode)}): this exact call killed "
            f"{self.options.breaker.poison_strikes} workers while the directory checked "
            "healthy, so it is not retried or sent again. Other calls are served. "
            + (unknown if crash.outcome_unknown else "")
            + "reset_breaker() forgets it.",
            pid=crash.pid,
            operation=crash.operation,
            outcome_unknown=crash.outcome_unknown,
            fingerprint=digest.hex(),
            deaths=self.breaker.recent(time.monotonic()),
            sent=True,
        ) from crash

    def ping(self) -> float:
        """One empty round trip; returns the seconds the worker spent (transport check)."""
        with self.lock:
            worker = self._ready_worker()
            self._exchange(worker, (Op.PING, None), "ping", self.options.timeout, False)
            return self.last_worker_seconds

    def _handle_of(self, worker: WorkerProcess, owner: _Remote) -> int:
        if owner._handle_serial != worker.serial:
            op, body, by_value = owner._reopen_request(self, worker)
            ref = self._exchange(worker, (op, body), "open", self.options.start_timeout, by_value)
            owner._handle = ref[1] if isinstance(ref, tuple) else int(ref)
            owner._handle_serial = worker.serial
        self._flush_released(worker)
        return owner._handle

    def release(self, serial: int, handle: int) -> None:
        """Forget a handle whose caller-side object is gone (sent with the next call).

        Called from garbage collection, in any thread: it only appends to a list.
        """
        self.released.append((serial, handle))

    def _flush_released(self, worker: WorkerProcess) -> None:
        if not self.released:
            return
        taken, self.released = self.released, []
        mine = [h for s, h in taken if s == worker.serial]
        if mine:
            self._exchange(worker, (Op.RELEASE, mine), "release", self.options.timeout, False)

    def _exchange(
        self,
        worker: WorkerProcess,
        request: tuple[Op, Any],
        operation: str,
        timeout: float | None,
        by_value: bool,
    ) -> Any:
        data, buffers = encode(request, by_value=by_value)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            frame = worker.exchange(data, buffers, deadline)
        except PeerDied:
            raise self._crashed(worker, operation) from None
        except PeerTimedOut:
            raise self._timed_out(worker, operation, timeout) from None
        except PeerMisbehaved as exc:
            raise self._misbehaved(worker, operation, str(exc)) from None
        try:
            reply = decode_reply(*frame)
            status, payload, seconds = reply
            status = Status(status)
            self.last_worker_seconds = float(seconds)
            if status is not Status.OK and not is_error_info(payload):
                raise ValueError(f"malformed error report {payload!r:.100}")
        except Exception as exc:  # noqa: BLE001 - any undecodable reply is a protocol error
            raise self._misbehaved(worker, operation, f"undecodable reply: {exc!r}") from None
        if operation not in _NOT_CALLS:
            worker.served += 1  # progress, for the breaker: it answered a call
        if status is Status.OK:
            self.calls += 1
            return payload
        self.errors += 1
        if status is Status.PANIC:
            self._retire(worker, "panic")
            raise ChromaPanicError(
                f"Chroma's Rust core panicked during {operation}: {payload[3]}. The worker was "
                "replaced; the next call gets a fresh one.",
                operation=operation,
            ) from RemoteTraceback(payload[4])
        error = rebuild_error(payload)
        if self.options.recover_on_damage_errors and _means_damage(payload):
            # The files are damaged: stop this worker so the validator and the recovery hook
            # can run on a quiet directory before the next call (reads retry after that).
            self._retire(worker, "damage")
            self._record_death("damage", worker, error, operation)
            self.pending_reason = "damage"
            self.pending_crash = error
            raise _DamageRetry(error)
        raise error

    # -- failures --------------------------------------------------------------------------

    def _crashed(self, worker: WorkerProcess, operation: str) -> WorkerCrashedError:
        code = worker.wait(2.0)
        if code is None:  # socket closed but still running: it is of no use any more
            worker.kill()
        return self._death(
            worker,
            operation,
            f"during {operation}. Your process is fine; the next call starts a fresh worker "
            "after checking the directory. Reads are retried; a write in flight may or may not "
            "have been applied.",
        )

    def _death(self, worker: WorkerProcess, operation: str, what_next: str) -> WorkerCrashedError:
        """Describe a reaped worker's death as an error, and count it."""
        code = worker.popen.returncode
        sig = signal_name(code)
        tail = worker.log_tail()
        how = f"was killed by {sig}({code})" if sig else f"exited with status {code}"
        error = WorkerCrashedError(
            f"safechroma worker (pid {worker.pid}) for {self.path} {how} {what_next}"
            + (f"\n--- worker log (tail) ---\n{tail}" if tail.strip() else ""),
            pid=worker.pid,
            exitcode=code,
            signal=sig,
            operation=operation,
            crash_log=tail,
            outcome_unknown=False,
        )
        self._drop(worker)
        self._record_death(sig or "exit", worker, error, operation)
        return error

    def _timed_out(
        self, worker: WorkerProcess, operation: str, timeout: float | None
    ) -> WorkerTimeoutError:
        worker.kill()
        self.timeouts += 1
        error = WorkerTimeoutError(
            f"{operation} on {self.path} did not finish within {timeout} s; the worker "
            f"(pid {worker.pid}) was killed so it cannot keep the directory. The next call "
            "starts a fresh worker. Raise the deadline with timeout= or "
            "safechroma.call_timeout() if the call is legitimately long.",
            pid=worker.pid,
            operation=operation,
            timeout=timeout,
            outcome_unknown=False,
        )
        self._drop(worker)
        self._record_death("timeout", worker, error, operation)
        self._emit("worker_timeout", worker.pid, operation=operation, timeout=timeout)
        return error

    def _misbehaved(self, worker: WorkerProcess, operation: str, why: str) -> ProtocolError:
        worker.kill()
        error = ProtocolError(
            f"safechroma worker (pid {worker.pid}) sent an invalid reply to {operation}: "
            f"{why}. It was killed and will be replaced.",
            pid=worker.pid,
            operation=operation,
            outcome_unknown=False,
        )
        self._drop(worker)
        self._record_death("protocol", worker, error, operation)
        self._emit("protocol_error", worker.pid, operation=operation, why=why)
        return error

    def _drop(self, worker: WorkerProcess) -> None:
        worker.close()
        if self.worker is worker:
            self.worker = None
            if self.state is State.READY:
                self.state = State.NO_WORKER

    def _retire(self, worker: WorkerProcess, why: str) -> None:
        """Stop a live worker: ask it to exit, kill it if it does not."""
        try:
            worker.exchange(*encode((Op.EXIT, None)), time.monotonic() + 5.0)
        except (PeerDied, PeerTimedOut, PeerMisbehaved, OSError):
            pass
        if worker.wait(5.0) is None:
            worker.kill()
        code = worker.popen.returncode
        if code:
            # Chroma's runtime can abort while the interpreter exits (chroma-core/chroma#6852).
            # The worker had finished its work: log it, never raise it, never count it as a
            # death (a clean stop is not a crash loop).
            self._emit(
                "worker_exit_abnormal",
                worker.pid,
                why=why,
                exitcode=code,
                signal=signal_name(code),
                log=worker.log_tail(1000),
            )
        self._drop(worker)
        self._emit("worker_retired", worker.pid, why=why)

    def _record_death(
        self, kind: str, worker: WorkerProcess, error: BaseException, operation: str
    ) -> None:
        now = time.monotonic()
        self.death_counts[kind] = self.death_counts.get(kind, 0) + 1
        self.last_crash = error
        what = f"pid {worker.pid}: {kind} during {operation} after {worker.served} calls"
        opened = self.breaker.record(now, what, served=worker.served)
        self.pending_reason = "crash"
        self.pending_crash = error
        if kind not in ("damage", "timeout", "protocol", "panic"):
            self._emit(
                "worker_died",
                worker.pid,
                operation=operation,
                signal=kind,
                exitcode=worker.popen.returncode,
                served=worker.served,
            )
        if opened:
            self.state = State.BROKEN
            self._emit(
                "breaker_open",
                None,
                why=self.breaker.reason(now),
                deaths=self.breaker.recent(now),
            )

    # -- starting a worker -----------------------------------------------------------------

    def _ready_worker(self) -> WorkerProcess:
        worker = self.worker
        if self.state is State.READY and worker is not None and self.owner == os.getpid():
            if not worker.alive():
                # It died between calls (chroma-core/chroma#6984: a background thread that
                # segfaults with no call running). Nothing was in flight, so no caller gets an
                # error: count the death and replace it before this call is sent.
                self._died_idle(worker)
            elif self._worn_out(worker):
                self._retire(worker, "recycled")
                self._emit("worker_recycled", worker.pid, served=worker.served)
                self.pending_reason = "recycle"
            else:
                return worker
        if self.owner != os.getpid():
            # A forked child shares the parent's socket: a call from it would interleave
            # frames with the parent's and hand replies to the wrong process.
            raise SafeChromaError(
                f"this safechroma client for {self.path} belongs to process {self.owner}; "
                "create a new client after fork()"
            )
        if self.state is State.CLOSED:
            raise ClientClosedError(f"the safechroma client for {self.path} is closed")
        if self.state is State.BROKEN:
            now = time.monotonic()
            blocked = self.breaker.blocked_for(now)
            if blocked is not None:
                raise CrashLoopError(
                    f"the worker for {self.path} is in a crash loop "
                    f"({self.breaker.reason(now)}), so no new worker is started for "
                    f"{blocked:.1f} s more. Check the directory with "
                    f"`safechroma check {self.path}`; call reset_breaker() to try at once.",
                    path=self.path,
                    deaths=self.breaker.recent(now),
                    retry_after=blocked,
                )
            self.state = State.NO_WORKER
            self._emit("breaker_reset", None, why="cooldown")
        if self.breaker.consecutive > 1:
            # Back off between consecutive respawns of workers that made no progress (the
            # first respawn is immediate; a worker that served calls ends the run).
            state = tenacity.RetryCallState(None, None, (), {})  # type: ignore[arg-type]
            state.attempt_number = self.breaker.consecutive - 1
            self.options.sleep(float(self.options.respawn_wait(state)))
        self._check_and_recover()
        return self._start()

    def _check_and_recover(self) -> None:
        validator = self.options.validator
        reason = self.pending_reason or "crash"
        if reason == "recycle":
            return  # the old worker stopped cleanly between calls: nothing to suspect
        if reason == "start" and self.options.recovery is not None:
            # A repair interrupted between quarantine and write-back left its salvage file
            # behind (safechroma.storage.recovery); finish it with the first worker.
            from ..storage.recovery import pending_salvage_files

            self.pending_salvage.extend(
                f for f in pending_salvage_files(self.path) if f not in self.pending_salvage
            )
        if validator is None:
            return
        attempt = max(1, self.breaker.consecutive)
        ctx = HookContext(self.path, reason, self.pending_crash, attempt)  # type: ignore[arg-type]
        report = validator(ctx)
        if getattr(report, "status", None) == "incompatible":
            # A newer chromadb wrote it (chroma#5909): no worker, no repair, nothing written.
            from ..storage.validate import incompatible_error

            raise incompatible_error(report)
        healthy = not _is_damaged(report)
        self._emit("validated", None, healthy=healthy, report=report, reason=reason)
        if healthy:
            return
        recovery = self.options.recovery
        if recovery is None:
            raise RecoveryError(
                f"{self.path} is damaged and no recovery hook is set: {_summary(report)}. "
                f"Run `safechroma repair {self.path}`.",
                path=self.path,
                report=report,
            )
        ctx = HookContext(self.path, ctx.reason, ctx.crash, ctx.attempt, report)
        try:
            result = recovery(ctx)
        except Exception as exc:
            self._emit("recovery_failed", None, error=repr(exc))
            raise RecoveryError(
                f"{self.path} is damaged ({_summary(report)}) and recovery failed: {exc}",
                path=self.path,
                report=report,
            ) from exc
        if getattr(result, "status", None) == "not_repairable":
            self._emit("recovery_failed", None, report=result)
            raise RecoveryError(
                f"{self.path} is damaged ({_summary(report)}) and could not be repaired: "
                f"{getattr(result, 'message', result)}",
                path=self.path,
                report=report,
            )
        self.recoveries += 1
        self.breaker.forgive()  # the damage explains the deaths: no call is poison for them
        for salvage in getattr(result, "salvage_files", None) or []:
            if salvage not in self.pending_salvage:
                self.pending_salvage.append(salvage)
        self._emit("recovered", None, report=result)

    def _start(self) -> WorkerProcess:
        wal.maintain(self.path)  # no worker has the directory open: compact the kept WAL
        worker = self._take_standby() or self._spawn()
        settings, tenant, database = self.primary
        try:
            ref = self._exchange(
                worker,
                (Op.OPEN, (self.path, settings, tenant, database, self.options.worker_init)),
                "start",
                self.options.start_timeout,
                True,
            )
        except WorkerError as exc:
            raise WorkerStartError(
                f"a new worker for {self.path} could not open it: {exc}",
                pid=worker.pid,
                operation="start",
                outcome_unknown=False,
                exitcode=getattr(exc, "exitcode", None),
                signal=getattr(exc, "signal", None)
                or ("timeout" if isinstance(exc, WorkerTimeoutError) else None),
                crash_log=getattr(exc, "crash_log", ""),
            ) from exc
        except Exception:
            self._retire(worker, "open failed")
            raise
        self.primary_handle = int(ref[1])
        self.chroma_version = str(ref[2])
        self.worker = worker
        self.state = State.READY
        self.started_workers += 1
        if self.started_workers > 1:
            self.respawns += 1
        self.pending_reason = None
        self.pending_crash = None
        self._emit("worker_started", worker.pid, serial=worker.serial)
        self._write_back_salvage(worker)
        return worker

    def _refill_standby(self) -> None:
        # Spawned only after the new worker has served a call: on two cores a standby importing
        # chromadb right away would slow the very call a crashed worker's caller waits for.
        if self.options.standby and self.standby is None and self.state is State.READY:
            self.standby = self._spawn()

    def _write_back_salvage(self, worker: WorkerProcess) -> None:
        reembed = self.options.reembed
        while self.pending_salvage:
            path = self.pending_salvage[0]
            fn: Any = "safechroma.storage.recovery:apply_salvage"
            if reembed is not None:
                # Records whose vector exists nowhere are re-embedded from their documents by
                # the caller's embedding function, inside the worker.
                from ..storage.recovery import apply_salvage

                fn = functools.partial(apply_salvage, reembed=reembed)
            summary = self._exchange(
                worker,
                (Op.RUN, (self.primary_handle, fn, (path,))),
                "apply_salvage",
                None,
                reembed is not None,
            )
            self.pending_salvage.pop(0)
            self._emit("salvage_applied", worker.pid, file=path, summary=summary)

    def _spawn(self) -> WorkerProcess:
        return WorkerProcess(
            log_dir=self.log_dir,
            lock_fd=self.lock_fd,
            memory_limit=self.options.memory_limit,
            max_reply_bytes=self.options.max_reply_bytes,
            file_limit=file_size_limit(self.path, self.options.max_file_bytes),
        )

    # -- recycling (gunicorn's max_requests; a resident-memory ceiling) --------------------

    def _worn_out(self, worker: WorkerProcess) -> bool:
        """Whether to replace a healthy worker between calls (no caller sees it)."""
        max_requests = self.options.max_requests
        if max_requests is not None and worker.served >= max_requests:
            return True
        ceiling = self.options.max_worker_rss
        if ceiling is None:
            return False
        now = time.monotonic()
        if now - worker.rss_checked < _RSS_CHECK_EVERY:
            return False  # reading /proc costs ~20 us: not on every call
        worker.rss_checked = now
        rss = worker.rss_bytes()
        return rss is not None and rss > ceiling

    def _died_idle(self, worker: WorkerProcess) -> None:
        self._death(
            worker,
            "no call (between calls)",
            "between calls; it was replaced before the next call, which no caller noticed.",
        )

    def _take_standby(self) -> WorkerProcess | None:
        standby, self.standby = self.standby, None
        if standby is not None and not standby.alive():
            standby.wait(None)
            standby.close()
            return None
        return standby

    def reset_breaker(self) -> None:
        """Close the crash-loop breaker: the next call may start a worker at once."""
        with self.lock:
            self.breaker.reset()
            if self.state is State.BROKEN:
                self.state = State.NO_WORKER
                self._emit("breaker_reset", None, why="manual")

    # -- closing ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the worker and the standby, release the lock. Idempotent."""
        with self.lock:
            if self.state is State.CLOSED:
                return
            self.state = State.CLOSED
            if self.worker is not None:
                self._retire(self.worker, "closed")
            if self.standby is not None:
                self.standby.kill()
                self.standby.close()
                self.standby = None
            if self.started_workers:
                # The worker is gone, the lock still held. Never on a directory no worker ever
                # opened (a refused one, e.g. written by a newer chromadb: nothing is written).
                wal.maintain(self.path)
            os.close(self.lock_fd)
            shutil.rmtree(self.log_dir, ignore_errors=True)

    # -- observability ---------------------------------------------------------------------

    def stats(self) -> Stats:
        worker = self.worker
        return Stats(
            path=self.path,
            calls=self.calls,
            errors=self.errors,
            deaths=dict(self.death_counts),
            respawns=self.respawns,
            timeouts=self.timeouts,
            recoveries=self.recoveries,
            last_crash=self.last_crash,
            worker_pid=worker.pid if worker else None,
            worker_uptime=time.monotonic() - worker.started if worker else None,
            last_call_worker_seconds=self.last_worker_seconds,
            worker_rss=worker.rss_bytes() if worker else None,
            breaker_open=self.state is State.BROKEN,
        )

    def _emit(self, kind: str, pid: int | None, **detail: Any) -> None:
        event = Event(kind, self.path, pid, detail)
        level = logging.WARNING if kind in _LOUD else logging.INFO
        logger.log(level, "%s %s pid=%s %s", kind, self.path, pid, _brief(detail))
        if self.options.on_event is not None:
            try:
                self.options.on_event(event)
            except Exception:  # noqa: BLE001 - a broken callback must not break the client
                logger.exception("safechroma on_event callback failed")


# Signals a worker does not raise by running a call: they come from outside (the OOM killer, an
# operator, a container runtime), so a death by one is never a strike against the call in flight.
_NOT_SELF_INFLICTED: Final = frozenset(
    {"SIGKILL", "SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGPIPE", "SIGUSR1", "SIGUSR2"}
)

# How often a worker's resident memory is read when max_worker_rss is set (seconds).
_RSS_CHECK_EVERY: Final = 1.0


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
        st = os.statvfs(path)
        free = st.f_bavail * st.f_frsize
    except OSError:
        return None
    return min(largest + max(64 << 20, free // 2), plausible_max_file_bytes(path))


# Exchanges that are not a caller's call: a worker that only did these made no progress.
_NOT_CALLS: Final = frozenset({"start", "open", "release", "apply_salvage"})

_LOUD: Final = frozenset(
    {
        "worker_died",
        "worker_timeout",
        "protocol_error",
        "recovery_failed",
        "breaker_open",
        "recovered",
    }
)


class _Fingerprint:
    """Names one call by its target, method and arguments, for the poison-request ledger.

    The digest is computed only when it is needed: when the worker died with the call in
    flight, or when some call is already poison (then every call is checked)."""

    __slots__ = ("_parts", "_digest")

    def __init__(
        self, owner: _Remote, method: str, args: tuple[Any, ...], kwargs: Any, by_value: bool
    ) -> None:
        self._parts = (owner, method, args, kwargs, by_value)
        self._digest: bytes | None = None

    def digest(self) -> bytes:
        if self._digest is None:
            owner, method, args, kwargs, by_value = self._parts
            target = (type(owner).__name__, str(getattr(owner, "id", "")))
            h = hashlib.blake2b(digest_size=16)
            try:
                data, buffers = encode((target, method, args, kwargs), by_value=by_value)
                h.update(data)
                for buf in buffers:
                    h.update(buf)
            except Exception:  # noqa: BLE001 - an unencodable call never reached a worker
                h.update(repr((target, method, args, kwargs)).encode())
            self._digest = h.digest()
        return self._digest


class _DamageRetry(Exception):
    """Internal: Chroma raised an error meaning on-disk damage; validate and maybe retry."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def _brief(detail: dict[str, Any]) -> str:
    return " ".join(f"{k}={v!r}"[:200] for k, v in detail.items() if k != "report")


def _summary(report: Any) -> str:
    for name in ("summary", "describe"):
        fn = getattr(report, name, None)
        if callable(fn):
            return str(fn())
    return str(report)[:500]


def _is_damaged(report: Any) -> bool:
    """A report means damage only when it says so: "cannot check" (a fresh directory, a busy
    SQLite) is never a reason to touch the files."""
    status = getattr(report, "status", None)
    if status is not None:
        return bool(status == "damaged")
    return not bool(getattr(report, "healthy", True))


def _means_damage(info: ErrorInfo) -> bool:
    module, qualname, _args, message, _tb = info
    if module.startswith("chromadb") and qualname == "InternalError":
        return bool(_DAMAGE.search(message))
    if module == "sqlite3" and qualname == "DatabaseError":
        return bool(_DAMAGE.search(message))
    return False


def rebuild_error(info: ErrorInfo) -> BaseException:
    """Rebuild an exception reported by the worker as the same type, when it is safe to.

    The closed set of types the caller rebuilds: exception classes it has *already imported*
    (builtins, chromadb's errors, httpx's, the caller's own embedding function's ...), looked up
    in ``sys.modules`` without importing anything, and constructed from plain arguments
    (strings, numbers). Anything else arrives as :class:`RemoteError` naming the type.
    """
    module, qualname, args, message, tb = info
    mod = builtins if module == "builtins" else sys.modules.get(module)
    cls = getattr(mod, qualname, None) if mod is not None and "." not in qualname else None
    error: BaseException
    if (
        isinstance(cls, type)
        and issubclass(cls, Exception)
        and not issubclass(cls, SafeChromaError)
        and all(a is None or isinstance(a, (str, int, float, bool, bytes)) for a in args)
    ):
        try:
            error = cls(*args)
        except Exception:  # noqa: BLE001 - a constructor we cannot satisfy
            error = RemoteError(f"{module}.{qualname}: {message}", type_name=f"{module}.{qualname}")
    else:
        error = RemoteError(f"{module}.{qualname}: {message}", type_name=f"{module}.{qualname}")
    error.__cause__ = RemoteTraceback(tb)
    return error


# -- one supervisor per directory per process ----------------------------------------------

_registry: dict[str, Supervisor] = {}
# Reentrant: a client finalizer (garbage collection can run it inside acquire()) releases
# through this lock too.
_registry_lock = threading.RLock()


def acquire(path: str, options: Options, primary: tuple[Any, str, str]) -> Supervisor:
    """The supervisor for ``path`` in this process, created (and locked) on first use."""
    key = os.path.realpath(path)
    with _registry_lock:
        sup = _registry.get(key)
        if sup is None or sup.state is State.CLOSED:
            sup = Supervisor(key, options, primary)
            _registry[key] = sup
        sup.refs += 1
        return sup


def release(sup: Supervisor) -> None:
    """Drop one reference; the last one closes the worker and releases the lock."""
    with _registry_lock:
        sup.refs -= 1
        if sup.refs > 0:
            return
        if _registry.get(sup.path) is sup:
            del _registry[sup.path]
    sup.close()


@atexit.register
def _close_all() -> None:
    with _registry_lock:
        sups = list(_registry.values())
        _registry.clear()
    for sup in sups:
        try:
            sup.close()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            logger.exception("closing %s at exit failed", sup.path)
