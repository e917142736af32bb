"""Policy as data: options, the crash-loop breaker, hook contexts, events and stats.

Everything a caller can tune is a field here; the supervisor only reads them. Hooks take one
context object, so fields can be added later without breaking anyone's hook (the shape of
tenacity's ``RetryCallState``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

import tenacity


def _default_memory_limit() -> int | None:
    if sys.platform == "win32":  # no sysconf; and no worker transport there yet
        return None
    try:
        total: int = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - exotic platforms
        return None
    # Half the machine, at least 4 GiB: a normal worker's address space is under 1 GiB at
    # 10k records (measured: VmPeak ~0.9 GiB), so this only stops runaway allocations.
    return max(4 << 30, total // 2)


@dataclasses.dataclass(frozen=True)
class BreakerPolicy:
    """When to stop respawning: a crash loop is workers that die without making progress.

    A worker *made progress* when it answered at least ``progress_calls`` calls (a result or a
    Chroma error) before it died. Deaths without progress (at start, during the first call)
    are the crash loop; the death of a worker that served calls (the OOM killer, an operator's
    SIGKILL) is bad luck and ends any backoff. See ``safechroma.runtime.breaker``.

    Attributes:
        max_deaths: this many deaths without progress within ``window`` seconds open the
            breaker.
        window: the sliding window in seconds.
        cooldown: seconds after which an open breaker lets one new attempt through.
        progress_calls: calls a worker must have answered for its death not to count.
        max_total_deaths: this many deaths of any kind within ``window`` also open it (a
            service whose workers serve a call or two and die, over and over). The default is
            two deaths a second for a minute, far above any fault rate a workload survives
            usefully.
        poison_strikes: a call that was in flight at this many deaths, with the validator
            calling the directory healthy, is poison: it is refused, not retried.
    """

    max_deaths: int = 5
    window: float = 60.0
    cooldown: float = 30.0
    progress_calls: int = 1
    max_total_deaths: int = 120
    poison_strikes: int = 2


@dataclasses.dataclass(frozen=True)
class HookContext:
    """What the validator and the recovery hook are told.

    Attributes:
        path: the persist directory (absolute).
        reason: why the hook runs: ``"start"`` (first start), ``"crash"`` (the worker died),
            ``"damage"`` (Chroma raised an error that means on-disk damage), ``"manual"``.
        crash: the error that led here, if any.
        attempt: 1 for the first respawn after a healthy period, then 2, 3, ...
        report: the validator's report (None when the validator itself is running).
    """

    path: str
    reason: Literal["start", "crash", "damage", "manual"]
    crash: BaseException | None = None
    attempt: int = 1
    report: Any = None


Validator = Callable[[HookContext], Any]
Recovery = Callable[[HookContext], Any]


def default_validator(ctx: HookContext) -> Any:
    """The built-in validator: :func:`safechroma.check_directory` on ``ctx.path``."""
    from .storage.validate import check_directory

    report = check_directory(ctx.path)
    if report.healthy:
        # chromadb 1.5.9 rewrites index_metadata.pickle in place (truncate, then write): a kill
        # mid-flush can leave it empty, and with the WAL purged nothing else maps labels to
        # ids. Repair then maps labels through this copy of the last healthy map.
        from .storage.recovery import snapshot_label_maps

        snapshot_label_maps(ctx.path, report)
    return report


def default_recovery(ctx: HookContext) -> Any:
    """The built-in, non-destructive recovery: :func:`safechroma.repair_directory`."""
    from .storage.recovery import repair_directory

    return repair_directory(ctx.path, ctx.report)


@dataclasses.dataclass(frozen=True)
class Event:
    """One thing that happened to a worker, for logging and the ``on_event`` callback.

    Attributes:
        kind: ``worker_started``, ``worker_died``, ``worker_timeout``, ``worker_retired``,
            ``protocol_error``, ``validated``, ``recovered``, ``recovery_failed``,
            ``breaker_open``, ``breaker_reset``.
        path: the persist directory.
        pid: the worker's pid, when one is concerned.
        detail: facts specific to the kind (signal, operation, report, ...).
        time: ``time.time()`` when it happened.
    """

    kind: str
    path: str
    pid: int | None = None
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)
    time: float = dataclasses.field(default_factory=time.time)


@dataclasses.dataclass(frozen=True)
class Options:
    """Worker options, passed as keyword arguments to ``SafeClient``/``SafeCollection``.

    The first client opened on a path in a process creates its worker, so worker-level fields
    (memory, hooks, breaker, standby) come from that client; ``timeout``, ``read_retries`` and
    ``replay_writes`` apply per client.

    Attributes:
        timeout: default deadline in seconds for one call (None: no deadline). Large enough for
            the biggest legitimate ``add`` (a full max-size batch takes seconds, not minutes).
        start_timeout: deadline for a new worker to open the directory.
        read_retries: how many times an idempotent read is retried on a fresh worker after
            the worker died under it.
        replay_writes: replay ``add``/``upsert``/``update``/``delete`` after a crash instead of
            raising ``WorkerCrashedError(outcome_unknown=True)``. These are safe to resend in
            Chroma (duplicate ids in ``add`` are ignored, the others are idempotent).
        exclusive: False (the default): processes of the same user that open the directory
            share its one supervised worker (the first one starts it, the others attach, the
            last one to close ends it). True: this process alone uses the directory, and
            another process's client gets ``DirectoryLockedError`` (or waits ``lock_timeout``).
        lock_timeout: seconds to wait for a process that holds the directory without sharing
            it (an exclusive client, ``safechroma serve``, a repair) to release it (0: fail at
            once with ``DirectoryLockedError``).
        validator: called before each start; returns a report with a ``healthy`` attribute.
            None disables validation.
        recovery: called when the report says damaged; may return a report with
            ``salvage_files`` to write back through the fresh worker. None disables recovery
            (a damaged directory then raises ``RecoveryError``).
        recover_on_damage_errors: treat Chroma errors that mean on-disk damage (``Error
            loading hnsw index`` ...) like a crash: validate and recover before the next call.
        breaker: the crash-loop breaker.
        respawn_wait: tenacity wait strategy between consecutive respawns.
        memory_limit: address-space ceiling of the worker in bytes (None: no limit).
        max_reply_bytes: largest reply accepted from the worker.
        standby: keep one warm spare worker (chromadb imported, directory not opened) so that
            a crashed worker is replaced in milliseconds instead of an interpreter start. Costs
            one idle process (~80 MB RSS).
        reembed: an embedding function (``documents -> embeddings``) that recovery uses, in the
            worker, to re-embed the records whose vectors could not be salvaged. None: such
            records are saved (document and metadata) to ``<salvage>.removed.json`` in the
            backup and deleted, so Chroma keeps serving the rest (``not_recovered`` and
            ``removed`` in the ``salvage_applied`` event name them).
        worker_init: a callable run in each new worker before it opens the directory (logging,
            environment); carried by cloudpickle.
        max_requests: replace the worker, between calls and with no error to anyone, after it
            answered this many calls (gunicorn's ``max_requests``). None: never.
        max_worker_rss: replace the worker between calls once its resident memory passes this
            many bytes (read at most once a second), against native memory Chroma never gives
            back (chroma-core/chroma#5843). None (the default): never; a worker at 10k x 384
            records holds ~360 MiB, so a ceiling of a few GiB only catches a leak.
        max_file_bytes: the largest file the worker may write (``RLIMIT_FSIZE``): ``"auto"``
            (the default) allows the largest file of the directory plus half the free disk,
            so a runaway write fails in the worker instead of filling the disk; an int sets
            it; None: no limit.
        keep_warm: seconds a shared worker stays up after its last process ended without
            closing its clients (a short command that simply exits), so that the next command
            on the directory joins it instead of paying a worker start (~0.7 s). ``close()``
            still releases the directory at once, a process that was killed releases it after
            0.5 s, and ``safechroma repair``, an exclusive client and ``safechroma release``
            ask an idle warm worker to leave at once. 0: leave with the last process.
        on_event: called with each :class:`Event` (in the thread that observed it).
        journal: keep the write journal (issue 21): before a write is acknowledged, a copy of
            its records (ids, documents, metadata, vectors) is appended to
            ``<path>/.safechroma/journal/``, outside ``chroma.sqlite3``, so that a repair can
            make the directory whole again whatever single file is damaged. Worker-level.
            False turns it off; so does WAL retention mode ``"chroma"`` (no second copy); an
            existing journal is then moved aside (``.safechroma/journal-off-<stamp>``).
        sleep: how to sleep between respawns (tests pass a recorder).
    """

    timeout: float | None = 600.0
    start_timeout: float = 120.0
    read_retries: int = 2
    replay_writes: bool = False
    exclusive: bool = False
    lock_timeout: float = 0.0
    validator: Validator | None = default_validator
    recovery: Recovery | None = default_recovery
    recover_on_damage_errors: bool = True
    breaker: BreakerPolicy = BreakerPolicy()
    respawn_wait: Any = tenacity.wait_exponential(multiplier=0.05, max=5.0) + tenacity.wait_random(
        0, 0.05
    )
    memory_limit: int | None = dataclasses.field(default_factory=_default_memory_limit)
    max_reply_bytes: int = 16 << 30
    standby: bool = True
    reembed: Callable[[list[str]], Any] | None = None
    worker_init: Callable[[], None] | None = None
    max_requests: int | None = None
    max_worker_rss: int | None = None
    max_file_bytes: int | Literal["auto"] | None = "auto"
    keep_warm: float = 10.0
    on_event: Callable[[Event], None] | None = None
    journal: bool = True  # issue 21: storage/journal.py
    sleep: Callable[[float], None] = time.sleep


@dataclasses.dataclass(frozen=True)
class Stats:
    """A snapshot of one worker supervisor's life.

    Attributes:
        path: the persist directory.
        calls: calls answered by a worker.
        errors: calls that raised an error from Chroma (the worker stayed alive).
        deaths: worker deaths, by signal name (``"exit"`` for a plain exit).
        respawns: workers started after the first.
        timeouts: calls that passed their deadline.
        recoveries: times the recovery hook ran.
        last_crash: the last worker error, or None.
        worker_pid: pid of the current worker, or None.
        worker_uptime: seconds since the current worker started, or None.
        last_call_worker_seconds: time spent inside the worker on the last call.
        worker_rss: resident memory of the current worker in bytes, or None.
        breaker_open: whether the crash-loop breaker is open.
        incomplete_records: records a repair of this directory could not bring back whole
            and that nobody has acknowledged yet (``safechroma check PATH --ack-losses``);
            -1 when the losses marker cannot be read.
        losses_files: the files that name those records (beside each repair's backup).
    """

    path: str
    calls: int
    errors: int
    deaths: dict[str, int]
    respawns: int
    timeouts: int
    recoveries: int
    last_crash: BaseException | None
    worker_pid: int | None
    worker_uptime: float | None
    last_call_worker_seconds: float
    worker_rss: int | None
    breaker_open: bool
    incomplete_records: int = 0
    losses_files: list[str] = dataclasses.field(default_factory=list)


_call_timeout: contextvars.ContextVar[float | None | Literal["default"]] = contextvars.ContextVar(
    "safechroma_call_timeout", default="default"
)


@contextlib.contextmanager
def call_timeout(seconds: float | None) -> Iterator[None]:
    """Set the deadline of every safechroma call made in this context (thread or task).

    Example::

        with safechroma.call_timeout(2.0):
            col.query(query_embeddings=q)   # WorkerTimeoutError after 2 s

    Args:
        seconds: the deadline; None means no deadline.
    """
    token = _call_timeout.set(seconds)
    try:
        yield
    finally:
        _call_timeout.reset(token)


def effective_timeout(default: float | None) -> float | None:
    """The deadline for a call now: the innermost ``call_timeout`` or the client's default."""
    value = _call_timeout.get()
    return default if value == "default" else value
