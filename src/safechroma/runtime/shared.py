"""A directory shared by this user's processes: attach to its worker, or be the one that
replaces it.

With ``Options.exclusive`` off (the default) the worker belongs to the directory, not to one
process. A process that needs a worker first tries the one the lock file announces
(:func:`join_or_start`); failing that, the process that takes the lock (:func:`cycle`) accounts
for how the last worker ended in the directory's breaker (kept in the rendezvous state file, so
every process sees each death once), validates and repairs, starts the next worker and
announces it. Leaving (:func:`leave`) lets the worker exit once no process uses it; the process
whose leaving ended it clears what recorded its life (:func:`after_last`).

Every function takes the :class:`~.supervisor.Supervisor` and changes its state only under its
``_cond``, never across file I/O, a wait, or an event (which runs the user's callback).
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from .._errors import WorkerStartError, signal_name
from ..storage import wal
from . import rendezvous, standby
from .breaker import Breaker
from .generation import State
from .lock import being_shared, locked_error
from .poison import NOT_SELF_INFLICTED
from .transport import AttachedWorker

if TYPE_CHECKING:
    from .generation import Generation
    from .supervisor import Supervisor

__all__ = ["after_last", "cycle", "join_or_start", "leave", "reset_breaker"]


def join_or_start(sup: Supervisor) -> None:
    """Attach to the directory's worker, or, holding the lock, start the next one.

    Every wait is bounded: a worker being replaced by another process is waited for up to
    ``start_timeout``; a directory held by a process that does not share (an exclusive
    client, ``safechroma serve``, a repair) fails after ``lock_timeout``.
    """
    options = sup.options
    started = time.monotonic()
    while True:
        sup.check_usable()
        address = rendezvous.announced(sup.lock_path)
        if address is not None:
            try:
                worker = AttachedWorker(address, sup.path, sup.lock_path, options.max_reply_bytes)
            except ConnectionError:
                pass  # that worker is gone (or going): its replacement is on its way
            else:
                try:
                    sup.start(worker)
                    return
                except WorkerStartError:
                    # It died (or was killed) as we attached: its replacement is on its
                    # way, from us or another process; within start_timeout.
                    if time.monotonic() - started >= options.start_timeout:
                        raise
        fd = rendezvous.try_lock(sup.lock_path)
        if fd is not None:
            sup.cycle_fd = fd
            try:
                cycle(sup, fd)
            finally:
                sup.cycle_fd = None
                os.close(fd)  # the new worker holds its own copy of the lock
            return
        waited = time.monotonic() - started
        if not being_shared(sup.lock_path) and waited >= options.lock_timeout:
            raise locked_error(sup.path, sup.lock_path)
        if waited >= options.start_timeout:
            raise WorkerStartError(
                f"no worker for {sup.path} within {options.start_timeout} s: another "
                f"process holds {sup.lock_path} and has not started one",
                pid=None,
                operation="start",
                outcome_unknown=False,
                exitcode=None,
                signal=None,
                crash_log="",
            )
        time.sleep(0.01)


def cycle(sup: Supervisor, fd: int) -> None:
    """With the lock held and no worker running: account for how the last worker ended,
    validate (and repair) once, start the next worker and announce it."""
    rendezvous.write_lock_file(fd, f"{os.getpid()}\ncycle\n")
    state = rendezvous.load_state(sup.path)
    # The files that recorded the life of the worker before last go now; the last one's stay
    # for one more cycle, for processes still reading how it ended.
    for stale in state.pop("stale", None) or []:
        rendezvous.remove_markers(stale)
    last = state.get("worker")
    if last:
        state["stale"] = [rendezvous.worker_files(last)]
    ended = _how_it_ended(last)  # reads its markers: may wait up to 0.5 s, so no lock held
    now = time.monotonic()
    with sup._cond:
        sup.breaker.load(state.get("breaker"), now)
        reason, what, opened = _account(
            sup.breaker, sup.options.breaker.progress_calls, last, ended, now
        )
        sup.pending_reason = reason
        blocked = sup.breaker.blocked_for(now)
        consecutive = sup.breaker.consecutive
        if blocked is None and sup.state is State.BROKEN:
            sup.state = State.NO_WORKER
        elif blocked is not None:
            sup.state = State.BROKEN
        why = sup.breaker.reason(now) if opened else ""
        dump = sup.breaker.dump()
    if opened:
        sup._emit("breaker_open", None, why=why, deaths=[what])
    if state:  # nothing to record on a directory no shared worker has served
        state["worker"] = None
        state["breaker"] = dump
        rendezvous.save_state(sup.path, state)
    if blocked is not None:
        raise sup.crash_loop(now, blocked)
    sup.back_off(consecutive)
    sup.check_and_recover()
    if reason == "start":
        wal.maintain(sup.path)  # no worker has the directory open (see Supervisor._replace)
    # Our spare, if we keep one (spawned workers: macOS, portable mode), skips a Python start.
    process = standby.promote(sup._standby, fd, sup.options.start_timeout) or sup._spawn()
    with sup._cond:
        state["breaker"] = sup.breaker.dump()
    state["worker"] = {
        "pid": process.pid,
        "address": sup.address,
        "log": process.log_path,
        "opened": False,
    }
    rendezvous.save_state(sup.path, state)
    sup.start(process)
    state["worker"]["opened"] = True
    rendezvous.save_state(sup.path, state)
    rendezvous.announce(fd, process.pid, sup.address)
    rendezvous.sweep_soon()  # what dead workers of any directory left in the folder


def _how_it_ended(last: dict[str, Any] | None) -> tuple[str | None, str | None, bool]:
    """What the previous worker's markers say: its end, its exit status, whether it served."""
    if not last:
        return None, None, False
    markers = rendezvous.marker_paths(str(last["address"]), int(last["pid"]))
    end = rendezvous.read_marker(markers["end"])
    status = rendezvous.wait_marker(markers["status"], 0.0 if end else 0.5)
    served = rendezvous.read_marker(markers["served"]) is not None
    return end, status, served


