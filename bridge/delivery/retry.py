"""Retry arithmetic as plain functions: the schedule, and delays composed from a few queues.

A delay is realised in the broker, so it survives restarts: the message is parked in a
queue whose queue-wide TTL (``x-message-ttl``) dead-letters it back to the main queue.
Per-message TTLs would not work: RabbitMQ only expires the message at a queue's head, so
a long delay would block a short one behind it. A queue per delay would not either: a
receiver's ``Retry-After: 7`` and every schedule would each need their own.

So each lane has the same few *levels*, powers of four from 0.25 s, and a copy carries
the time it is due (``x-bridge-due``). When it comes back to the main queue early, the
lane parks it again in the largest level that does not overshoot what remains. A delay
of 45 s is 16 + 16 + 4 + 4 + 4 + 1 s; a delay ends at most one smallest level (0.25 s)
late, plus a few milliseconds per hop. Levels above the longest delay a lane can ask for
are not declared.
"""

from __future__ import annotations

from collections.abc import Sequence

RETRY_AFTER_MAX_S = 3600.0
"""A receiver cannot park an event for longer than an hour with one answer (a sink's
delay is capped to it too)."""
SMALLEST_LEVEL_S = 0.25
LEVEL_FACTOR = 4
MAX_DELAY_S = 4_294_967.0
"""RabbitMQ's largest queue TTL (2^32-1 ms)."""
ON_TIME_S = 0.02
"""A copy back this close to its due time is delivered, not parked again."""

LEGACY_LADDER_S = (1.0, 5.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
"""Retry queues versions before 0.3 declared for every lane, besides one per delay of its
schedule: what a lane still finds on the broker after an upgrade."""


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


def levels_for(schedule: Sequence[float]) -> list[float]:
    """The delay levels a lane with ``schedule`` declares, ascending: enough to compose its
    longest delay or the longest Retry-After, whichever is longer, without many hops."""
    longest = max([RETRY_AFTER_MAX_S, *schedule])
    levels = [SMALLEST_LEVEL_S]
    while levels[-1] * LEVEL_FACTOR <= min(longest, MAX_DELAY_S):
        levels.append(levels[-1] * LEVEL_FACTOR)
    return levels


def next_hop(remaining_s: float, levels: Sequence[float]) -> float | None:
    """The level to park a copy in with ``remaining_s`` to wait, or None: deliver it now.

    The largest level that does not overshoot; the smallest when even that does, which is
    the only overshoot (under one smallest level). ``levels`` is ascending and non-empty.
    """
    if not levels:
        raise ValueError("a lane has at least one delay level")
    if remaining_s <= ON_TIME_S:
        return None
    fitting = [level for level in levels if level <= remaining_s]
    return fitting[-1] if fitting else levels[0]


def legacy_delays(schedule: Sequence[float]) -> list[float]:
    """Delays whose queues versions before 0.3 declared for ``schedule`` and this version
    does not: they drain back to the main queue by their TTL, then are deleted."""
    current = set(levels_for(schedule))
    return sorted({float(d) for d in (*LEGACY_LADDER_S, *schedule)} - current)
