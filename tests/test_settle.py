"""The settle decision, as a table: outcome and attempt in, the action the consumer carries out."""

from __future__ import annotations

import pytest

from bridge.sinks.base import Delivered, Disable, GiveUp, RetryLater
from bridge.webhook.messages import Invalid, SettleBug, Unmatched
from bridge.webhook.retry import delay_ladder
from bridge.webhook.settle import (
    SETTLE_BUG_TRIES,
    Ack,
    DeadLetter,
    DisableSubscription,
    Retry,
    decide,
)

SCHEDULE = [5.0, 300.0]  # three attempts in all
LADDER = delay_ladder(SCHEDULE)  # 1, 5, 30, 60, 300, 900, 3600

TABLE = [
    # (outcome, attempt, expected action)
    (Delivered(204), 1, Ack("delivered")),
    (Delivered(), 3, Ack("delivered")),
    (Unmatched("dpdk.patch-created"), 1, Ack("unmatched")),
    (RetryLater("http_5xx"), 1, Retry(5.0, 2)),
    (RetryLater("timeout"), 2, Retry(300.0, 3)),
    (RetryLater("http_5xx"), 3, DeadLetter(3, "dead_lettered")),
    # Retry-After wins over the schedule, rounded up to a ladder step...
    (RetryLater("http_429", delay_s=20.0), 1, Retry(30.0, 2)),
    (RetryLater("http_503", delay_s=0.5), 2, Retry(1.0, 3)),
    # ...longer than the longest step: the longest step.
    (RetryLater("http_429", delay_s=99_999.0), 1, Retry(3600.0, 2)),
    # ...but never beyond the subscription's attempts.
    (RetryLater("http_429", delay_s=20.0), 3, DeadLetter(3, "dead_lettered")),
    (GiveUp("ssrf"), 1, DeadLetter(1, "dead_lettered")),
    (GiveUp("http_4xx"), 2, DeadLetter(2, "dead_lettered")),
    # Never reached a sink: no attempt spent.
    (Invalid("body is not UTF-8 JSON"), 1, DeadLetter(0, "refused")),
    (Disable("http_410", status=410), 1, DisableSubscription()),
    (Disable("http_410", status=410), 2, DisableSubscription()),
    # A bug while settling: the same attempt again after a pause, a bounded number of times.
    (SettleBug("KeyError: 'x'", tries=1), 1, Retry(1.0, 1)),
    (SettleBug("KeyError: 'x'", tries=SETTLE_BUG_TRIES - 1), 2, Retry(1.0, 2)),
    (SettleBug("KeyError: 'x'", tries=SETTLE_BUG_TRIES), 2, DeadLetter(2, "dead_lettered")),
]


@pytest.mark.parametrize(("outcome", "attempt", "expected"), TABLE)
def test_decide(outcome, attempt, expected):
    assert decide(outcome, attempt, SCHEDULE, LADDER) == expected


def test_an_empty_schedule_dead_letters_after_the_first_failure():
    assert decide(RetryLater("connect"), 1, [], delay_ladder([])) == DeadLetter(1, "dead_lettered")


def test_anything_else_is_a_bug_not_an_ack():
    with pytest.raises(TypeError, match="not an outcome"):
        decide("delivered", 1, SCHEDULE, LADDER)  # type: ignore[arg-type]
