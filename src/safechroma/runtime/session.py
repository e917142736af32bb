"""The call path, top to bottom: what happens to one ``collection.get`` in the caller.

::

    Session.call                 retries reads on a fresh worker; suspects run alone
      Session._attempt           one try:
        Supervisor.lease         a channel of a ready worker (replacing it first if needed)
        poison.refusal           a call that killed workers of a healthy directory is not sent
        Session.handle_of        reopen the caller's object in a fresh worker, flush releases
        Session._send_functions  embedding functions the call carries, once per worker
        Supervisor.exchange      encode, send, wait, decode; reply or death -> result/exception
        poison.strikes           a death with the call alone in flight strikes it
        Supervisor.give_back     the channel back (discarded if broken), counters
      protocol.collection_refs   collections come back as CollectionRef, tagged with the worker

A :class:`Session` is the :class:`~.supervisor.Supervisor` of one directory with its public
call path; :func:`acquire` and :func:`release` keep one per directory per process. Reads are
retried on the next worker; a write whose request was sent raises with
``outcome_unknown=True``; a call refused unrun by a stopping shared worker is sent to the next
one without using up a retry.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time
from typing import Any, Final

from .._errors import ProtocolError, WorkerCrashedError, WorkerError
from .._policy import Options
from . import functions, poison, supervisor
from .functions import FUNCTIONS, FunctionRef
from .generation import Lease, State
from .handles import Released, Remote
from .poison import NOT_SELF_INFLICTED, Fingerprint
from .protocol import Op, Request, collection_refs, run_request
from .replies import DamageRetry, Retired
from .supervisor import Starter, Supervisor

__all__ = ["Session", "acquire", "release"]

logger = logging.getLogger("safechroma")

# How many times in a row a call may be refused unrun by a stopping shared worker.
_MAX_REFUSALS: Final = 10


class Session(Supervisor):
    """The supervisor of one directory, with the calls its clients and collections make."""

    def __init__(
        self,
        path: str,
        options: Options,
        primary: tuple[Any, str, str],
        starter: Starter | None = None,
    ) -> None:
        super().__init__(path, options, primary, starter)
        self._suspects = threading.Lock()  # retried calls run one at a time
        self._reopen = threading.RLock()  # one reopen at a time
        self.released = Released()

    def call(
        self,
        owner: Remote,
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
        fingerprint = Fingerprint(owner, method, args, kwargs, by_value)
        suspect = False
        attempt = 0
        refused = 0
        while attempt < attempts:
            attempt += 1
            try:
                if not suspect:
                    return self._attempt(owner, method, args, kwargs, timeout, read, fingerprint)
                # It was in flight at a death the call could have caused (a crash signal, an
                # exit): a suspect. Suspects run one at a time and alone on the worker (other
                # calls wait), so a call that kills every worker is told from the calls that
                # merely ran beside it (see poison.strikes).
                with self._suspects:
                    with self._cond:
                        self._alone = threading.current_thread()
                    try:
                        return self._attempt(
                            owner, method, args, kwargs, timeout, read, fingerprint, suspect=True
                        )
                    finally:
                        with self._cond:
                            self._alone = None
                            self._cond.notify_all()
            except Retired:
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
            except (WorkerCrashedError, ProtocolError, DamageRetry) as exc:
                if attempt >= attempts:
                    if isinstance(exc, DamageRetry):
                        raise exc.error from None
                    raise
                suspect = (
                    type(exc) is WorkerCrashedError
                    and exc.signal not in NOT_SELF_INFLICTED
                    and self.options.validator is not None
                )
                logger.info("retrying %s after: %s", method, exc)
        raise AssertionError("unreachable")  # pragma: no cover

    def _attempt(
        self,
        owner: Remote,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        read: bool,
        fingerprint: Fingerprint,
        *,
        suspect: bool = False,
    ) -> Any:
        lease = self.lease(alone=suspect)
        try:
            if self.breaker.poison:  # some call is poison: every call is checked
                self._refuse_poison(fingerprint, method)
            handle = self.handle_of(lease, owner, method)
            # Before the call is sent: a death here leaves no write's outcome unknown.
            self._send_functions(lease, (args, kwargs) if fingerprint.by_value else None)
            request = Request(Op.CALL, (handle, method, args, kwargs))
            try:
                result = self.exchange(lease, request, method, timeout, fingerprint.by_value)
            except WorkerError as exc:
                # Only a failure after the request was sent leaves a write's outcome unknown;
                # failures while starting or reopening happen before anything was sent.
                exc.outcome_unknown = exc._facts["outcome_unknown"] = not read
                if isinstance(exc, WorkerCrashedError):
                    self._strike(fingerprint, exc, lease)
                raise
        finally:
            self.give_back(lease)
        if self.breaker.consecutive or (self._standby.process is None and self.wants_standby):
            self.served()  # checked here first: it is a call on every call otherwise
        if type(result) is tuple or type(result) is list:  # a collection, or a list of them?
            return collection_refs(result, lease.gen.serial)
        return result

    def run(self, owner: Remote, fn: Any, args: tuple[Any, ...], timeout: float | None) -> Any:
        """Run ``fn(chroma_client, *args)`` in the worker (fn is carried by cloudpickle)."""
        name = getattr(fn, "__name__", "run")
        fingerprint = Fingerprint(owner, "run_in_worker", (fn, *args), {}, True)
        lease = self.lease()
        try:
            self._refuse_poison(fingerprint, name)
            request = run_request(self.handle_of(lease, owner), fn, args)
            self._send_functions(lease, args)
            try:
                result = self.exchange(lease, request, name, timeout, True)
            except WorkerCrashedError as exc:
                self._strike(fingerprint, exc, lease)
                raise
        finally:
            self.give_back(lease)
        self.served()
        return result

    def ping(self) -> float:
        """One empty round trip; returns the seconds the worker spent (transport check)."""
        lease = self.lease()
        try:
            seconds: float = self.exchange(
                lease, Request(Op.PING, None), "ping", self.options.timeout, seconds=True
            )
        finally:
            self.give_back(lease)
        return seconds

    # -- poison requests (the ledger is the breaker's; see poison.py) -----------------------

    def _refuse_poison(self, call: Fingerprint, operation: str) -> None:
        refused = poison.refusal(self.breaker, call, self.path, operation, time.monotonic())
        if refused is not None:
            raise refused

    def _strike(self, call: Fingerprint, crash: WorkerCrashedError, lease: Lease) -> None:
        """The worker died with ``call`` in flight; if it is now poison, say so instead."""
        if not poison.strikes(lease.gen.end, crash, self.options.validator is not None):
            return
        with self._cond:
            poisoned = self.breaker.strike(call.digest())
        if poisoned:
            raise poison.struck(self.breaker, call, crash, self.path, time.monotonic())

    # -- handles ---------------------------------------------------------------------------

    def handle_of(self, lease: Lease, owner: Remote, operation: str = "open") -> int:
        """``owner``'s handle in the lease's worker, reopening it there first if needed."""
        serial = lease.gen.serial
        if owner._handle_serial != serial:
            # One reopen at a time: two threads reopening one collection would leave two
            # handles in the worker and race on the caller's slot.
            with self._reopen:
                if owner._handle_serial != serial:
                    parent = owner._reopen_parent()
                    parent_handle = 0 if parent is None else self.handle_of(lease, parent)
                    request = owner._reopen_request(self.path, parent_handle)
                    self._send_functions(lease, request.body)
                    ref = self.exchange(lease, request, "open", self.options.start_timeout, True)
                    owner._handle = ref[1] if isinstance(ref, tuple) else int(ref)
                    owner._handle_serial = serial
        if self.released:
            handles = self.released.take(serial)
            if handles:
                # Named after the call it precedes: that is what the caller was waiting for.
                self.exchange(lease, Request(Op.RELEASE, handles), operation, self.options.timeout)
        return owner._handle

    def release(self, serial: int, handle: int) -> None:
        """Forget a handle whose caller-side object is gone (sent with the next call).

        Called from garbage collection, in any thread: it only appends to a deque.
        """
        self.released.add(serial, handle)

    def _send_functions(self, lease: Lease, body: Any) -> None:
        """Before a call: the program's registered classes, and each embedding function the
        call carries, sent to this worker once (runtime/functions.py)."""
        gen = lease.gen
        signature = FUNCTIONS.registry_signature()
        if gen.registry != signature:
            entries = FUNCTIONS.registry_payload()
            if entries:
                self.exchange(
                    lease, Request(Op.REGISTER, entries), "open", self.options.start_timeout
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
            mode, failures = self.exchange(
                lease,
                Request(Op.DEFINE, (ref.token, alternatives)),
                "open",
                self.options.start_timeout,
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


# -- one session per directory per process -------------------------------------------------


def acquire(path: str, options: Options, primary: tuple[Any, str, str]) -> Session:
    """The session for ``path`` in this process, created (and locked) on first use."""
    key = os.path.realpath(path)
    with supervisor._registry_lock:
        sup = supervisor._registry.get(key)
        if not isinstance(sup, Session) or sup.state is State.CLOSED:
            sup = Session(key, options, primary)
            supervisor._registry[key] = sup
        sup.refs += 1
        return sup


def release(sup: Supervisor) -> None:
    """Drop one reference; the last one closes the worker and releases the lock."""
    with supervisor._registry_lock:
        sup.refs -= 1
        if sup.refs > 0:
            return
        if supervisor._registry.get(sup.path) is sup:
            del supervisor._registry[sup.path]
    sup.close()
