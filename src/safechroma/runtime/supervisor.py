"""Lifecycle of the worker that owns one persist directory: start, call, crash, respawn.

One :class:`Supervisor` exists per persist directory per process (see :func:`acquire`); every
``SafeClient`` and ``SafeCollection`` on that directory shares it. Its parts:

- :class:`~.lock.DirectoryLock`: the directory has one owner, across processes;
- :class:`~.breaker.Breaker`: when to stop starting workers;
- :class:`~.channels.ChannelPool`: the channels to the current worker, one call at a time each;
- this module: the one place that changes the worker's state. Callers never start, stop or
  replace a worker themselves: they *lease* a channel of the live worker, make one exchange, and
  give it back. When a worker breaks, every caller in flight sees it on its own channel and gets
  its own precise error, but the death is recorded once (the first caller to see it records it,
  under the generation's own lock), and the replacement happens once: the next caller that
  needs a worker takes :attr:`Supervisor._life`, waits until no call is in flight on the old
  worker, stops it, runs the validator (and, on damage, the recovery hook), and starts one new
  worker; callers that were waiting meanwhile share its outcome (the worker, or the error).
  The shape is CPython's ``concurrent.futures.process``, where one manager makes every state
  change and a broken worker fails every pending call at once.

The call path, in order: :meth:`Supervisor.call` -> ``_attempt`` -> ``_lease`` (a channel of a
ready worker, starting one if needed) -> ``_handle_of`` (reopen the caller's object in a fresh
worker) -> ``_exchange`` (encode, send, wait on the socket and the worker's pidfd, decode) ->
``_give_back``. Reads are retried on the next worker; a write whose request was sent raises with
``outcome_unknown=True``.

States, as the supervisor sees its worker::

    NO_WORKER   no usable worker: the next call replaces it (validate, recover, start)
    READY       a live worker has opened the directory and serves calls
    BROKEN      too many deaths: the breaker is open, calls fail fast with CrashLoopError
    CLOSED      closed by the caller: calls raise ClientClosedError
"""

from __future__ import annotations

import atexit
import builtins
import collections
import copy
import enum
import functools
import hashlib
import logging
import os
import pickle
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

# template: imported for its exit hook (hang up on the worker template), which must run after
# this module's _close_all: atexit runs hooks last-registered first.
from . import functions, rendezvous, template  # noqa: F401
from .breaker import Breaker
from .channels import ChannelPool
from .functions import FUNCTIONS, FunctionRef
from .lock import LOCK_NAME, DirectoryLock, being_shared, locked_error
from .protocol import ErrorInfo, Op, Status, decode_reply, encode, is_error_info
from .transport import (
    AttachedWorker,
    Channel,
    PeerDied,
    PeerMisbehaved,
    PeerTimedOut,
    WorkerProcess,
)

__all__ = ["LOCK_NAME", "Supervisor", "acquire", "file_size_limit", "rebuild_error", "release"]

logger = logging.getLogger("safechroma")
# A library does not configure logging; without a handler Python would print WARNINGs to
# stderr through its last-resort handler.
logger.addHandler(logging.NullHandler())

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

    def _reopen_request(self, sup: Supervisor, lease: Lease) -> tuple[Op, Any, bool]:
        raise NotImplementedError


class _End:
    """How a worker's life ended: facts shared by every call that was in flight."""

    def __init__(
        self,
        kind: str,
        exitcode: int | None,
        signal: str | None,
        tail: str,
        operation: str,
        in_flight: int,
    ) -> None:
        self.kind = kind  # "SIGKILL", ..., "exit", "timeout", "protocol"
        self.in_flight = in_flight  # calls holding a channel of the worker when it was seen
        self.exitcode = exitcode
        self.signal = signal
        self.tail = tail
        self.operation = operation  # the call during which it was first seen


class _Generation:
    """One worker's life as the supervisor sees it: its process, its channels, its calls."""

    def __init__(self, process: WorkerProcess) -> None:
        self.process = process
        self.pool = ChannelPool(process)
        self.serial = process.serial
        self.inflight = 0  # leases out; changed under Supervisor._cond
        self.retiring: str | None = None  # why it is stopped once idle (panic, damage, ...)
        self.end: _End | None = None  # set once, under end_lock, by the first to see it
        self.end_lock = threading.Lock()
        # Embedding functions (runtime/functions.py): tokens this worker has built, and the
        # caller's registry signature it was last sent.
        self.defined: set[str] = set()
        self.registry = -1


class Lease:
    """A channel of one worker, held by one caller for one call (and its reopen/release)."""

    __slots__ = ("gen", "channel", "broken")

    def __init__(self, gen: _Generation, channel: Channel) -> None:
        self.gen = gen
        self.channel = channel
        self.broken = False


