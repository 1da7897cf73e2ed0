"""The settle decision, as a table: outcome and attempt in, the complete instruction the lane
carries out (which queue, which headers, what is counted and said)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from bridge.delivery.messages import (
    ATTEMPT,
    ATTEMPTS,
    DEAD_AT,
    LAST_ERROR,
    LAST_REASON,
    LAST_STATUS,
    ROUTING_KEY,
    SETTLE_BUGS,
    Facts,
)
from bridge.delivery.outcomes import (
    Delivered,
    Disable,
    GiveUp,
    Invalid,
    RetryLater,
    SettleBug,
    Unmatched,
)
from bridge.delivery.queues import QueueSet
from bridge.delivery.retry import delay_ladder
from bridge.delivery.settle import SETTLE_BUG_TRIES, Ack, Copy, Hold, Plan, decide

SCHEDULE = [5.0, 300.0]  # three attempts in all
QUEUES = QueueSet("patchwork.webhook.ci")
PLAN = Plan(QUEUES, SCHEDULE, delay_ladder(SCHEDULE))  # ladder 1, 5, 30, 60, 300, 900, 3600
NOW = datetime(2026, 12, 6, 22, 0, tzinfo=UTC)


def facts(attempt: int, **headers: object) -> Facts:
    base = {"ce-id": "41", ROUTING_KEY: "netdevbpf.patch-created", **headers}
    return Facts("41", QUEUES.main, base, attempt, 0)


def retry(delay_s: float, next_attempt: int) -> tuple[str, str, int]:
    return ("retried", QUEUES.retry(delay_s), next_attempt)


def dead(attempts: int, label: str = "dead_lettered") -> tuple[str, str, int]:
    return (label, QUEUES.dead, attempts)


def shape(instruction: object) -> object:
    """The part of an instruction the table compares: what and where, and the count header."""
    if isinstance(instruction, Copy):
        count = instruction.headers.get(ATTEMPT) or instruction.headers.get(ATTEMPTS)
        return (instruction.label, instruction.queue, count)
    return instruction


TABLE = [
    # (outcome, attempt, expected)
    (Delivered(204), 1, Ack("delivered")),
    (Delivered(), 3, Ack("delivered")),
    (Unmatched("dpdk.patch-created"), 1, Ack("unmatched", unmatched="dpdk.patch-created")),
    (RetryLater("http_5xx"), 1, retry(5.0, 2)),
    (RetryLater("timeout"), 2, retry(300.0, 3)),
    (RetryLater("http_5xx"), 3, dead(3)),
    # Retry-After wins over the schedule, rounded up to a ladder step...
    (RetryLater("http_429", delay_s=20.0), 1, retry(30.0, 2)),
    (RetryLater("http_503", delay_s=0.5), 2, retry(1.0, 3)),
    # ...longer than the longest step: the longest step.
    (RetryLater("http_429", delay_s=99_999.0), 1, retry(3600.0, 2)),
    # ...but never beyond the subscription's attempts.
    (RetryLater("http_429", delay_s=20.0), 3, dead(3)),
    (GiveUp("ssrf"), 1, dead(1)),
    (GiveUp("http_4xx"), 2, dead(2)),
    # Never reached a sink: no attempt spent.
    (Invalid("body is not UTF-8 JSON"), 1, dead(0, "refused")),
    (Disable("http_410", status=410), 1, Hold(Disable("http_410", status=410))),
    (Disable("http_410", status=410), 2, Hold(Disable("http_410", status=410))),
    # A bug while settling: the same attempt again after a pause, a bounded number of times.
    (SettleBug("KeyError: 'x'", tries=1), 1, retry(1.0, 1)),
    (SettleBug("KeyError: 'x'", tries=SETTLE_BUG_TRIES - 1), 2, retry(1.0, 2)),
    (SettleBug("KeyError: 'x'", tries=SETTLE_BUG_TRIES), 2, dead(2)),
]


@pytest.mark.parametrize(("outcome", "attempt", "expected"), TABLE)
def test_decide(outcome, attempt, expected):
    assert shape(decide(outcome, facts(attempt), PLAN, NOW)) == expected


def test_a_retry_carries_the_event_and_the_failure_and_says_when():
    copy = decide(RetryLater("http_5xx", "POST x: HTTP 502", status=502), facts(1), PLAN, NOW)
    assert isinstance(copy, Copy)
    assert copy.headers == {
        "ce-id": "41",
        ROUTING_KEY: "netdevbpf.patch-created",
        LAST_REASON: "http_5xx",
        LAST_ERROR: "POST x: HTTP 502",
        LAST_STATUS: 502,
        ATTEMPT: 2,
    }
    assert (copy.reason, copy.warn) == ("http_5xx", False)
    assert copy.said == "event 41 attempt 1 failed (http_5xx: POST x: HTTP 502); retry in 5s"


def test_a_dead_letter_says_how_many_attempts_when_and_why():
    copy = decide(GiveUp("http_4xx", "HTTP 400"), facts(2, **{LAST_STATUS: 500}), PLAN, NOW)
    assert isinstance(copy, Copy)
    assert copy.headers[ATTEMPTS] == 2 and ATTEMPT not in copy.headers
    assert copy.headers[DEAD_AT] == "2026-12-06T22:00:00+00:00"
    assert LAST_STATUS not in copy.headers  # the last answer had none
    assert copy.warn and copy.said == "event 41 dead-lettered after 2 attempts (http_4xx: HTTP 400)"


def test_a_settle_bug_is_counted_on_the_copy():
    copy = decide(SettleBug("KeyError: 'x'", tries=2), facts(1), PLAN, NOW)
    assert isinstance(copy, Copy) and copy.headers[SETTLE_BUGS] == 2


def test_an_empty_schedule_dead_letters_after_the_first_failure():
    plan = Plan(QUEUES, [], delay_ladder([]))
    assert shape(decide(RetryLater("connect"), facts(1), plan, NOW)) == dead(1)


def test_anything_else_is_a_bug_not_an_ack():
    with pytest.raises(TypeError, match="not an outcome"):
        decide("delivered", facts(1), PLAN, NOW)  # type: ignore[arg-type]
