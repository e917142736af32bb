"""The crash-loop breaker and the poison-request ledger: one directory's history of deaths.

What it owns: deciding, from the deaths it is told about, whether respawning goes on, how long
to back off, and which requests are refused as poison. It never touches a process, a socket or
a file, and keeps no clock of its own (it is handed ``now``), so it is tested as a pure object.

**A crash loop is workers that die without making progress** (Kubernetes' CrashLoopBackOff
resets after a container ran well; Erlang/OTP counts restarts against the child's own life).
A worker *made progress* when it answered at least ``BreakerPolicy.progress_calls`` calls (any
reply: a result or a Chroma error). So:

- a death at start, or during a worker's first call, counts toward ``max_deaths`` within
  ``window`` seconds, and consecutive ones back off (the first respawn is immediate), unless
  the worker had opened the directory and was killed from outside (SIGKILL, SIGTERM): that says
  nothing about the worker;
- the death of a worker that served calls (the OOM killer, an operator's SIGKILL, a container
  runtime) is bad luck: it does not count toward ``max_deaths`` and ends a run of backoff;
- a ceiling on all deaths (``max_total_deaths`` within ``window``) still stops a service whose
  workers serve a call or two and die, again and again.

**A poison request** is one call (same target, method and arguments) that killed two workers
while the validator called the directory healthy: it is not sent again; its caller, and any
later caller of the very same call, gets :class:`~safechroma.PoisonRequestError`. A recovery
(the validator found damage) forgives every strike, since the damage explains the deaths.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Final

from .._policy import BreakerPolicy

# A bound on the poison ledger: fingerprints are 16 bytes, so this is memory, not policy.
_MAX_FINGERPRINTS: Final = 1024


@dataclasses.dataclass(frozen=True)
class Death:
    """One worker death, as the breaker counts it."""

    at: float  # monotonic time
    what: str  # "pid 123: SIGSEGV during query", for messages
    progress: bool  # the worker had answered progress_calls calls


class Breaker:
    """The history of deaths of one directory's workers and what it implies."""

    def __init__(self, policy: BreakerPolicy) -> None:
        self.policy = policy
        self.deaths: collections.deque[Death] = collections.deque()
        self.consecutive = 0  # deaths without progress since the last worker that made progress
        self.open_until: float | None = None
        self.strikes: collections.OrderedDict[bytes, int] = collections.OrderedDict()
        self.poison: set[bytes] = set()

    def made_progress(self, served: int) -> bool:
        return served >= self.policy.progress_calls

    def record(self, now: float, what: str, *, served: int, external: bool = False) -> bool:
        """Count one death; True when it opens the breaker.

        ``external``: the worker had opened the directory and was killed from outside (SIGKILL,
        SIGTERM), which says nothing about it: counted like a death after progress."""
        progress = external or self.made_progress(served)
        self.deaths.append(Death(now, what, progress))
        self._forget(now)
        self.consecutive = 0 if progress else self.consecutive + 1
        stalled = sum(1 for d in self.deaths if not d.progress)
        if stalled >= self.policy.max_deaths or len(self.deaths) >= self.policy.max_total_deaths:
            self.open_until = now + self.policy.cooldown
            return True
        return False

    def served(self) -> None:
        """A worker answered a call: a run of deaths without progress is over."""
        self.consecutive = 0

    def blocked_for(self, now: float) -> float | None:
        """Seconds the breaker stays open, or None when a worker may start."""
        if self.open_until is None:
            return None
        if now < self.open_until:
            return self.open_until - now
        self.open_until = None  # cooldown over: one new attempt goes through
        return None

    def recent(self, now: float) -> list[str]:
        self._forget(now)
        return [d.what for d in self.deaths]

    def reason(self, now: float) -> str:
        self._forget(now)
        stalled = sum(1 for d in self.deaths if not d.progress)
        window = f"{self.policy.window:.0f} s"
        if stalled >= self.policy.max_deaths:
            return f"{stalled} workers died without serving a call within {window}"
        return f"{len(self.deaths)} workers died within {window}"

    def reset(self) -> None:
        self.deaths.clear()
        self.consecutive = 0
        self.open_until = None
        self.strikes.clear()
        self.poison.clear()

    # -- one history for several processes (a shared directory) --------------------------

    def dump(self) -> dict[str, object]:
        """The death history as JSON-able data (poison strikes stay per process)."""
        return {
            "deaths": [[d.at, d.what, d.progress] for d in self.deaths],
            "consecutive": self.consecutive,
            "open_until": self.open_until,
        }

    def load(self, data: object, now: float) -> None:
        """Replace the death history by ``data`` from :meth:`dump` (another process's).

        Times are ``time.monotonic`` values, which every process on one boot shares; entries
        from the future (an earlier boot) are dropped."""
        if not isinstance(data, dict):
            return
        deaths = data.get("deaths")
        self.deaths = collections.deque(
            Death(float(at), str(what), bool(progress))
            for at, what, progress in (deaths if isinstance(deaths, list) else [])
            if float(at) <= now
        )
        consecutive = data.get("consecutive")
        self.consecutive = int(consecutive) if isinstance(consecutive, int) else 0
        until = data.get("open_until")
        self.open_until = (
            float(until)
            if isinstance(until, (int, float)) and until - now <= self.policy.cooldown
            else None
        )
        self._forget(now)

    # -- poison requests -----------------------------------------------------------------

    def strike(self, fingerprint: bytes) -> bool:
        """A worker died with this request in flight; True when it is now poison."""
        count = self.strikes.pop(fingerprint, 0) + 1
        self.strikes[fingerprint] = count
        while len(self.strikes) > _MAX_FINGERPRINTS:
            self.strikes.popitem(last=False)
        if count >= self.policy.poison_strikes:
            self.poison.add(fingerprint)
            if len(self.poison) > _MAX_FINGERPRINTS:
                self.poison.pop()
            return True
        return False

    def is_poison(self, fingerprint: bytes) -> bool:
        return fingerprint in self.poison

    def forgive(self) -> None:
        """The directory was found damaged and repaired: earlier strikes prove nothing."""
        self.strikes.clear()
        self.poison.clear()

    def _forget(self, now: float) -> None:
        while self.deaths and now - self.deaths[0].at > self.policy.window:
            self.deaths.popleft()
