"""The settle decision: what becomes of a message once its outcome is known. Pure, table-tested.

``decide`` is the one place that maps an outcome to what the engine does with the message:
ack it, or move a copy to which queue with which headers (then ack), or hold it and
disable the lane; what is counted, and what is said. The lane only carries it out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from bridge.delivery.messages import Facts, carried_headers, dead_headers, retry_headers
from bridge.delivery.outcomes import (
    Delivered,
    Disable,
    Failure,
    GiveUp,
    Invalid,
    RetryLater,
    SettleBug,
    Settled,
    Unmatched,
)
from bridge.delivery.queues import QueueSet
from bridge.delivery.retry import RETRY_AFTER_MAX_S, delay_for_attempt, next_hop

SETTLE_BUG_TRIES = 3
"""Attempts to settle a message whose settling raised a bug, before it goes to ``.dead``."""
SETTLE_BUG_PAUSE_S = 1.0
"""Between those attempts, so that a bug cannot spin on one message."""


@dataclass(frozen=True, slots=True)
class Plan:
    """What the decision needs of the lane."""

    queues: QueueSet
    schedule: Sequence[float]
    """Delays between attempts; attempts = 1 + its length."""
    levels: Sequence[float]
    """The delay levels the lane has retry queues for, ascending (``retry.levels_for``)."""


@dataclass(frozen=True, slots=True)
class Ack:
    """Done with it: ``delivered``, or ``unmatched`` (a stale binding routed it)."""

    label: str
    unmatched: str | None = None
    """The routing key none of the lane's patterns match, to say once."""


@dataclass(frozen=True, slots=True)
class Copy:
    """Publish a copy to ``queue`` with ``headers``, confirmed, then ack the original: a
    crash in between leaves a duplicate, never a loss."""

    queue: str
    headers: dict[str, Any] = field(repr=False)
    label: str
    """``retried``, ``dead_lettered`` or ``refused`` (never handed to a sink)."""
    reason: str
    """Why the attempt failed: a metric label (unknown ones are counted as ``other``)."""
    said: str
    """One line for the log, after the lane's name."""
    warn: bool
    """A dead letter is a WARNING, a retry INFO."""


@dataclass(frozen=True, slots=True)
class Hold:
    """Disable the lane and hand the message back: it waits in the main queue, in its
    place, until an operator enables the lane again."""

    outcome: Disable
    label: str = "disabled"

    @property
    def reason(self) -> str:
        return self.outcome.reason


@dataclass(frozen=True, slots=True)
class Wait:
    """Move a copy on without an attempt, counting nothing: a parked copy back before it is
    due (to its next delay level), or one an open breaker holds back (to the main queue)."""

    queue: str
    headers: dict[str, Any] = field(repr=False)
    remaining_s: float


Instruction = Ack | Copy | Hold


def wait_if_early(facts: Facts, plan: Plan, now: datetime) -> Wait | None:
    """Where a copy that came back before its due time waits next; None when it is due."""
    if not facts.due_ms:
        return None
    remaining_s = (facts.due_ms - _ms(now)) / 1000
    hop = next_hop(remaining_s, plan.levels)
    if hop is None:
        return None
    return Wait(plan.queues.retry(hop), carried_headers(facts), remaining_s)


def unspent(facts: Facts, plan: Plan) -> Wait:
    """Back to the main queue's tail as it came, its attempt not spent (an open breaker)."""
    return Wait(plan.queues.main, carried_headers(facts), 0.0)


def decide(outcome: Settled, facts: Facts, plan: Plan, now: datetime) -> Instruction:
    """``facts.attempt`` is the attempt that produced ``outcome`` (1-based).

    A receiver's Retry-After (already capped by the sink) wins over the schedule; either
    is kept to within a smallest delay level (``bridge.delivery.retry``). The lane's
    attempts are never exceeded for it.
    """
    attempt = facts.attempt
    match outcome:
        case Delivered():
            return Ack("delivered")
        case Unmatched(routing_key=key):
            return Ack("unmatched", unmatched=key)
        case Disable():
            return Hold(outcome)
        case Invalid():
            # Never handed to a sink: no attempt was spent on it.
            return _dead(outcome, facts, plan, attempt - 1, "refused", now)
        case SettleBug(tries=tries):
            if tries < SETTLE_BUG_TRIES:
                # The same attempt again: the sink's attempt was not what failed.
                return _retry(outcome, facts, plan, SETTLE_BUG_PAUSE_S, attempt, now)
            return _dead(outcome, facts, plan, attempt, "dead_lettered", now)
        case RetryLater(delay_s=asked_s):
            scheduled_s = delay_for_attempt(plan.schedule, attempt)
            if scheduled_s is None:
                return _dead(outcome, facts, plan, attempt, "dead_lettered", now)
            wanted_s = scheduled_s if asked_s is None else min(asked_s, RETRY_AFTER_MAX_S)
            return _retry(outcome, facts, plan, wanted_s, attempt + 1, now)
        case GiveUp():
            return _dead(outcome, facts, plan, attempt, "dead_lettered", now)
    raise TypeError(f"not an outcome: {outcome!r}")


def _retry(
    outcome: RetryLater | SettleBug,
    facts: Facts,
    plan: Plan,
    delay_s: float,
    next_attempt: int,
    now: datetime,
) -> Copy:
    hop = next_hop(delay_s, plan.levels)
    return Copy(
        plan.queues.main if hop is None else plan.queues.retry(hop),
        retry_headers(facts, outcome, next_attempt, _ms(now) + round(delay_s * 1000)),
        "retried",
        outcome.reason,
        f"event {facts.message_id} attempt {facts.attempt} failed "
        f"({outcome.reason}: {outcome.detail}); retry in {delay_s:g}s",
        warn=False,
    )


def _dead(
    outcome: Failure, facts: Facts, plan: Plan, attempts: int, label: str, now: datetime
) -> Copy:
    return Copy(
        plan.queues.dead,
        dead_headers(facts, outcome, attempts, now),
        label,
        outcome.reason,
        f"event {facts.message_id} dead-lettered after {attempts} attempts "
        f"({outcome.reason}: {outcome.detail})",
        warn=True,
    )


def _ms(when: datetime) -> int:
    return round(when.timestamp() * 1000)
