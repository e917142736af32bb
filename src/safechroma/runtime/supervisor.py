"""The one owner of the worker of one persist directory: lease, replace, stop, close.

One supervisor exists per persist directory per process (:func:`.session.acquire`); every
``SafeClient`` and ``SafeCollection`` on that directory shares it. Its parts, each in its module:

- :class:`~.lock.DirectoryLock`: the directory has one owner, across processes;
- :class:`~.breaker.Breaker`: when to stop starting workers, and the poison ledger
  (:mod:`.poison` names and strikes calls);
- :class:`~.generation.Generation`: one worker's life, whose end is recorded once;
- :mod:`.replies`: the exceptions a caller raises, built from a reply or a death;
- :mod:`.shared`: a directory shared by processes (attach, or be the one that replaces);
- :mod:`.standby`: a spare worker ahead of need, and recycling of worn-out ones;
- :mod:`.hooks`: the validator and the recovery hook;
- :mod:`.session`: the call path, top to bottom, built on this class.

This module is the one place that changes the worker's state. Callers never start, stop or
replace a worker themselves: they *lease* a channel of the live worker, make one exchange
(:meth:`Supervisor.exchange`), and give it back. When a worker breaks, every caller in flight
sees it on its own channel and gets its own precise error, but the death is recorded once (by
the :class:`~.generation.Generation`), and the replacement happens once: the next caller that
needs a worker takes :attr:`Supervisor._life`, waits until no call is in flight on the old
worker, stops it, runs the validator (and, on damage, the recovery hook), and starts one new
worker; callers that were waiting meanwhile share its outcome (the worker, or the error). The
shape is CPython's ``concurrent.futures.process``, where one manager makes every state change and
a broken worker fails every pending call at once. ``_cond`` guards the state and the counters; no
I/O, sleep or user callback runs while it is held. Its states are
:class:`~.generation.State`'s (no worker, ready, broken, closed).
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any, Final

import tenacity

from .._errors import (
    ClientClosedError,
    CrashLoopError,
    SafeChromaError,
    WorkerError,
    signal_name,
)
from .._policy import Event, Options, Stats
from ..storage import wal

# template: imported for its exit hook (hang up on the worker template), which must run after
# this module's _close_all: atexit runs hooks last-registered first.
from . import hooks, rendezvous, replies, salvage, shared, standby, template  # noqa: F401
from .breaker import Breaker
from .generation import Generation, Lease, State, WorkerGone
from .lock import LOCK_NAME, DirectoryLock
from .poison import NOT_SELF_INFLICTED
from .protocol import Op, Request, Status
from .replies import rebuild_error
from .standby import Standby, file_size_limit, worn_out
from .transport import AttachedWorker, PeerDied, PeerMisbehaved, PeerTimedOut, WorkerProcess

__all__ = ["LOCK_NAME", "State", "Supervisor", "file_size_limit", "rebuild_error"]

logger = logging.getLogger("safechroma")
# A library does not configure logging; without a handler Python would print WARNINGs to
# stderr through its last-resort handler.
logger.addHandler(logging.NullHandler())

# Read by safechroma serve (server.py) under these names.
_is_damaged = hooks.is_damaged


def _summary(report: Any) -> str:
    for name in ("summary", "describe"):
        fn = getattr(report, name, None)
        if callable(fn):
            return str(fn())
    return str(report)[:500]


# A starter makes the next worker process of a supervisor (the seam a test's fake worker uses).
Starter = Callable[["Supervisor"], WorkerProcess]


class Supervisor:
    """Owns the worker of one persist directory. Thread-safe; calls run in parallel.

    Args:
        path: the persist directory (absolute, resolved).
        options: the caller's options.
        primary: settings, tenant and database of the first client.
        starter: makes a worker process; the default spawns one from the worker template
            (:class:`~.transport.WorkerProcess`).
    """

    def __init__(
        self,
        path: str,
        options: Options,
        primary: tuple[Any, str, str],
        starter: Starter | None = None,
    ) -> None:
        self.path = path
        self.owner = os.getpid()
        self.options = options
        self.primary = primary
        self.refs = 0  # under session's registry lock
        self._starter: Starter = starter or standby.spawn
        # Shared (the default): the worker is this directory's, for every process of this
        # user (see shared.py); exclusive: this process holds the lock for its whole life.
        self.shared = not options.exclusive
        self.lock_path = os.path.join(path, LOCK_NAME)
        self.cycle_fd: int | None = None  # the lock, held while this process replaces the worker
        self.dir_lock: DirectoryLock | None = None
        self.address = ""
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
        self._standby = Standby()
        # Whether a spare worker is kept (standby.py); for a shared directory, set at each start.
        self.wants_standby = options.standby and not self.shared
        # _cond guards the fields below, every Generation.inflight and the breaker; _life is
        # held by the one thread that replaces the worker (never taken while holding _cond).
        self._lock = threading.RLock()  # _cond's lock: taken directly on the call path
        self._cond = threading.Condition(self._lock)
        self._waiting = 0  # threads in _wait(): give_back() notifies only when there are some
        self._life = threading.RLock()
        self._alone: threading.Thread | None = None  # the retry running alone, if any
        self.state = State.NO_WORKER
        self._gen: Generation | None = None
        self._leased = 0  # leases out, over every generation
        self._replacements = 0  # finished attempts to start a worker
        self._replace_error: BaseException | None = None  # how the last attempt failed
        self.pending_reason: str | None = "start"
        self.pending_crash: BaseException | None = None
        # Written by the thread holding _life (starting a worker), read by callers after.
        self.pending_salvage: list[str] = []
        self.primary_handle = 0
        self.chroma_version = ""
        # stats, under _cond
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
        return self.cycle_fd

    @property
    def worker(self) -> WorkerProcess | None:
        gen = self._gen
        return gen.process if gen is not None and gen.end is None else None

    @property
    def standby(self) -> WorkerProcess | None:
        """The spare worker process, if one is waiting (``Options.standby``)."""
        return self._standby.process

    # -- leases ----------------------------------------------------------------------------

    def lease(self, alone: bool = False) -> Lease:
        """A channel of a ready worker; replaces the worker first if there is none.

        ``alone``: wait until no other call is in flight, and keep new calls waiting until this
        one is given back (a retry after a death, see :meth:`.session.Session.call`).
        """
        while True:
            stale: Generation | None = None
            # The lock itself, not the condition: a Condition's __enter__ is Python code, and
            # this runs on every call (as does give_back's).
            with self._lock:
                if self.owner != _this_pid or self.state is State.CLOSED:
                    self.check_usable()
                if self._alone is not None and self._alone is not threading.current_thread():
                    self._wait()  # a retry runs alone: wait for it
                    continue
                if alone and self._leased:
                    self._wait()  # let the calls in flight finish first
                    continue
                gen = self._gen
                if (
                    self.state is State.READY
                    and gen is not None
                    and gen.end is None
                    and gen.retiring is None
                ):
                    options = self.options
                    if gen.process.alive() and not (
                        (options.max_requests is not None or options.max_worker_rss is not None)
                        and worn_out(gen.process, options)
                    ):
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
            raise self._gone(gen, "open", WorkerGone("died"), None) from None

    def give_back(self, lease: Lease) -> None:
        """Return the lease's channel (a broken one is discarded) and count its exchanges."""
        gen = lease.gen
        if lease.broken or gen.end is not None:
            gen.pool.discard(lease.channel)
        else:
            gen.pool.checkin(lease.channel)
        with self._lock:
            if lease.answered:  # _settle, inline: this runs once per call
                self.calls += lease.calls
                self.errors += lease.answered - lease.calls
                gen.process.served += lease.served
                self.last_worker_seconds = lease.spent
            gen.inflight -= 1
            self._leased -= 1
            if self._waiting and not gen.inflight:
                self._cond.notify_all()

    def _wait(self) -> None:
        """Under _cond: wait for a notification, counted so give_back() knows to send one."""
        self._waiting += 1
        try:
            self._cond.wait()
        finally:
            self._waiting -= 1

    def _settle(self, lease: Lease) -> None:
        """Under _cond: add what the lease's exchanges answered to the counters (once)."""
        if lease.answered:
            self.calls += lease.calls
            self.errors += lease.answered - lease.calls
            lease.gen.process.served += lease.served
            self.last_worker_seconds = lease.spent
            lease.answered = lease.calls = lease.served = 0

    def _replace_stale(self, gen: Generation) -> None:
        """The worker died between calls, or has served enough: have it replaced."""
        if not gen.process.alive():
            # It died between calls (chroma-core/chroma#6984: a background thread that
            # segfaults with no call running). The death is counted once; this caller gets
            # no error: the worker is replaced before its call is sent.
            end, first = gen.died("no call (between calls)", in_flight=0)
            if first:
                error = replies.died_between_calls(self.path, gen.process.pid, end)
                self._record_death(end.kind, gen, error, end.operation)
                self._emit(
                    "worker_died",
                    gen.process.pid,
                    operation=end.operation,
                    signal=end.kind,
                    exitcode=end.exitcode,
                    served=gen.process.served,
                )
        elif self.retire(gen, "recycled"):
            # Replaced between calls: calls in flight finish on it, no caller sees it.
            self._emit("worker_recycled", gen.process.pid, served=gen.process.served)
            with self._cond:
                self.pending_reason = "recycle"

    def served(self) -> None:
        """A caller's call succeeded: it ends a run of deaths without progress, and a spare
        worker may be started now (:attr:`wants_standby`)."""
        if self.breaker.consecutive:
            with self._cond:
                self.breaker.served()
        spare = self._standby
        if spare.process is None and not spare.refilling and self.wants_standby:
            # Spawned only after the new worker has served a call: on two cores a standby
            # importing chromadb right away would slow the call a crashed worker's caller waits
            # for.
            self._standby.refill(
                lambda: standby.spawn_spare(self, self._starter),
                lambda: self.state is State.READY,
                lambda: self.state is not State.CLOSED,
            )

    def check_usable(self) -> None:
        if self.owner != _this_pid:
            # A forked child shares the parent's sockets: a call from it would interleave
            # frames with the parent's and hand replies to the wrong process.
            raise SafeChromaError(
                f"this safechroma client for {self.path} belongs to process {self.owner}; "
                "create a new client after fork()"
            )
        if self.state is State.CLOSED:
            raise ClientClosedError(f"the safechroma client for {self.path} is closed")

    # -- one exchange: the one place a reply or a death becomes a result or an exception ----

    def exchange(
        self,
        lease: Lease,
        request: Request,
        operation: str,
        timeout: float | None,
        by_value: bool = False,
        *,
        seconds: bool = False,
    ) -> Any:
        """Send ``request`` on ``lease`` and return the result, or raise what the caller sees.

        Raises:
            WorkerCrashedError, WorkerTimeoutError, ProtocolError: the worker died, passed the
                deadline or lied; its end is recorded once, whoever sees it first.
            ChromaPanicError: Chroma's Rust core panicked (the worker is retired).
            Exception: what Chroma raised, rebuilt (:func:`.replies.remote_error`).
        """
        gen = lease.gen
        try:
            reply = lease.exchange(request, timeout, by_value)
        except WorkerGone as gone:
            raise self._gone(gen, operation, gone, timeout) from None
        status = reply.status
        if status is Status.RETIRED:
            # Another process retired this shared worker: the request was not run. Have the
            # worker replaced and run the call on the next one (safe even for a write).
            self.retire(gen, "retired elsewhere")
            raise replies.Retired
        lease.answered += 1
        lease.spent = reply.spent
        if (request.op is Op.CALL or request.op is Op.RUN) and operation not in _NOT_CALLS:
            lease.served += 1  # progress, for the breaker: it answered a call
        if status is Status.OK:
            lease.calls += 1
            return reply.spent if seconds else reply.payload
        if status is Status.PANIC:
            self.retire(gen, "panic")
            raise replies.panicked(operation, reply.payload)
        error = replies.remote_error(reply.payload)
        if self.options.recover_on_damage_errors and replies.means_damage(reply.payload):
            # The files are damaged: stop this worker so the validator and the recovery hook
            # can run on a quiet directory before the next call (reads retry after that).
            if self.retire(gen, "damage"):
                with self._cond:
                    self._settle(lease)  # it answered: that is progress, for the breaker
                self._record_death("damage", gen, error, operation)
                with self._cond:
                    self.pending_reason = "damage"
            raise replies.DamageRetry(error)
        raise error

    def _gone(
        self, gen: Generation, operation: str, gone: WorkerGone, timeout: float | None
    ) -> WorkerError:
        """The error of a caller whose exchange found the worker dead, late or lying."""
        pid = gen.process.pid
        if gone.how == "timeout" and gen.killed("timeout", operation):
            with self._cond:
                self.timeouts += 1
            late = replies.timed_out(self.path, pid, operation, timeout)
            self._record_death("timeout", gen, late, operation)
            self._emit("worker_timeout", pid, operation=operation, timeout=timeout)
            return late
        if gone.how == "protocol" and gen.killed("protocol", operation):
            bad = replies.misbehaved(pid, operation, gone.why)
            self._record_death("protocol", gen, bad, operation)
            self._emit("protocol_error", pid, operation=operation, why=gone.why)
            return bad
        # It died (or another caller's deadline or a bad reply killed it) first.
        end, first = gen.died(operation)
        error = replies.crashed(self.path, pid, end, operation)
        if first:
            self._record_death(end.kind, gen, error, operation)
            self._emit(
                "worker_died",
                pid,
                operation=operation,
                signal=end.kind,
                exitcode=end.exitcode,
                served=gen.process.served,
            )
        return error

    def retire(self, gen: Generation, why: str) -> bool:
        """Mark a live worker to be stopped once its calls finish; True the first time."""
        with self._cond:
            if gen.retiring is not None or gen.end is not None:
                return False
            gen.retiring = why
            if self._gen is gen and self.state is State.READY:
                self.state = State.NO_WORKER
            return True

    def _record_death(
        self, kind: str, gen: Generation, error: BaseException, operation: str
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
            external = gen.process.opened and kind in NOT_SELF_INFLICTED
            # A shared directory's breaker is kept by whichever process replaces the worker,
            # once per death, from how the worker ended (shared.cycle); here only what we saw.
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

    # -- replacing the worker: one thread at a time, no call in flight ----------------------

    def _replace_or_share(self, seen: int) -> None:
        """Replace the worker, or, if another thread did while we waited, share its outcome."""
        with self._life:
            with self._cond:
                if self._replacements != seen:
                    if self._replace_error is not None:
                        raise replies.copy_error(self._replace_error)
                    return
                self.check_usable()
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
                    self._wait()
            self.stop(old)
            with self._cond:
                self._gen = None
        if self.shared:
            shared.join_or_start(self)
            return
        with self._cond:
            if self.state is State.BROKEN:
                now = time.monotonic()
                blocked = self.breaker.blocked_for(now)
                if blocked is not None:
                    raise self.crash_loop(now, blocked)
                self.state = State.NO_WORKER
                reset = True
            else:
                reset = False
            consecutive = self.breaker.consecutive
        if reset:
            self._emit("breaker_reset", None, why="cooldown")
        self.back_off(consecutive)
        self.check_and_recover()
        if self.pending_reason == "start":
            # No worker has the directory open: compact the kept WAL. Only at the first start
            # (and at close), never on the way back from a crash: compacting a busy session's
            # WAL takes up to a second, which a caller waiting for the respawn would pay
            # (measured: worker SIGKILLed to next count() 989 ms with it, ~120 ms without).
            wal.maintain(self.path)
        self.start(self._standby.take() or self._spawn())

    def crash_loop(self, now: float, blocked: float) -> CrashLoopError:
        return replies.crash_loop(self.path, self.breaker, now, blocked)

    def back_off(self, consecutive: int) -> None:
        """Back off between consecutive respawns of workers that made no progress (the first
        respawn is immediate; a worker that served calls ends the run)."""
        if consecutive > 1:
            wait = tenacity.RetryCallState(None, None, (), {})  # type: ignore[arg-type]
            wait.attempt_number = consecutive - 1
            self.options.sleep(float(self.options.respawn_wait(wait)))

    def stop(self, gen: Generation) -> None:
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
                    channel.exchange(*Request(Op.EXIT, why).encode(), time.monotonic() + 5.0)
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
                self.emit_abnormal_exit(process, why, code)
            self._emit("worker_retired", process.pid, why=why)
        else:
            process.wait(None) if process.returncode is None else None
        gen.pool.close()
        process.close()

    def emit_abnormal_exit(self, process: WorkerProcess, why: str, code: int) -> None:
        self._emit(
            "worker_exit_abnormal",
            process.pid,
            why=why,
            exitcode=code,
            signal=signal_name(code),
            log=process.log_tail(1000),
        )

    def check_and_recover(self) -> None:
        """With no worker on the directory: run the validator, and on damage the recovery."""
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
        outcome = hooks.check_and_recover(
            self.path,
            reason=reason,
            crash=self.pending_crash,
            attempt=max(1, self.breaker.consecutive),
            validator=self.options.validator,
            recovery=self.options.recovery,
            emit=self._emit,
        )
        if outcome.healthy:
            return
        with self._cond:
            self.recoveries += 1
            self.breaker.forgive()  # the damage explains the deaths: no call is poison for them
        for file in outcome.salvage_files:
            if file not in self.pending_salvage:
                self.pending_salvage.append(file)

    def start(self, process: WorkerProcess) -> None:
        """Open the directory in ``process``, write back pending salvage, and make it current."""
        gen = Generation(process)
        settings, tenant, database = self.primary
        try:
            lease = Lease(gen, gen.pool.checkout())
            gen.inflight += 1
            try:
                ref = self.exchange(
                    lease,
                    Request(
                        Op.OPEN, (self.path, settings, tenant, database, self.options.worker_init)
                    ),
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
                salvage.write_back(self, lease)
                if self.shared and not attached:
                    # Only now may other processes attach: the salvage is written back.
                    self.exchange(lease, Request(Op.SHARE, None), "start", self.options.timeout)
            finally:
                gen.inflight -= 1
                if lease.broken or gen.end is not None:
                    gen.pool.discard(lease.channel)
                else:
                    gen.pool.checkin(lease.channel)
                with self._cond:
                    self._settle(lease)
        except WorkerError as exc:
            self.stop(gen)
            raise replies.start_failed(self.path, process.pid, exc) from exc
        except BaseException:
            gen.retiring = "open failed"
            self.stop(gen)
            raise
        with self._cond:
            closed = self.state is State.CLOSED  # close() may have begun while it started
            if not closed:
                self._gen = gen
                self.state = State.READY
                if self.shared:
                    self.wants_standby = standby.shared_wants_spare(self.options, process)
                self.started_workers += 1
                if self.started_workers > 1:
                    self.respawns += 1
                self.pending_reason = None
                self.pending_crash = None
            self._cond.notify_all()
        if closed:
            gen.retiring = "closed"
            self.stop(gen)
            raise ClientClosedError(f"the safechroma client for {self.path} is closed")

    def _spawn(self) -> WorkerProcess:
        return self._starter(self)

    def reset_breaker(self) -> None:
        """Close the crash-loop breaker: the next call may start a worker at once."""
        with self._cond:
            self.breaker.reset()
            was_broken = self.state is State.BROKEN
            if was_broken:
                self.state = State.NO_WORKER
        if self.shared:
            shared.reset_breaker(self)
        if was_broken:
            self._emit("breaker_reset", None, why="manual")

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
                        self._wait()
                    leaving = self.shared and gen.end is None and gen.retiring is None
                    gen.retiring = gen.retiring or "closed"
                if leaving:
                    last = shared.leave(self, gen, linger)
                else:
                    self.stop(gen)
                with self._cond:
                    self._gen = None
            self._standby.discard()
            if self.dir_lock is not None:
                if self.started_workers:
                    # The worker is gone, the lock still held. Never on a directory no worker
                    # ever opened (a refused one, e.g. written by a newer chromadb).
                    wal.maintain(self.path)
                    wal.release(self.path)
                self.dir_lock.release()
                shutil.rmtree(self.log_dir, ignore_errors=True)
            elif last:
                shared.after_last(self, last)

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
            **salvage.losses(self.path),
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


# os.getpid() is a system call; every call checks it (see check_usable), so it is kept here.
_this_pid = os.getpid()


def _forked() -> None:
    global _this_pid
    _this_pid = os.getpid()


if sys.platform != "win32":  # Windows has no fork (and no os.register_at_fork)
    os.register_at_fork(after_in_child=_forked)

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


def _brief(detail: dict[str, Any]) -> str:
    return " ".join(f"{k}={v!r}"[:200] for k, v in detail.items() if k != "report")


# -- one supervisor per directory per process (session.acquire and release fill it) ---------

_registry: dict[str, Supervisor] = {}
# Reentrant: a client finalizer (garbage collection can run it inside acquire()) releases
# through this lock too.
_registry_lock = threading.RLock()


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
