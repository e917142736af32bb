"""The poison-request ledger's caller side: naming a call, refusing a poison one, striking one.

The ledger itself (strikes per call, forgiven by a recovery) lives in :class:`~.breaker.Breaker`,
beside the crash-loop record it shares a lock with. This module decides *which* call a death
strikes and builds the :class:`~safechroma.PoisonRequestError` a caller gets; it does no I/O
and keeps no state of its own.

A death strikes a call only when (a) a validator is set: it is what tells a call that kills
healthy workers from a damaged directory that kills every worker (a recovery then forgives
every strike); (b) the call was alone on the worker, so the calls that merely ran beside the
culprit are not blamed (retries run alone, see :mod:`.session`); (c) the death says nothing
about its cause otherwise: a deadline or a bad reply strikes nobody, nor does a signal that
comes from outside (:data:`NOT_SELF_INFLICTED`).
"""

from __future__ import annotations

import hashlib
from typing import Any, Final

from .._errors import PoisonRequestError, WorkerCrashedError
from .breaker import Breaker
from .generation import End
from .protocol import encode

__all__ = ["NOT_SELF_INFLICTED", "Fingerprint", "refusal", "strikes", "struck"]

# Signals a worker does not raise by running a call: they come from outside (the OOM killer, an
# operator, a container runtime), so a death by one is never a strike against the call in flight.
NOT_SELF_INFLICTED: Final = frozenset(
    {"SIGKILL", "SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGPIPE", "SIGUSR1", "SIGUSR2"}
)


class Fingerprint:
    """Names one call by its target, method and arguments, for the poison-request ledger.

    The digest is computed only when it is needed: when the worker died with the call in
    flight, or when some call is already poison (then every call is checked)."""

    __slots__ = ("_parts", "_digest", "by_value")

    def __init__(
        self, owner: Any, method: str, args: tuple[Any, ...], kwargs: Any, by_value: bool
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


def refusal(
    breaker: Breaker, call: Fingerprint, path: str, operation: str, now: float
) -> PoisonRequestError | None:
    """The error for a call the ledger holds poison (it is then not sent), else None."""
    if not (breaker.poison and breaker.is_poison(call.digest())):
        return None
    return PoisonRequestError(
        f"{operation} on {path} was not sent: this exact call (same target, method "
        f"and arguments) killed {breaker.policy.poison_strikes} workers while "
        "the directory checked healthy, so it would likely kill the next one too. "
        "Other calls are served. reset_breaker() forgets it.",
        pid=None,
        operation=operation,
        outcome_unknown=False,
        fingerprint=call.digest().hex(),
        deaths=breaker.recent(now),
        sent=False,
    )


def strikes(end: End | None, crash: WorkerCrashedError, validating: bool) -> bool:
    """Whether the death ``end`` (seen by ``crash``) counts against the call alone in flight."""
    if not validating or end is None or end.kind in ("timeout", "protocol"):
        return False
    if crash.signal in NOT_SELF_INFLICTED:
        return False
    return end.in_flight <= 1


def struck(
    breaker: Breaker, call: Fingerprint, crash: WorkerCrashedError, path: str, now: float
) -> PoisonRequestError:
    """The error for a call that has just become poison by killing ``crash.pid``'s worker."""
    unknown = "It was a write: it may or may not have been applied. "
    error = PoisonRequestError(
        f"{crash.operation} on {path} killed the worker again (pid {crash.pid}, "
        f"{crash.signal or 'exit ' + str(crash.exitcode)}): this exact call killed "
        f"{breaker.policy.poison_strikes} workers while the directory checked "
        "healthy, so it is not retried or sent again. Other calls are served. "
        + (unknown if crash.outcome_unknown else "")
        + "reset_breaker() forgets it.",
        pid=crash.pid,
        operation=crash.operation,
        outcome_unknown=crash.outcome_unknown,
        fingerprint=call.digest().hex(),
        deaths=breaker.recent(now),
        sent=True,
    )
    error.__cause__ = crash
    return error
