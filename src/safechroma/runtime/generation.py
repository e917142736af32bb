"""One worker's life as the caller sees it: its process, its channels, its calls, its end.

A :class:`Generation` is created for each worker the supervisor starts or attaches to, and is
dropped once that worker is stopped. Its end (how the worker died, or was killed) is recorded
exactly once, by whichever caller sees it first, under the generation's own lock: every other
caller that was in flight reads the same :class:`End` and builds its own error from it
(:mod:`.replies`). Nothing here emits events, counts deaths or touches the supervisor's state.

A :class:`Lease` is one channel of one generation, held by one caller for one call.
"""

from __future__ import annotations

import enum
import threading
import time

from .._errors import signal_name
from .channels import ChannelPool
from .protocol import Reply, Request, encode, read_reply
from .transport import Channel, PeerDied, PeerMisbehaved, PeerTimedOut, WorkerProcess

__all__ = ["End", "Generation", "Lease", "State", "WorkerGone"]


class State(enum.Enum):
    """The supervisor's worker, as its callers see it."""

    NO_WORKER = "no worker"  # the next call replaces it (validate, recover, start)
    READY = "ready"  # a live worker has opened the directory and serves calls
    BROKEN = "broken"  # too many deaths: the breaker is open, calls fail with CrashLoopError
    CLOSED = "closed"  # closed by the caller: calls raise ClientClosedError


class End:
    """How a worker's life ended: facts shared by every call that was in flight."""

    __slots__ = ("kind", "in_flight", "exitcode", "signal", "tail", "operation")

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


class WorkerGone(Exception):
    """Internal: one exchange found the worker dead, late, or lying (see :meth:`Lease.exchange`).

    ``how`` is "died", "timeout" or "protocol"; ``why`` says what the reply was for "protocol".
    """

    def __init__(self, how: str, why: str = "") -> None:
        super().__init__(how, why)
        self.how = how
        self.why = why


class Generation:
    """One worker's life as the supervisor sees it: its process, its channels, its calls."""

    def __init__(self, process: WorkerProcess) -> None:
        self.process = process
        self.pool = ChannelPool(process)
        self.serial = process.serial
        self.inflight = 0  # leases out; changed under Supervisor._cond
        self.retiring: str | None = None  # why it is stopped once idle (panic, damage, ...)
        self.end: End | None = None  # set once, under end_lock, by the first to see it
        self.end_lock = threading.Lock()
        # Embedding functions (runtime/functions.py): tokens this worker has built, and the
        # caller's registry signature it was last sent.
        self.defined: set[str] = set()
        self.registry = -1

    @property
    def usable(self) -> bool:
        """Neither ended nor being retired: new calls may lease it."""
        return self.end is None and self.retiring is None

    def died(self, operation: str, in_flight: int | None = None) -> tuple[End, bool]:
        """The worker closed its channel (or exited): its end, and whether we recorded it.

        The first caller waits (up to 2 s) for the exit status and keeps the log's tail; a
        worker that closed its socket but still runs is of no use any more and is killed.
        """
        process = self.process
        with self.end_lock:
            first = self.end is None
            if first:
                code = process.wait(2.0)
                if code is None:
                    process.kill()
                    code = process.returncode
                sig = signal_name(code)
                self.end = End(
                    sig or "exit",
                    code,
                    sig,
                    process.log_tail(),
                    operation,
                    self.inflight if in_flight is None else in_flight,
                )
            end = self.end
        assert end is not None
        return end, first

    def killed(self, kind: str, operation: str) -> bool:
        """Kill the worker for ``kind`` ("timeout", "protocol"); True if this recorded its end
        (False: it had died, or another caller had killed it, first)."""
        process = self.process
        with self.end_lock:
            if self.end is not None:
                return False
            process.kill()
            code = process.returncode
            self.end = End(kind, code, signal_name(code), "", operation, self.inflight)
            return True


class Lease:
    """A channel of one worker, held by one caller for one call (and its reopen/release)."""

    __slots__ = ("gen", "channel", "broken", "answered", "calls", "served", "spent")

    def __init__(self, gen: Generation, channel: Channel) -> None:
        self.gen = gen
        self.channel = channel
        self.broken = False
        # What its exchanges answered, added to the supervisor's counters under its lock when
        # the lease is given back: replies (results and errors), results, answered calls (the
        # breaker's progress), and the seconds the worker spent on the last one.
        self.answered = 0
        self.calls = 0
        self.served = 0
        self.spent = 0.0

    def exchange(self, request: Request, timeout: float | None, by_value: bool) -> Reply:
        """Send ``request``, wait for its reply (on the socket and the worker's pidfd), and
        decode it. The only I/O of a call.

        Raises:
            WorkerGone: the worker died, passed the deadline, or sent a reply that does not
                decode; the channel is marked broken (it is discarded when given back).
        """
        data, buffers = encode((request.op._value_, request.body), by_value=by_value)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            frame = self.channel.exchange(data, buffers, deadline)
        except PeerDied:
            self.broken = True
            raise WorkerGone("died") from None
        except PeerTimedOut:
            self.broken = True
            raise WorkerGone("timeout") from None
        except PeerMisbehaved as exc:
            self.broken = True
            raise WorkerGone("protocol", str(exc)) from None
        except BaseException:
            # Interrupted mid-exchange (KeyboardInterrupt): the reply may still come; this
            # channel must never carry another call, or that call would read this reply.
            self.broken = True
            raise
        try:
            return read_reply(*frame)
        except Exception as exc:  # noqa: BLE001 - any undecodable reply is a protocol error
            self.broken = True
            raise WorkerGone("protocol", f"undecodable reply: {exc!r}") from None
