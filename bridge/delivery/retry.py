"""Retry arithmetic as plain functions: the schedule and the broker's delay ladder.

The consumer realises a delay by parking the message in one of a fixed set of
broker queues, each with its own queue-wide TTL (``x-message-ttl``) that
dead-letters back to the main queue. Per-message TTLs would not work: RabbitMQ
only expires the message at a queue's head, so a long delay would block a short
one behind it. The price of fixed queues is that every delay is rounded up to a
ladder step and no per-message jitter is possible; messages retried together
stay together (the receiver's own concurrency limit spreads them out again).
"""

from __future__ import annotations

from collections.abc import Sequence

RETRY_AFTER_STEPS_S = (1.0, 5.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
"""Ladder steps always present, so a Retry-After is rounded up to at most a few times itself."""


def delay_for_attempt(schedule: Sequence[float], attempt: int) -> float | None:
    """Seconds to wait after failed attempt number ``attempt`` (1-based), or None when exhausted.

    A subscription gets ``1 + len(schedule)`` attempts: ``schedule[0]`` is the wait
    after the first attempt, and after the last attempt the event is dead-lettered.
    """
    if attempt < 1:
        raise ValueError(f"attempt numbers start at 1, got {attempt}")
    if attempt > len(schedule):
        return None
    return float(schedule[attempt - 1])


def delay_ladder(schedule: Sequence[float]) -> list[float]:
    """The delays the broker has queues for: the schedule's distinct delays and the fixed steps."""
    return sorted({float(d) for d in schedule} | set(RETRY_AFTER_STEPS_S))


def round_up_to_ladder(delay_s: float, ladder: Sequence[float]) -> float:
    """The smallest ladder step that waits at least ``delay_s``, else the largest step.

    ``ladder`` must be sorted ascending and non-empty (``delay_ladder`` is).
    """
    if not ladder:
        raise ValueError("the delay ladder is empty")
    for step in ladder:
        if step >= delay_s:
            return step
    return ladder[-1]