class Supervisor:
    """Owns the worker of one persist directory. Thread-safe; calls run in parallel."""

    def __init__(self, path: str, options: Options, primary: tuple[Any, str, str]) -> None:
        self.path = path
        self.owner = os.getpid()
        self.options = options
        self.primary = primary  # settings, tenant, database of the first client
        self.refs = 0
        # Shared (the default): the worker is this directory's, for every process of this
        # user (see _join_or_start); exclusive: this process holds the lock for its whole life.
        self.shared = not options.exclusive
        self.lock_path = os.path.join(path, LOCK_NAME)
        self._cycle_fd: int | None = None  # the lock, held while this process replaces the worker
        self.dir_lock: DirectoryLock | None = None
        if self.shared:
            os.makedirs(path, exist_ok=True)
            self.address = rendezvous.socket_path(path)
            self.log_dir = rendezvous.socket_folder()  # where every sharing process can read it
        else:
            self.log_dir = tempfile.mkdtemp(prefix="safechroma-")
            try:
                self.dir_lock = DirectoryLock(path, options.lock_timeout)
            except BaseException:
                shutil.rmtree(self.log_dir, ignore_errors=True)
                raise
        self.breaker = Breaker(options.breaker)
        # _cond guards the fields below and every _Generation.inflight; _life is held by the
        # one thread that replaces the worker (never taken while holding _cond).
        self._cond = threading.Condition(threading.RLock())
        self._life = threading.RLock()
        self._reopen = threading.RLock()
        self._suspects = threading.Lock()  # retried calls run one at a time
        self._alone: threading.Thread | None = None  # the retry running alone, if any
        self.state = State.NO_WORKER
        self._gen: _Generation | None = None
        self.standby: WorkerProcess | None = None
        self._refilling = False
        self._leased = 0  # leases out, over every generation
        self._replacements = 0  # finished attempts to start a worker
        self._replace_error: BaseException | None = None  # how the last attempt failed
        self.primary_handle = 0
        self.pending_reason: str | None = "start"
        self.pending_crash: BaseException | None = None
        self.pending_salvage: list[str] = []
        self.released: collections.deque[tuple[int, int]] = collections.deque()
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

    def calls_in_flight(self) -> int:
        """Calls holding a channel of any worker, old or new, right now."""
        return self._leased

    @property
    def lock_fd(self) -> int | None:
        if self.dir_lock is not None:
            return self.dir_lock.fd
        return self._cycle_fd

    @property
    def worker(self) -> WorkerProcess | None:
        gen = self._gen
        return gen.process if gen is not None and gen.end is None else None

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
        attempts = 1 + max(0, retries) if (read or replay) else 1
        poison = _Fingerprint(owner, method, args, kwargs, by_value)
        suspect = False
        attempt = 0
        refused = 0
        while attempt < attempts:
            attempt += 1
            try:
                if not suspect:
                    return self._attempt(owner, method, args, kwargs, timeout, read, poison)
                # It was in flight at a death the call could have caused (a crash signal, an
                # exit): a suspect. Suspects run one at a time and alone on the worker (other
                # calls wait), so a call that kills every worker is told from the calls that
                # merely ran beside it (see _strike).
                with self._suspects:
                    with self._cond:
                        self._alone = threading.current_thread()
                    try:
                        return self._attempt(
                            owner, method, args, kwargs, timeout, read, poison, suspect=True
                        )
                    finally:
                        with self._cond:
                            self._alone = None
                            self._cond.notify_all()
            except _Retired:
                refused += 1
                if refused > _MAX_REFUSALS:
                    raise WorkerCrashedError(
                        f"{method} on {self.path} was refused unrun by {refused} stopping "
                        "workers in a row",
                        pid=None,
                        operation=method,
                        outcome_unknown=False,
                    ) from None
                attempt -= 1  # never run: it does not use up a retry
                continue
            except (WorkerCrashedError, ProtocolError, _DamageRetry) as exc:
                if attempt >= attempts:
                    if isinstance(exc, _DamageRetry):
                        raise exc.error from None
                    raise
                suspect = (
                    type(exc) is WorkerCrashedError
                    and exc.signal not in _NOT_SELF_INFLICTED
                    and self.options.validator is not None
                )
                logger.info("retrying %s after: %s", method, exc)
        raise AssertionError("unreachable")  # pragma: no cover

    def _attempt(
        self,
        owner: _Remote,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        read: bool,
        poison: _Fingerprint,
        *,
        suspect: bool = False,
    ) -> Any:
        lease = self._lease(alone=suspect)
        try:
            self._refuse_poison(poison, method)
            handle = self._handle_of(lease, owner, method)
            # Before the call is sent: a death here leaves no write's outcome unknown.
            self._send_functions(lease, (args, kwargs) if poison.by_value else None)
            request = (Op.CALL, (handle, method, args, kwargs))
            try:
                result = self._exchange(lease, request, method, timeout, poison.by_value)
            except WorkerError as exc:
                # Only a failure after the request was sent leaves a write's outcome unknown;
                # failures while starting or reopening happen before anything was sent.
                exc.outcome_unknown = exc._facts["outcome_unknown"] = not read
                if isinstance(exc, WorkerCrashedError):
                    self._strike(poison, exc, lease)
                raise
        finally:
            self._give_back(lease)
        self._served()
        # Collections come back as ("collection", handle, model): tag them with the worker
        # they live in, so a respawn in between cannot mix them up.
        if type(result) is tuple and result[:1] == ("collection",):
            return (*result, lease.gen.serial)
        if (
            type(result) is list
            and result
            and type(result[0]) is tuple
            and (result[0][:1] == ("collection",))
        ):
            return [(*ref, lease.gen.serial) for ref in result]
        return result

    def run(self, owner: _Remote, fn: Any, args: tuple[Any, ...], timeout: float | None) -> Any:
        """Run ``fn(chroma_client, *args)`` in the worker (fn is carried by cloudpickle)."""
        name = getattr(fn, "__name__", "run")
        poison = _Fingerprint(owner, "run_in_worker", (fn, *args), {}, True)
        lease = self._lease()
        try:
            self._refuse_poison(poison, name)
            request = (Op.RUN, (self._handle_of(lease, owner), fn, args))
            self._send_functions(lease, args)
            try:
                result = self._exchange(lease, request, name, timeout, True)
            except WorkerCrashedError as exc:
                self._strike(poison, exc, lease)
                raise
        finally:
            self._give_back(lease)
        self._served()
        return result

    def ping(self) -> float:
        """One empty round trip; returns the seconds the worker spent (transport check)."""
        lease = self._lease()
        try:
            seconds: float = self._exchange(
                lease, (Op.PING, None), "ping", self.options.timeout, False, seconds=True
            )
        finally:
            self._give_back(lease)
        return seconds

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

    def _strike(self, call: _Fingerprint, crash: WorkerCrashedError, lease: Lease) -> None:
        """The worker died with ``call`` in flight; if it is now poison, say so instead.

        Only with a validator: it is what tells a call that kills healthy workers from a
        damaged directory that kills every worker (a recovery then forgives every strike).
        With calls in parallel, a death strikes a call only when the call was alone on the
        worker: the calls that merely ran beside the culprit are not blamed. Retries run alone
        (see :meth:`call`), so a call that kills every worker is struck by its retries. A death
        caused by a deadline or a bad reply strikes nobody: its cause is known. Nor does a
        SIGKILL or SIGTERM: it comes from outside (the OOM killer, an operator), so it says
        nothing about the call.
        """
        end = lease.gen.end
        if self.options.validator is None or end is None or end.kind in ("timeout", "protocol"):
            return
        if crash.signal in _NOT_SELF_INFLICTED:
            return
        if end.in_flight > 1:
            return
        digest = call.digest()
        with self._cond:
            poisoned = self.breaker.strike(digest)
        if not poisoned:
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

    # -- leases ----------------------------------------------------------------------------

    def _lease(self, alone: bool = False) -> Lease:
        """A channel of a ready worker; replaces the worker first if there is none.

        ``alone``: wait until no other call is in flight, and keep new calls waiting until this
        one is given back (a retry after a death, see :meth:`call`).
        """
        while True:
            stale: _Generation | None = None
            with self._cond:
                self._check_usable()
                if self._alone is not None and self._alone is not threading.current_thread():
                    self._cond.wait()  # a retry runs alone: wait for it
                    continue
                if alone and self._leased:
                    self._cond.wait()  # let the calls in flight finish first
                    continue
                gen = self._gen
                if self.state is State.READY and gen is not None and _usable(gen):
                    if gen.process.alive() and not self._worn_out(gen.process):
                        gen.inflight += 1
                        self._leased += 1
                        break
                    stale = gen
                seen = self._replacements
            if stale is not None:
                self._replace_stale(stale)
                continue
            self._replace_or_share(seen)
        try:
            return Lease(gen, gen.pool.checkout())
        except PeerDied:
            # The worker is gone before anything was sent: a death like any other.
            with self._cond:
                gen.inflight -= 1
                self._leased -= 1
                self._cond.notify_all()
            raise self._died(gen, "open") from None

    def _replace_stale(self, gen: _Generation) -> None:
        """The worker died between calls, or has served enough: have it replaced."""
        if not gen.process.alive():
            # It died between calls (chroma-core/chroma#6984: a background thread that
            # segfaults with no call running). The death is counted once; this caller gets
            # no error: the worker is replaced before its call is sent.
            self._died_idle(gen)
        elif self._retire(gen, "recycled"):
            # Replaced between calls: calls in flight finish on it, no caller sees it.
            self._emit("worker_recycled", gen.process.pid, served=gen.process.served)
            with self._cond:
                self.pending_reason = "recycle"

    def _give_back(self, lease: Lease) -> None:
        gen = lease.gen
        if lease.broken or gen.end is not None:
            gen.pool.discard(lease.channel)
        else:
            gen.pool.checkin(lease.channel)
        with self._cond:
            gen.inflight -= 1
            self._leased -= 1
            if not gen.inflight:
                self._cond.notify_all()

    def _served(self) -> None:
        if self.breaker.consecutive:
            with self._cond:
                self.breaker.served()  # a served call ends a run of deaths without progress
        if (
            self.options.standby
            and not self.shared
            and self.standby is None
            and not self._refilling
        ):
            self._refill_standby()

    def _closed(self) -> bool:
        return self.state is State.CLOSED

    def _check_usable(self) -> None:
        if self.owner != _this_pid:
            # A forked child shares the parent's sockets: a call from it would interleave
            # frames with the parent's and hand replies to the wrong process.
            raise SafeChromaError(
                f"this safechroma client for {self.path} belongs to process {self.owner}; "
                "create a new client after fork()"
            )
        if self.state is State.CLOSED:
            raise ClientClosedError(f"the safechroma client for {self.path} is closed")

    def _handle_of(self, lease: Lease, owner: _Remote, operation: str = "open") -> int:
        if owner._handle_serial != lease.gen.serial:
            # One reopen at a time: two threads reopening one collection would leave two
            # handles in the worker and race on the caller's slot.
            with self._reopen:
                if owner._handle_serial != lease.gen.serial:
                    op, body, by_value = owner._reopen_request(self, lease)
                    self._send_functions(lease, body if by_value else None)
                    ref = self._exchange(
                        lease, (op, body), "open", self.options.start_timeout, by_value
                    )
                    owner._handle = ref[1] if isinstance(ref, tuple) else int(ref)
                    owner._handle_serial = lease.gen.serial
        if self.released:
            self._flush_released(lease, operation)
        return owner._handle

    def release(self, serial: int, handle: int) -> None:
        """Forget a handle whose caller-side object is gone (sent with the next call).

        Called from garbage collection, in any thread: it only appends to a deque.
        """
        self.released.append((serial, handle))

    def _flush_released(self, lease: Lease, operation: str) -> None:
        """Send the handles released since the last call, ahead of ``operation`` (the call it
        precedes names a death seen here: that call is what the caller was waiting for)."""
        mine: list[int] = []
        while True:
            try:
                serial, handle = self.released.popleft()
            except IndexError:
                break
            if serial == lease.gen.serial:
                mine.append(handle)
        if mine:
            self._exchange(lease, (Op.RELEASE, mine), operation, self.options.timeout, False)

    # -- one exchange ----------------------------------------------------------------------

    def _exchange(
        self,
        lease: Lease,
        request: tuple[Op, Any],
        operation: str,
        timeout: float | None,
        by_value: bool,
        *,
        seconds: bool = False,
    ) -> Any:
        # The operation goes as a plain int: an enum member would be pickled by reference.
        data, buffers = encode((request[0].value, request[1]), by_value=by_value)
        deadline = None if timeout is None else time.monotonic() + timeout
        gen = lease.gen
        try:
            frame = lease.channel.exchange(data, buffers, deadline)
        except PeerDied:
            lease.broken = True
            raise self._died(gen, operation) from None
        except PeerTimedOut:
            lease.broken = True
            raise self._timed_out(gen, operation, timeout) from None
        except PeerMisbehaved as exc:
            lease.broken = True
            raise self._misbehaved(gen, operation, str(exc)) from None
        except BaseException:
            # Interrupted mid-exchange (KeyboardInterrupt): the reply may still come; this
            # channel must never carry another call, or that call would read this reply.
            lease.broken = True
            raise
        try:
            reply = decode_reply(*frame)
            status, payload, spent = reply
            if status not in _STATUSES:
                raise ValueError(f"unknown status {status!r:.100}")
            spent = float(spent)
            if status != Status.OK and status != Status.RETIRED and not is_error_info(payload):
                raise ValueError(f"malformed error report {payload!r:.100}")
        except Exception as exc:  # noqa: BLE001 - any undecodable reply is a protocol error
            lease.broken = True
            raise self._misbehaved(gen, operation, f"undecodable reply: {exc!r}") from None
        if status == Status.RETIRED:
            # Another process retired this shared worker: the request was not run. Have the
            # worker replaced and run the call on the next one (safe even for a write).
            self._retire(gen, "retired elsewhere")
            raise _Retired
        self.last_worker_seconds = spent
        if operation not in _NOT_CALLS and request[0] in (Op.CALL, Op.RUN):
            gen.process.served += 1  # progress, for the breaker: it answered a call
        if status == Status.OK:
            self.calls += 1
            return spent if seconds else payload
        self.errors += 1
        if status == Status.PANIC:
            self._retire(gen, "panic")
            raise ChromaPanicError(
                f"Chroma's Rust core panicked during {operation}: {payload[3]}. The worker was "
                "replaced; the next call gets a fresh one.",
                operation=operation,
            ) from RemoteTraceback(payload[4])
        error = rebuild_error(payload)
        if type(error) is ValueError and (fuller := FUNCTIONS.explain(str(error))):
            error = ValueError(fuller).with_traceback(None)
            error.__cause__ = RemoteTraceback(payload[4])
        if self.options.recover_on_damage_errors and _means_damage(payload):
            # The files are damaged: stop this worker so the validator and the recovery hook
            # can run on a quiet directory before the next call (reads retry after that).
            if self._retire(gen, "damage"):
                self._record_death("damage", gen, error, operation)
                with self._cond:
                    self.pending_reason = "damage"
            raise _DamageRetry(error)
        raise error

    def _send_functions(self, lease: Lease, body: Any) -> None:
        """Before a call: the program's registered classes, and each embedding function the
        call carries, sent to this worker once (runtime/functions.py)."""
        gen = lease.gen
        signature = FUNCTIONS.registry_signature()
        if gen.registry != signature:
            entries = FUNCTIONS.registry_payload()
            if entries:
                self._exchange(
                    lease, (Op.REGISTER, entries), "open", self.options.start_timeout, False
                )
            gen.registry = signature
        if body is None:
            return
        for ref in _function_refs(body):
            if ref.token in gen.defined:
                continue
            alternatives = [
                (mode, pickle.PickleBuffer(data) if isinstance(data, bytes) else data)
                for mode, data in FUNCTIONS.definition(ref)
            ]
            mode, failures = self._exchange(
                lease,
                (Op.DEFINE, (ref.token, alternatives)),
                "open",
                self.options.start_timeout,
                False,
            )
            if mode == functions.CALLER and not ref.caller_side:
                ref.caller_side = True
                logger.warning(
                    "the embedding function %s cannot run in the worker (%s): it runs in this "
                    "process, and only its vectors are sent",
                    ref.name,
                    "; ".join(failures) or "it cannot be pickled",
                )
            gen.defined.add(ref.token)

    # -- failures: each caller gets its own error, the death is recorded once ---------------

    def _died(self, gen: _Generation, operation: str) -> WorkerCrashedError:
        process = gen.process
        with gen.end_lock:
            first = gen.end is None
            if first:
                code = process.wait(2.0)
                if code is None:  # socket closed but still running: it is of no use any more
                    process.kill()
                    code = process.returncode
                sig = signal_name(code)
                gen.end = _End(
                    sig or "exit", code, sig, process.log_tail(), operation, gen.inflight
                )
            end = gen.end
        assert end is not None
        if end.kind == "timeout":
            how = f"was killed (SIGKILL) because {end.operation} passed its deadline"
        elif end.kind == "protocol":
            how = f"was killed (SIGKILL) because it sent an invalid reply to {end.operation}"
        elif end.signal:
            how = f"was killed by {end.signal}({end.exitcode})"
        elif end.exitcode is None:
            how = "ended (its exit status is recorded only by the process that started it)"
        else:
            how = f"exited with status {end.exitcode}"
        tail = end.tail
        error = WorkerCrashedError(
            f"safechroma worker (pid {process.pid}) for {self.path} {how} during {operation}. "
            "Your process is fine; the next call starts a fresh worker after checking the "
            "directory. Reads are retried; a write in flight may or may not have been applied."
            + (f"\n--- worker log (tail) ---\n{tail}" if tail.strip() else ""),
            pid=process.pid,
            exitcode=end.exitcode,
            signal=end.signal,
            operation=operation,
            crash_log=tail,
            outcome_unknown=False,
        )
        if first:
            self._record_death(end.kind, gen, error, operation)
            self._emit(
                "worker_died",
                process.pid,
                operation=operation,
                signal=end.kind,
                exitcode=end.exitcode,
                served=process.served,
            )
        return error

    def _timed_out(
        self, gen: _Generation, operation: str, timeout: float | None
    ) -> WorkerCrashedError:
        process = gen.process
        with gen.end_lock:
            first = gen.end is None
            if first:
                process.kill()
                code = process.returncode
                gen.end = _End("timeout", code, signal_name(code), "", operation, gen.inflight)
        if not first:  # it died (or another deadline killed it) before ours passed
            return self._died(gen, operation)
        with self._cond:
            self.timeouts += 1
        error = WorkerTimeoutError(
            f"{operation} on {self.path} did not finish within {timeout} s; the worker "
            f"(pid {process.pid}) was killed so it cannot keep the directory. The next call "
            "starts a fresh worker. Raise the deadline with timeout= or "
            "safechroma.call_timeout() if the call is legitimately long.",
            pid=process.pid,
            operation=operation,
            timeout=timeout,
            outcome_unknown=False,
        )
        self._record_death("timeout", gen, error, operation)
        self._emit("worker_timeout", process.pid, operation=operation, timeout=timeout)
        return error  # type: ignore[return-value]

    def _misbehaved(self, gen: _Generation, operation: str, why: str) -> WorkerError:
        process = gen.process
        with gen.end_lock:
            first = gen.end is None
            if first:
                process.kill()
                code = process.returncode
                gen.end = _End("protocol", code, signal_name(code), "", operation, gen.inflight)
        if not first:
            return self._died(gen, operation)
        error = ProtocolError(
            f"safechroma worker (pid {process.pid}) sent an invalid reply to {operation}: "
            f"{why}. It was killed and will be replaced.",
            pid=process.pid,
            operation=operation,
            outcome_unknown=False,
        )
        self._record_death("protocol", gen, error, operation)
        self._emit("protocol_error", process.pid, operation=operation, why=why)
        return error

    def _retire(self, gen: _Generation, why: str) -> bool:
        """Mark a live worker to be stopped once its calls finish; True the first time."""
        with self._cond:
            if gen.retiring is not None or gen.end is not None:
                return False
            gen.retiring = why
            if self._gen is gen and self.state is State.READY:
                self.state = State.NO_WORKER
            return True

    def _record_death(
        self, kind: str, gen: _Generation, error: BaseException, operation: str
    ) -> None:
        served = gen.process.served
        why: str = ""
        deaths: list[str] = []
        with self._cond:
            now = time.monotonic()
            self.death_counts[kind] = self.death_counts.get(kind, 0) + 1
            self.last_crash = error
            self.pending_reason = "crash"
            self.pending_crash = error
            what = f"pid {gen.process.pid}: {kind} during {operation} after {served} calls"
            # A worker that had opened the directory and was then killed from outside (SIGKILL,
            # SIGTERM: the OOM killer, an operator) did not fail by itself: bad luck, like a
            # death after serving calls. The same signal while opening still counts (an index
            # that cannot be loaded within the memory it has is a crash loop).
            external = gen.process.opened and kind in _NOT_SELF_INFLICTED
            # A shared directory's breaker is kept by whichever process replaces the worker,
            # once per death, from how the worker ended (_cycle); here only what we saw.
            opened = not self.shared and self.breaker.record(
                now, what, served=served, external=external
            )
            if self._gen is gen and self.state is State.READY:
                self.state = State.NO_WORKER
            if opened:
                self.state = State.BROKEN
                why, deaths = self.breaker.reason(now), self.breaker.recent(now)
        if opened:
            self._emit("breaker_open", None, why=why, deaths=deaths)

    def _died_idle(self, gen: _Generation) -> None:
        process = gen.process
        with gen.end_lock:
            if gen.end is not None:
                return
            code = process.wait(2.0)
            if code is None:  # pragma: no cover - alive() said it had exited
                process.kill()
                code = process.returncode
            sig = signal_name(code)
            tail = process.log_tail()
            gen.end = _End(sig or "exit", code, sig, tail, "no call (between calls)", 0)
        how = f"was killed by {sig}({code})" if sig else f"exited with status {code}"
        error = WorkerCrashedError(
            f"safechroma worker (pid {process.pid}) for {self.path} {how} between calls; it was "
            "replaced before the next call, which no caller noticed."
            + (f"\n--- worker log (tail) ---\n{tail}" if tail.strip() else ""),
            pid=process.pid,
            exitcode=code,
            signal=sig,
            operation=None,
            crash_log=tail,
            outcome_unknown=False,
        )
        self._record_death(sig or "exit", gen, error, "no call (between calls)")
        self._emit(
            "worker_died",
            process.pid,
            operation="no call (between calls)",
            signal=sig or "exit",
            exitcode=code,
            served=process.served,
        )

    # -- replacing the worker: one thread at a time, no call in flight ----------------------

    def _replace_or_share(self, seen: int) -> None:
        """Replace the worker, or, if another thread did while we waited, share its outcome."""
        with self._life:
            with self._cond:
                if self._replacements != seen:
                    if self._replace_error is not None:
                        raise _copy(self._replace_error)
                    return
                self._check_usable()
            try:
                self._replace()
            except BaseException as exc:
                with self._cond:
                    self._replace_error = exc
                    self._replacements += 1
                raise
            with self._cond:
                self._replace_error = None
                self._replacements += 1

    def _replace(self) -> None:
        old = self._gen
        if old is not None:
            with self._cond:
                while old.inflight:
                    self._cond.wait()
            self._stop(old)
            self._gen = None
        if self.shared:
            self._join_or_start()
            return
        with self._cond:
            if self.state is State.BROKEN:
                now = time.monotonic()
                blocked = self.breaker.blocked_for(now)
                if blocked is not None:
                    raise self._crash_loop(now, blocked)
                self.state = State.NO_WORKER
                reset = True
            else:
                reset = False
            consecutive = self.breaker.consecutive
        if reset:
            self._emit("breaker_reset", None, why="cooldown")
        self._back_off(consecutive)
        self._check_and_recover()
        if self.pending_reason == "start":
            # No worker has the directory open: compact the kept WAL. Only at the first start
            # (and at close), never on the way back from a crash: compacting a busy session's
            # WAL takes up to a second, which a caller waiting for the respawn would pay
            # (measured: worker SIGKILLed to next count() 989 ms with it, ~120 ms without).
            wal.maintain(self.path)
        self._start(self._take_standby() or self._spawn())

    def _crash_loop(self, now: float, blocked: float) -> CrashLoopError:
        return CrashLoopError(
            f"the worker for {self.path} is in a crash loop "
            f"({self.breaker.reason(now)}), so no new worker is started for "
            f"{blocked:.1f} s more. Check the directory with "
            f"`safechroma check {self.path}`; call reset_breaker() to try at once.",
            path=self.path,
            deaths=self.breaker.recent(now),
            retry_after=blocked,
        )

    def _back_off(self, consecutive: int) -> None:
        """Back off between consecutive respawns of workers that made no progress (the first
        respawn is immediate; a worker that served calls ends the run)."""
        if consecutive > 1:
            wait = tenacity.RetryCallState(None, None, (), {})  # type: ignore[arg-type]
            wait.attempt_number = consecutive - 1
            self.options.sleep(float(self.options.respawn_wait(wait)))

    # -- a shared directory: attach to its worker, or be the one process that replaces it ---

    def _join_or_start(self) -> None:
        """Attach to the directory's worker, or, holding the lock, start the next one.

        Every wait is bounded: a worker being replaced by another process is waited for up to
        ``start_timeout``; a directory held by a process that does not share (an exclusive
        client, ``safechroma serve``, a repair) fails after ``lock_timeout``.
        """
        started = time.monotonic()
        while True:
            self._check_usable()
            address = rendezvous.announced(self.lock_path)
            if address is not None:
                try:
                    worker = AttachedWorker(
                        address, self.path, self.lock_path, self.options.max_reply_bytes
                    )
                except ConnectionError:
                    pass  # that worker is gone (or going): its replacement is on its way
                else:
                    try:
                        self._start(worker)
                        return
                    except WorkerStartError:
                        # It died (or was killed) as we attached: its replacement is on its
                        # way, from us or another process; within start_timeout.
                        if time.monotonic() - started >= self.options.start_timeout:
                            raise
            fd = rendezvous.try_lock(self.lock_path)
            if fd is not None:
                self._cycle_fd = fd
                try:
                    self._cycle(fd)
                finally:
                    self._cycle_fd = None
                    os.close(fd)  # the new worker holds its own copy of the lock
                return
            waited = time.monotonic() - started
            if not being_shared(self.lock_path) and waited >= self.options.lock_timeout:
                raise locked_error(self.path, self.lock_path)
            if waited >= self.options.start_timeout:
                raise WorkerStartError(
                    f"no worker for {self.path} within {self.options.start_timeout} s: another "
                    f"process holds {self.lock_path} and has not started one",
                    pid=None,
                    operation="start",
                    outcome_unknown=False,
                    exitcode=None,
                    signal=None,
                    crash_log="",
                )
            time.sleep(0.01)

    def _cycle(self, fd: int) -> None:
        """With the lock held and no worker running: account for how the last worker ended,
        validate (and repair) once, start the next worker and announce it."""
        rendezvous.write_lock_file(fd, f"{os.getpid()}\ncycle\n")
        state = rendezvous.load_state(self.path)
        now = time.monotonic()
        with self._cond:
            self.breaker.load(state.get("breaker"), now)
            # The files that recorded the life of the worker before last go now; the last
            # one's stay for one more cycle, for processes still reading how it ended.
            for stale in state.pop("stale", None) or []:
                rendezvous.remove_markers(stale)
            last = state.get("worker")
            if last:
                state["stale"] = [rendezvous.worker_files(last)]
            reason = self._account_for(last, now)
            self.pending_reason = reason
            blocked = self.breaker.blocked_for(now)
            consecutive = self.breaker.consecutive
            if blocked is None and self.state is State.BROKEN:
                self.state = State.NO_WORKER
        if state:  # nothing to record on a directory no shared worker has served
            state["worker"] = None
            state["breaker"] = self.breaker.dump()
            rendezvous.save_state(self.path, state)
        if blocked is not None:
            with self._cond:
                self.state = State.BROKEN
            raise self._crash_loop(now, blocked)
        self._back_off(consecutive)
        self._check_and_recover()
        if reason == "start":
            wal.maintain(self.path)  # no worker has the directory open (see _replace)
        process = self._spawn()
        state["breaker"] = self.breaker.dump()
        state["worker"] = {
            "pid": process.pid,
            "address": self.address,
            "log": process.log_path,
            "opened": False,
        }
        rendezvous.save_state(self.path, state)
        self._start(process)
        state["worker"]["opened"] = True
        rendezvous.save_state(self.path, state)
        rendezvous.announce(fd, process.pid, self.address)
        rendezvous.sweep_soon()  # what dead workers of any directory left in the folder

    def _account_for(self, last: dict[str, Any] | None, now: float) -> str:
        """How the previous worker of the directory ended, counted once in its breaker."""
        if not last:
            return "start"
        markers = rendezvous.marker_paths(str(last["address"]), int(last["pid"]))
        end = rendezvous.read_marker(markers["end"])
        status = rendezvous.wait_marker(markers["status"], 0.0 if end else 0.5)
        served = rendezvous.read_marker(markers["served"]) is not None
        if end in ("closed", "idle", "asked to leave"):
            return "start"  # it exited in order: nothing to suspect
        if end == "recycled":
            return "recycle"
        code = int(status) if status and status.lstrip("-").isdigit() else None
        kind = end or signal_name(code) or ("exit" if code is not None else "unknown")
        what = f"pid {last['pid']}: {kind}" + (" after serving calls" if served else "")
        external = bool(last.get("opened")) and kind in _NOT_SELF_INFLICTED
        progress = self.options.breaker.progress_calls if served else 0
        if self.breaker.record(now, what, served=progress, external=external):
            self._emit("breaker_open", None, why=self.breaker.reason(now), deaths=[what])
        if end == "damage":
            return "damage"
        return "crash"

    def _stop(self, gen: _Generation) -> None:
        """Stop a worker no call is using: ask it to exit, kill it if it does not."""
        process = gen.process
        why = gen.retiring or "replaced"
        if gen.end is None and why == "retired elsewhere":
            if process.wait(35.0) is None:  # it lets the calls in flight finish, then exits
                process.kill()
            gen.pool.close()
            process.close()
            return
        if gen.end is None:
            try:
                channel = gen.pool.checkout()
                try:
                    channel.exchange(*encode((Op.EXIT, why)), time.monotonic() + 5.0)
                finally:
                    channel.close()
            except (PeerDied, PeerTimedOut, PeerMisbehaved, OSError):
                pass
            # A shared worker lets other processes' calls in flight finish before it exits.
            if process.wait(35.0 if self.shared else 5.0) is None:
                process.kill()
            code = process.returncode
            if code:
                # Chroma's runtime can abort while the interpreter exits (chroma-core/chroma
                # #6852). The worker had finished its work: log it, never raise it, never count
                # it as a death (a clean stop is not a crash loop).
                self._emit(
                    "worker_exit_abnormal",
                    process.pid,
                    why=why,
                    exitcode=code,
                    signal=signal_name(code),
                    log=process.log_tail(1000),
                )
            self._emit("worker_retired", process.pid, why=why)
        else:
            process.wait(None) if process.returncode is None else None
        gen.pool.close()
        process.close()

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
        ctx = HookContext(
            self.path,
            reason,  # type: ignore[arg-type]
            self.pending_crash,
            max(1, self.breaker.consecutive),
        )
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
        # Issue 21: a repair that could not bring every record back whole says so, with the
        # count and the file that names them (also in stats() until acknowledged).
        self._emit(
            "recovered",
            None,
            report=result,
            incomplete_records=int(getattr(result, "incomplete_records", 0) or 0),
            losses_file=getattr(result, "losses_file", None),
        )

    def _start(self, process: WorkerProcess) -> None:
        gen = _Generation(process)
        settings, tenant, database = self.primary
        try:
            lease = Lease(gen, gen.pool.checkout())
            gen.inflight += 1
            try:
                ref = self._exchange(
                    lease,
                    (Op.OPEN, (self.path, settings, tenant, database, self.options.worker_init)),
                    "start",
                    self.options.start_timeout,
                    True,
                )
                process.opened = True
                self.primary_handle = int(ref[1])
                self.chroma_version = str(ref[2])
                attached = isinstance(process, AttachedWorker)
                self._emit(
                    "worker_attached" if attached else "worker_started",
                    process.pid,
                    serial=gen.serial,
                )
                # Records a repair saved are written back before any caller uses the worker.
                self._write_back_salvage(lease)
                if self.shared and not isinstance(process, AttachedWorker):
                    # Only now may other processes attach: the salvage is written back.
                    self._exchange(lease, (Op.SHARE, None), "start", self.options.timeout, False)
            finally:
                gen.inflight -= 1
                if lease.broken or gen.end is not None:
                    gen.pool.discard(lease.channel)
                else:
                    gen.pool.checkin(lease.channel)
        except WorkerError as exc:
            self._stop(gen)
            raise WorkerStartError(
                f"a new worker for {self.path} could not open it: {exc}",
                pid=process.pid,
                operation="start",
                outcome_unknown=False,
                exitcode=getattr(exc, "exitcode", None),
                signal=getattr(exc, "signal", None)
                or ("timeout" if isinstance(exc, WorkerTimeoutError) else None),
                crash_log=getattr(exc, "crash_log", ""),
            ) from exc
        except BaseException:
            gen.retiring = "open failed"
            self._stop(gen)
            raise
        with self._cond:
            closed = self._closed()  # close() may have begun while this worker started
            if not closed:
                self._gen = gen
                self.state = State.READY
                self.started_workers += 1
                if self.started_workers > 1:
                    self.respawns += 1
                self.pending_reason = None
                self.pending_crash = None
            self._cond.notify_all()
        if closed:
            gen.retiring = "closed"
            self._stop(gen)
            raise ClientClosedError(f"the safechroma client for {self.path} is closed")

    def _write_back_salvage(self, lease: Lease) -> None:
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
                lease,
                (Op.RUN, (self.primary_handle, fn, (path,))),
                "apply_salvage",
                None,
                reembed is not None,
            )
            self.pending_salvage.pop(0)
            removed = summary.get("removed") if isinstance(summary, dict) else None
            if removed:
                # Records whose vector exists nowhere were removed (saved beside the backup):
                # losses, as `safechroma repair` reports them.
                from ..storage.recovery import record_losses

                record_losses(self.path, f"{path}.removed.json", len(removed))
            self._emit(
                "salvage_applied",
                lease.gen.process.pid,
                file=path,
                summary=summary,
                incomplete_records=len(removed or ()),
            )

    # -- the standby -----------------------------------------------------------------------

    def _refill_standby(self) -> None:
        # Spawned only after the new worker has served a call: on two cores a standby importing
        # chromadb right away would slow the very call a crashed worker's caller waits for.
        with self._cond:
            if self._refilling or self.standby is not None or self.state is not State.READY:
                return
            self._refilling = True
        try:
            spare = self._spawn()
        finally:
            with self._cond:
                self._refilling = False
        with self._cond:
            keep = self._closed() is False and self.standby is None
            if keep:
                self.standby = spare
        if not keep:
            spare.kill()
            spare.close()

    def _spawn(self) -> WorkerProcess:
        return WorkerProcess(
            log_dir=self.log_dir,
            lock_fd=self.lock_fd,
            memory_limit=self.options.memory_limit,
            max_reply_bytes=self.options.max_reply_bytes,
            file_limit=file_size_limit(self.path, self.options.max_file_bytes),
            journal=self.options.journal,  # issue 21: the worker keeps the write journal
            share={"address": self.address, "keep_warm": self.options.keep_warm}
            if self.shared
            else None,
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

    def _take_standby(self) -> WorkerProcess | None:
        with self._cond:
            standby, self.standby = self.standby, None
        if standby is not None and not standby.alive():
            standby.wait(None)
            standby.close()
            return None
        return standby

    def reset_breaker(self) -> None:
        """Close the crash-loop breaker: the next call may start a worker at once."""
        with self._cond:
            self.breaker.reset()
            was_broken = self.state is State.BROKEN
            if was_broken:
                self.state = State.NO_WORKER
        if self.shared:
            self._reset_shared_breaker()
        if was_broken:
            self._emit("breaker_reset", None, why="manual")

    def _reset_shared_breaker(self) -> None:
        """Forget the directory's death history, for every process. An open breaker means no
        worker runs, so the lock is free then; a worker serving the directory means there is
        nothing to reset but what this process saw."""
        give_up = time.monotonic() + 1.0
        while True:
            fd = rendezvous.try_lock(self.lock_path)
            if fd is not None:
                try:
                    state = rendezvous.load_state(self.path)
                    state["breaker"] = Breaker(self.options.breaker).dump()
                    rendezvous.save_state(self.path, state)
                finally:
                    os.close(fd)
                return
            if rendezvous.announced(self.lock_path) or time.monotonic() >= give_up:
                return
            time.sleep(0.01)

    # -- closing ---------------------------------------------------------------------------

    def close(self, linger: bool = False) -> None:
        """Stop the worker and the standby, release the lock. Idempotent.

        Calls already in flight finish first (each is bounded by its deadline); calls made
        after this raise ClientClosedError. ``linger`` (at interpreter exit, clients never
        closed): a shared worker left with no process stays warm for ``keep_warm`` seconds.
        """
        with self._cond:
            if self.state is State.CLOSED:
                return
            self.state = State.CLOSED
        with self._life:  # an ongoing start finishes first
            gen = self._gen
            last: bool | int = False  # shared: the pid of the worker our leaving ended
            if gen is not None:
                with self._cond:
                    while gen.inflight:
                        self._cond.wait()
                if self.shared and gen.end is None and gen.retiring is None:
                    last = self._leave(gen, linger)
                else:
                    gen.retiring = gen.retiring or "closed"
                    self._stop(gen)
                self._gen = None
            with self._cond:
                standby, self.standby = self.standby, None
            if standby is not None:
                standby.kill()
                standby.close()
            if self.dir_lock is not None:
                if self.started_workers:
                    # The worker is gone, the lock still held. Never on a directory no worker
                    # ever opened (a refused one, e.g. written by a newer chromadb).
                    wal.maintain(self.path)
                    wal.release(self.path)
                self.dir_lock.release()
                shutil.rmtree(self.log_dir, ignore_errors=True)
            elif last:
                self._after_last(last)

    def _leave(self, gen: _Generation, linger: bool = False) -> bool | int:
        """Stop using a shared worker; its pid when it exited because no process uses it now
        (else False)."""
        gen.pool.close()
        process = gen.process
        last = process.leave(linger)
        if last:
            if process.wait(10.0) is None:
                process.kill()
            code = process.returncode
            if code:  # an abort at exit (chroma-core/chroma#6852): logged, never raised
                self._emit(
                    "worker_exit_abnormal",
                    process.pid,
                    why="closed",
                    exitcode=code,
                    signal=signal_name(code),
                    log=process.log_tail(1000),
                )
            self._emit("worker_retired", process.pid, why="closed")
            try:
                os.unlink(process.log_path)
            except OSError:
                pass
        process.close()
        return process.pid if last else False

    def _after_last(self, pid: bool | int) -> None:
        """The last worker exited in order: compact the WAL and clear what recorded its life,
        unless a process already took the directory again (it then compacts at its own
        start). Waits at most a second."""
        give_up = time.monotonic() + 1.0
        while True:
            fd = rendezvous.try_lock(self.lock_path)
            if fd is not None:
                try:
                    state = rendezvous.load_state(self.path)
                    last = state.get("worker") or {}
                    if last.get("pid") == pid and pid:
                        for stale in state.pop("stale", None) or []:
                            rendezvous.remove_markers(stale)
                        rendezvous.remove_markers(rendezvous.worker_files(last))
                        state["worker"] = None
                        rendezvous.save_state(self.path, state)
                    if self.started_workers:
                        wal.maintain(self.path)
                        wal.release(self.path)
                finally:
                    os.close(fd)
                return
            if time.monotonic() >= give_up:
                return
            time.sleep(0.01)

    # -- observability ---------------------------------------------------------------------

    def stats(self) -> Stats:
        gen = self._gen
        worker = gen.process if gen is not None and gen.end is None else None
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
            **_losses(self.path),
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


def _losses(path: str) -> dict[str, Any]:
    """Stats' view of the directory's unacknowledged repair losses (issue 21)."""
    from ..storage.recovery import unacknowledged_losses

    marker = unacknowledged_losses(path)
    if marker is None:
        return {"incomplete_records": 0, "losses_files": []}
    count = marker.get("count")
    return {
        "incomplete_records": int(count) if isinstance(count, int) else -1,
        "losses_files": [str(f) for f in marker.get("files") or []],
    }


def _usable(gen: _Generation) -> bool:
    return gen.end is None and gen.retiring is None


def _copy(error: BaseException) -> BaseException:
    """A copy of a shared error, so each waiting caller raises its own exception object."""
    try:
        dup = copy.copy(error)
    except Exception:  # noqa: BLE001 - an exception that does not copy is raised as is
        return error
    dup.__cause__ = error.__cause__
    return dup


# Signals a worker does not raise by running a call: they come from outside (the OOM killer, an
# operator, a container runtime), so a death by one is never a strike against the call in flight.
_NOT_SELF_INFLICTED: Final = frozenset(
    {"SIGKILL", "SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGPIPE", "SIGUSR1", "SIGUSR2"}
)

# How many times in a row a call may be refused unrun by a stopping shared worker.
_MAX_REFUSALS: Final = 10

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


# os.getpid() is a system call; every call checks it (see _check_usable), so it is kept here.
_this_pid = os.getpid()


def _forked() -> None:
    global _this_pid
    _this_pid = os.getpid()


os.register_at_fork(after_in_child=_forked)

# Exchanges that are not a caller's call: a worker that only did these made no progress.
_NOT_CALLS: Final = frozenset({"start", "open", "release", "apply_salvage"})


def _function_refs(body: Any, depth: int = 0) -> list[FunctionRef]:
    """The :class:`FunctionRef` objects in a request body (arguments, keyword arguments)."""
    if isinstance(body, FunctionRef):
        return [body]
    if depth >= 3:
        return []
    if isinstance(body, (tuple, list)):
        return [r for item in body for r in _function_refs(item, depth + 1)]
    if isinstance(body, dict):
        return [r for item in body.values() for r in _function_refs(item, depth + 1)]
    return []


_STATUSES: Final = frozenset(int(s) for s in Status)


class _Fingerprint:
    """Names one call by its target, method and arguments, for the poison-request ledger.

    The digest is computed only when it is needed: when the worker died with the call in
    flight, or when some call is already poison (then every call is checked)."""

    __slots__ = ("_parts", "_digest", "by_value")

    def __init__(
        self, owner: _Remote, method: str, args: tuple[Any, ...], kwargs: Any, by_value: bool
    ) -> None:
        self._parts = (owner, method, args, kwargs, by_value)
        self._digest: bytes | None = None
        self.by_value = by_value

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


class _Retired(Exception):
    """Internal: a shared worker that is stopping refused the request unrun; try the next."""


class _DamageRetry(Exception):
    """Internal: Chroma raised an error meaning on-disk damage; validate and maybe retry."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error

    def __reduce__(self) -> tuple[Any, ...]:  # copy.copy() for callers sharing a failed start
        return (_DamageRetry, (self.error,))


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
            # The program ends without having closed its clients (a short command): the
            # next command on the directory may join the worker, kept warm (keep_warm).
            sup.close(linger=True)
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            logger.exception("closing %s at exit failed", sup.path)
