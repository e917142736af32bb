"""The crash-loop breaker: when to stop starting workers, and how long to wait between starts.

Owns the history of deaths of one directory's workers and nothing else: it never touches a
process. The supervisor tells it about each death (once per death, whatever the number of calls
in flight) and about each served call, and asks it before each start.
"""

from __future__ import annotations

import collections
import time

import tenacity

from .._policy import BreakerPolicy


class Breaker:
    """Deaths within a sliding window; open after ``policy.max_deaths`` of them.

    States: closed (starts allowed), open (``open_until`` in the future: starts refused), and
    half-open once the cooldown passed (the next start is let through; a death re-opens it).
    """

    def __init__(self, policy: BreakerPolicy) -> None:
        self.policy = policy
        self.deaths: collections.deque[tuple[float, str]] = collections.deque()
        self.consecutive = 0  # deaths since the last served call
        self.open_until = 0.0
        self.is_open = False

    def record_death(self, what: str) -> bool:
        """Count one death; returns True when this death opened the breaker."""
        now = time.monotonic()
        self.consecutive += 1
        self.deaths.append((now, what))
        while self.deaths and now - self.deaths[0][0] > self.policy.window:
            self.deaths.popleft()
        if len(self.deaths) >= self.policy.max_deaths and not self.is_open:
            self.is_open = True
            self.open_until = now + self.policy.cooldown
            return True
        return False

    def record_progress(self) -> None:
        """A worker served a call: a run of consecutive deaths is over."""
        self.consecutive = 0

    def retry_after(self) -> float:
        """Seconds left before the open breaker lets a start through (0: it may start now)."""
        if not self.is_open:
            return 0.0
        return max(0.0, self.open_until - time.monotonic())

    def half_open(self) -> None:
        """The cooldown passed: let the next start through."""
        self.is_open = False

    def reset(self) -> None:
        """Forget every death (``reset_breaker()``)."""
        self.deaths.clear()
        self.consecutive = 0
        self.is_open = False

    def backoff(self, wait: tenacity.wait.wait_base) -> float:
        """Seconds to wait before this start: 0 for the first respawn after a served call."""
        if self.consecutive <= 1:
            return 0.0
        state = tenacity.RetryCallState(None, None, (), {})  # type: ignore[arg-type]
        state.attempt_number = self.consecutive - 1
        return float(wait(state))
