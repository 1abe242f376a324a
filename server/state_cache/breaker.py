"""A circuit breaker, so a dead or slow Redis costs requests nothing after the first failures.

Closed: every call goes through. After `failure_threshold` consecutive failures it opens: calls
are refused at once (a cache miss) for a backoff that doubles up to `max_backoff_s`, with jitter
so replicas do not probe in step. Then one probe call is let through (half-open); success closes
the breaker and resets the backoff, failure reopens it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CircuitBreaker:
    def __init__(
        self,
        failure_threshold: int = 3,
        base_backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        jitter: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        self.failure_threshold = failure_threshold
        self.base_backoff_s = base_backoff_s
        self.max_backoff_s = max_backoff_s
        self.jitter = jitter
        self._clock = clock
        self.state = CLOSED
        self.consecutive_failures = 0
        self.num_opens = 0
        self.num_refused = 0
        self._backoff_s = base_backoff_s
        self._open_until = 0.0
        self._probe_in_flight = False

    def allow(self) -> bool:
        """May a call go out now? Half-open lets exactly one probe through at a time."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN and self._clock() >= self._open_until:
            self.state = HALF_OPEN
        if self.state == HALF_OPEN and not self._probe_in_flight:
            self._probe_in_flight = True
            return True
        self.num_refused += 1
        return False

    def record_success(self) -> None:
        self.state = CLOSED
        self.consecutive_failures = 0
        self._backoff_s = self.base_backoff_s
        self._probe_in_flight = False

    def record_failure(self) -> None:
        self.consecutive_failures += 1
        was_probe = self.state == HALF_OPEN
        self._probe_in_flight = False
        if was_probe or (self.state == CLOSED and self.consecutive_failures >= self.failure_threshold):
            self._open(grow=was_probe)

    def abandon(self) -> None:
        """The call was cancelled: no verdict on Redis, but a half-open probe slot must be freed."""
        self._probe_in_flight = False

    def _open(self, grow: bool) -> None:
        if grow:
            self._backoff_s = min(self._backoff_s * 2, self.max_backoff_s)
        wait = self._backoff_s * (1 + random.uniform(-self.jitter, self.jitter))
        self._open_until = self._clock() + wait
        self.state = OPEN
        self.num_opens += 1