def _account(
    breaker: Breaker,
    progress_calls: int,
    last: dict[str, Any] | None,
    ended: tuple[str | None, str | None, bool],
    now: float,
) -> tuple[str, str, bool]:
    """How the previous worker of the directory ended, counted once in its breaker: the reason
    the hooks run, what was recorded if it was a death, and whether that opened the breaker.
    No I/O."""
    if not last:
        return "start", "", False
    end, status, served = ended
    if end in ("closed", "idle", "asked to leave"):
        return "start", "", False  # it exited in order: nothing to suspect
    if end == "recycled":
        return "recycle", "", False
    code = int(status) if status and status.lstrip("-").isdigit() else None
    kind = end or signal_name(code) or ("exit" if code is not None else "unknown")
    what = f"pid {last['pid']}: {kind}" + (" after serving calls" if served else "")
    external = bool(last.get("opened")) and kind in NOT_SELF_INFLICTED
    opened = breaker.record(now, what, served=progress_calls if served else 0, external=external)
    return ("damage" if end == "damage" else "crash"), what, opened


def leave(sup: Supervisor, gen: Generation, linger: bool = False) -> bool | int:
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
            sup.emit_abnormal_exit(process, "closed", code)
        sup._emit("worker_retired", process.pid, why="closed")
        try:
            os.unlink(process.log_path)
        except OSError:
            pass
    process.close()
    return process.pid if last else False


def after_last(sup: Supervisor, pid: bool | int) -> None:
    """The last worker exited in order: compact the WAL and clear what recorded its life,
    unless a process already took the directory again (it then compacts at its own
    start). Waits at most a second."""
    give_up = time.monotonic() + 1.0
    while True:
        fd = rendezvous.try_lock(sup.lock_path)
        if fd is not None:
            try:
                state = rendezvous.load_state(sup.path)
                last = state.get("worker") or {}
                if last.get("pid") == pid and pid:
                    for stale in state.pop("stale", None) or []:
                        rendezvous.remove_markers(stale)
                    rendezvous.remove_markers(rendezvous.worker_files(last))
                    state["worker"] = None
                    rendezvous.save_state(sup.path, state)
                if sup.started_workers:
                    wal.maintain(sup.path)
                    wal.release(sup.path)
            finally:
                os.close(fd)
            return
        if time.monotonic() >= give_up:
            return
        time.sleep(0.01)


def reset_breaker(sup: Supervisor) -> None:
    """Forget the directory's death history, for every process. An open breaker means no
    worker runs, so the lock is free then; a worker serving the directory means there is
    nothing to reset but what this process saw."""
    give_up = time.monotonic() + 1.0
    while True:
        fd = rendezvous.try_lock(sup.lock_path)
        if fd is not None:
            try:
                state = rendezvous.load_state(sup.path)
                state["breaker"] = Breaker(sup.options.breaker).dump()
                rendezvous.save_state(sup.path, state)
            finally:
                os.close(fd)
            return
        if rendezvous.announced(sup.lock_path) or time.monotonic() >= give_up:
            return
        time.sleep(0.01)
