"""The settle decision, as a table: outcome and attempt in, the complete instruction the lane
carries out (which queue, which headers, what is counted and said)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from bridge.delivery.messages import (
    ATTEMPT,
    ATTEMPTS,
    DEAD_AT,
    DUE,
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
from bridge.delivery.retry import levels_for
from bridge.delivery.settle import (
    SETTLE_BUG_TRIES,
    Ack,
    Copy,
    Hold,
    Plan,
    Wait,
    decide,
    wait_if_early,
)

SCHEDULE = [5.0, 300.0]  # three attempts in all
QUEUES = QueueSet("patchwork.webhook.ci")
PLAN = Plan(QUEUES, SCHEDULE, levels_for(SCHEDULE))  # levels 0.25, 1, 4, 16, ..., 1024
NOW = datetime(2026, 12, 6, 22, 0, tzinfo=UTC)
NOW_MS = round(NOW.timestamp() * 1000)


def facts(attempt: int, due_ms: int = 0, **headers: object) -> Facts:
    base = {"ce-id": "41", ROUTING_KEY: "netdevbpf.patch-created", **headers}
    if due_ms:
        base[DUE] = due_ms
    return Facts("41", QUEUES.main, base, attempt, 0, due_ms)


def retry(delay_s: float, next_attempt: int, first_hop_s: float) -> tuple[object, ...]:
    """Retried ``delay_s`` from now, parked first in the level of ``first_hop_s``."""
    return ("retried", QUEUES.retry(first_hop_s), next_attempt, delay_s)


def dead(attempts: int, label: str = "dead_lettered") -> tuple[object, ...]:
    return (label, QUEUES.dead, attempts, None)


def shape(instruction: object) -> object:
    """The part of an instruction the table compares: what and where, the count header, and
    how long from now it is due."""
    if isinstance(instruction, Copy):
        count = instruction.headers.get(ATTEMPT) or instruction.headers.get(ATTEMPTS)
        due = instruction.headers.get(DUE)
        wait_s = None if due is None else (due - NOW_MS) / 1000
        return (instruction.label, instruction.queue, count, wait_s)
    return instruction


TABLE = [
    # (outcome, attempt, expected)
    (Delivered(204), 1, Ack("delivered")),
    (Delivered(), 3, Ack("delivered")),
    (Unmatched("dpdk.patch-created"), 1, Ack("unmatched", unmatched="dpdk.patch-created")),
    (RetryLater("http_5xx"), 1, retry(5.0, 2, first_hop_s=4.0)),
    (RetryLater("timeout"), 2, retry(300.0, 3, first_hop_s=256.0)),
    (RetryLater("http_5xx"), 3, dead(3)),
    # Retry-After wins over the schedule, exactly...
    (RetryLater("http_429", delay_s=20.0), 1, retry(20.0, 2, first_hop_s=16.0)),
    (RetryLater("http_429", delay_s=7.0), 1, retry(7.0, 2, first_hop_s=4.0)),
    (RetryLater("http_503", delay_s=0.5), 2, retry(0.5, 3, first_hop_s=0.25)),
    # ...capped at an hour whatever a sink says.
    (RetryLater("http_429", delay_s=99_999.0), 1, retry(3600.0, 2, first_hop_s=1024.0)),
    # ...but never beyond the subscription's attempts.
    (RetryLater("http_429", delay_s=20.0), 3, dead(3)),
    (GiveUp("ssrf"), 1, dead(1)),
    (GiveUp("http_4xx"), 2, dead(2)),
    # Never reached a sink: no attempt spent.
    (Invalid("body is not UTF-8 JSON"), 1, dead(0, "refused")),
    (Disable("http_410", status=410), 1, Hold(Disable("http_410", status=410))),
    (Disable("http_410", status=410), 2, Hold(Disable("http_410", status=410))),
    # A bug while settling: the same attempt again after a pause, a bounded number of times.
    (SettleBug("KeyError: 'x'", tries=1), 1, retry(1.0, 1, first_hop_s=1.0)),
    (SettleBug("KeyError: 'x'", tries=SETTLE_BUG_TRIES - 1), 2, retry(1.0, 2, first_hop_s=1.0)),
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
        DUE: NOW_MS + 5000,
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
    plan = Plan(QUEUES, [], levels_for([]))
    assert shape(decide(RetryLater("connect"), facts(1), plan, NOW)) == dead(1)


def test_anything_else_is_a_bug_not_an_ack():
    with pytest.raises(TypeError, match="not an outcome"):
        decide("delivered", facts(1), PLAN, NOW)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("remaining_s", "expected"),
    [
        (41.0, Wait(QUEUES.retry(16.0), {}, 41.0)),  # 16 + 16 + 4 + 4 + 1 to go
        (3.0, Wait(QUEUES.retry(1.0), {}, 3.0)),
        (0.1, Wait(QUEUES.retry(0.25), {}, 0.1)),  # the one overshoot: under 0.25 s
        (0.01, None),  # on time
        (-30.0, None),  # late (it waited behind a backlog): at once
    ],
)
def test_a_copy_back_before_it_is_due_waits_again(remaining_s, expected):
    due = facts(2, due_ms=NOW_MS + round(remaining_s * 1000))
    wait = wait_if_early(due, PLAN, NOW)
    if expected is None:
        assert wait is None
    else:
        assert isinstance(wait, Wait)
        assert (wait.queue, wait.remaining_s) == (expected.queue, expected.remaining_s)
        # Parked as it came: same attempt, same due time, same event.
        assert wait.headers[DUE] == due.due_ms
        assert wait.headers["ce-id"] == "41"


def test_a_copy_without_a_due_time_is_due():
    assert wait_if_early(facts(2), PLAN, NOW) is None
