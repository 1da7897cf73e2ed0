"""The settle decision: what becomes of a message once its outcome is known. Pure, table-tested.

``decide`` is the one place that maps an outcome to an AMQP action; the consumer
only carries the action out (and logs and counts it under ``Action.label``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bridge.sinks.base import Delivered, Disable, GiveUp, RetryLater
from bridge.webhook.messages import Invalid, SettleBug, Unmatched
from bridge.webhook.retry import delay_for_attempt, round_up_to_ladder

SETTLE_BUG_TRIES = 3
"""Attempts to settle a message whose settling raised a bug, before it goes to ``.dead``."""
SETTLE_BUG_PAUSE_S = 1.0
"""Between those attempts, so that a bug cannot spin on one message."""


@dataclass(frozen=True, slots=True)
class Ack:
    """Done with it: ``delivered``, or ``unmatched`` (a stale binding routed it)."""

    label: str


@dataclass(frozen=True, slots=True)
class Retry:
    """Park a copy in the retry queue of ``delay_s`` (a ladder step), for ``next_attempt``."""

    delay_s: float
    next_attempt: int
    label: str = "retried"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Move a copy to ``.dead``, recording ``attempts`` sink attempts spent on it."""

    attempts: int
    label: str
    """``dead_lettered`` after failed attempts, ``refused`` when no sink could take it."""


@dataclass(frozen=True, slots=True)
class DisableSubscription:
    """Stop the subscription and hand the message back: it waits in the main queue."""

    label: str = "disabled"


Action = Ack | Retry | DeadLetter | DisableSubscription
Settled = Delivered | RetryLater | GiveUp | Disable | Invalid | Unmatched | SettleBug


def decide(
    outcome: Settled, attempt: int, schedule: Sequence[float], ladder: Sequence[float]
) -> Action:
    """``attempt`` is the one that produced ``outcome`` (1-based); ``ladder`` the retry steps.

    A receiver's Retry-After (already capped by the sink) wins over the schedule, rounded
    up to a step of the ladder; the subscription's attempts are never exceeded for it.
    """
    match outcome:
        case Delivered():
            return Ack("delivered")
        case Unmatched():
            return Ack("unmatched")
        case Disable():
            return DisableSubscription()
        case Invalid():
            # Never handed to a sink: no attempt was spent on it.
            return DeadLetter(attempt - 1, "refused")
        case SettleBug(tries=tries):
            if tries < SETTLE_BUG_TRIES:
                # The same attempt again: the sink's attempt was not what failed.
                return Retry(round_up_to_ladder(SETTLE_BUG_PAUSE_S, ladder), attempt)
            return DeadLetter(attempt, "dead_lettered")
        case RetryLater(delay_s=asked_s):
            scheduled_s = delay_for_attempt(schedule, attempt)
            if scheduled_s is None:
                return DeadLetter(attempt, "dead_lettered")
            wanted_s = scheduled_s if asked_s is None else asked_s
            return Retry(round_up_to_ladder(wanted_s, ladder), attempt + 1)
        case GiveUp():
            return DeadLetter(attempt, "dead_lettered")
    raise TypeError(f"not an outcome: {outcome!r}")
