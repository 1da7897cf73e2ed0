"""A lane's circuit breaker, as plain state: when it opens, when it probes, when it closes.

A receiver that is down (refused connections, timeouts, 5xx) for a weekend should not
have every event tried on schedule and dead-lettered on Monday. After ``failures``
such attempts in a row the lane stops consuming: events wait in its main queue, no
attempt spent, nothing dead-lettered for the outage. It then probes with one event at
growing intervals (``probe_s``, doubled up to ``probe_max_s``) and consumes again at the
first success. Other failures (4xx, 429, a bad URL) say the receiver is there: they
never open it, and they close it.

Whether it is open is kept on the broker, like the disabled state, as a marker queue
(``<main>.breaker``), so that every webhook process and ``subscriptions list`` see it.
"""

from __future__ import annotations

from dataclasses import dataclass

from bridge.delivery.outcomes import RetryLater, Settled

RECEIVER_DOWN = frozenset({"connect", "timeout", "http_5xx"})
"""Failure reasons that say the receiver is not there; others say it answered."""


@dataclass(frozen=True, slots=True)
class BreakerSpec:
    failures: int
    """Receiver-down failures in a row that open it; 0: never."""
    probe_s: float
    probe_max_s: float


NO_BREAKER = BreakerSpec(0, 30.0, 1800.0)


def receiver_down(outcome: Settled) -> bool:
    return isinstance(outcome, RetryLater) and outcome.reason in RECEIVER_DOWN


class Breaker:
    """In-process state; the marker queue is the shared truth the lane follows."""

    def __init__(self, spec: BreakerSpec) -> None:
        self.spec = spec
        self.open = False
        self._in_a_row = 0
        self.interval_s = spec.probe_s
        self.next_probe_at = 0.0

    def saw(self, outcome: Settled) -> bool:
        """Count an attempt's outcome; True when this one opens the breaker."""
        if self.spec.failures <= 0 or self.open:
            return False
        if receiver_down(outcome):
            self._in_a_row += 1
            return self._in_a_row >= self.spec.failures
        self._in_a_row = 0
        return False

    def opened(self, now: float) -> None:
        self.open = True
        self.interval_s = self.spec.probe_s
        self.next_probe_at = now + self.interval_s

    def probe_due(self, now: float) -> bool:
        return self.open and now >= self.next_probe_at

    def probe_failed(self, now: float) -> None:
        self.interval_s = min(self.interval_s * 2, self.spec.probe_max_s)
        self.next_probe_at = now + self.interval_s

    def closed(self, *, half_open: bool = False) -> None:
        """Closed again. ``half_open``: closed with nothing proven (the queue was empty to
        probe with), so the first receiver-down failure opens it again."""
        self.open = False
        self.interval_s = self.spec.probe_s
        self._in_a_row = max(0, self.spec.failures - 1) if half_open else 0
