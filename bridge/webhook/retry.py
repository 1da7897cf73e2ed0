"""Retry arithmetic as plain functions: the schedule, Retry-After, and the broker's delay ladder.

The consumer realises a delay by parking the message in one of a fixed set of
broker queues, each with its own queue-wide TTL (``x-message-ttl``) that
dead-letters back to the main queue. Per-message TTLs would not work: RabbitMQ
only expires the message at a queue's head, so a long delay would block a short
one behind it. The price of fixed queues is that every delay is rounded up to a
ladder step and no per-message jitter is possible; messages retried together
stay together (the receiver's own concurrency limit spreads them out again).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

RETRY_AFTER_MIN_S = 1.0
"""A receiver asking for 0 s still gets a breath, so a 429 loop cannot spin."""
RETRY_AFTER_MAX_S = 3600.0
"""A receiver cannot park an event for longer than an hour with one answer."""
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


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds a ``Retry-After`` header asks for, clamped to [1 s, 1 h]; None if absent or invalid.

    RFC 9110 allows delta-seconds (``120``) or an HTTP-date; ``now`` must be
    timezone-aware and is only used for the date form. A date in the past means
    "now", which the minimum turns into one second.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isascii() and text.isdigit():
        seconds = float(int(text))
    else:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:  # "-0000" in the date: RFC 5322 says UTC
            when = when.replace(tzinfo=UTC)
        seconds = (when - now).total_seconds()
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, RETRY_AFTER_MIN_S), RETRY_AFTER_MAX_S)


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
