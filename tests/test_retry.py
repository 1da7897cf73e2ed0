"""Retry arithmetic: the schedule, Retry-After and delays composed from the levels."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.delivery.retry import (
    ON_TIME_S,
    SMALLEST_LEVEL_S,
    delay_for_attempt,
    legacy_delays,
    levels_for,
    next_hop,
)
from bridge.sinks.retry_after import RETRY_AFTER_MAX_S, RETRY_AFTER_MIN_S, parse_retry_after
from bridge.webhook.subscriptions import DEFAULT_RETRY_SCHEDULE_S

NOW = datetime(2026, 11, 24, 3, 14, 28, tzinfo=UTC)
SCHEDULE = [5.0, 300.0, 1800.0]

delays = st.floats(min_value=0.001, max_value=4_000_000, allow_nan=False)


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [(1, 5.0), (2, 300.0), (3, 1800.0), (4, None), (10, None)],
)
def test_schedule_gives_one_delay_per_failed_attempt_then_none(
    attempt: int, expected: float | None
) -> None:
    assert delay_for_attempt(SCHEDULE, attempt) == expected


def test_empty_schedule_means_a_single_attempt() -> None:
    assert delay_for_attempt([], 1) is None


def test_attempt_zero_is_a_caller_bug() -> None:
    with pytest.raises(ValueError, match="start at 1"):
        delay_for_attempt(SCHEDULE, 0)


@given(st.lists(delays, max_size=12))
def test_attempts_are_one_more_than_the_schedule(schedule: list[float]) -> None:
    retried = [delay_for_attempt(schedule, n) for n in range(1, len(schedule) + 3)]
    assert retried[: len(schedule)] == schedule
    assert retried[len(schedule) :] == [None, None]


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("120", 120.0),
        (" 30 ", 30.0),
        ("0", RETRY_AFTER_MIN_S),
        ("86400", RETRY_AFTER_MAX_S),
        ("99999999999999999999999", RETRY_AFTER_MAX_S),
        (format_datetime(NOW + timedelta(seconds=90), usegmt=True), 90.0),
        ("Tue, 24 Nov 2026 03:16:28 GMT", 120.0),
        ("Tue, 24 Nov 2026 03:16:28 -0000", 120.0),
        (format_datetime(NOW - timedelta(hours=1), usegmt=True), RETRY_AFTER_MIN_S),
        (format_datetime(NOW + timedelta(days=2), usegmt=True), RETRY_AFTER_MAX_S),
    ],
)
def test_retry_after_is_honoured_within_bounds(header: str, expected: float) -> None:
    assert parse_retry_after(header, NOW) == expected


@pytest.mark.parametrize("header", [None, "", "soon", "-5", "1.5", "12abc", "٣", "Tue, 99 Foo"])
def test_unusable_retry_after_falls_back_to_the_schedule(header: str | None) -> None:
    assert parse_retry_after(header, NOW) is None


@given(st.text(max_size=40))
def test_retry_after_never_raises_and_stays_within_bounds(header: str) -> None:
    delay = parse_retry_after(header, NOW)
    assert delay is None or RETRY_AFTER_MIN_S <= delay <= RETRY_AFTER_MAX_S


@given(st.integers(min_value=0, max_value=10**30))
def test_delta_seconds_are_clamped(seconds: int) -> None:
    assert parse_retry_after(str(seconds), NOW) == min(
        max(float(seconds), RETRY_AFTER_MIN_S), RETRY_AFTER_MAX_S
    )


def test_levels_are_powers_of_four_up_to_the_longest_delay_a_lane_may_ask():
    # The default schedule's longest delay is 10 h; a Retry-After at most an hour.
    assert levels_for(DEFAULT_RETRY_SCHEDULE_S) == [0.25, 1, 4, 16, 64, 256, 1024, 4096, 16384]
    assert levels_for([5.0]) == [0.25, 1, 4, 16, 64, 256, 1024]  # an hour's Retry-After
    assert len(levels_for([4_294_967.0])) == 13  # RabbitMQ's longest TTL (49.7 days)


def walk(delay_s: float, levels: list[float]) -> list[float]:
    """The hops a copy makes when every park ends exactly on time."""
    hops: list[float] = []
    remaining = delay_s
    while (hop := next_hop(remaining, levels)) is not None:
        hops.append(hop)
        remaining -= hop
    return hops


@pytest.mark.parametrize(
    ("delay", "hops"),
    [
        (2.0, [1, 1]),
        (7.0, [4, 1, 1, 1]),
        (45.0, [16, 16, 4, 4, 4, 1]),
        (0.5, [0.25, 0.25]),
        (0.3, [0.25, 0.25]),  # the one overshoot: 0.2 s
        (300.0, [256, 16, 16, 4, 4, 4]),
    ],
)
def test_a_delay_is_composed_from_the_levels(delay: float, hops: list[float]) -> None:
    assert walk(delay, levels_for([5.0])) == hops


@given(st.lists(delays, max_size=10), st.floats(min_value=0.05, max_value=4_294_967))
def test_composed_delays_end_no_earlier_and_under_a_quarter_second_later(
    schedule: list[float], delay: float
) -> None:
    levels = levels_for(schedule)
    hops = walk(delay, levels)
    assert delay - ON_TIME_S <= sum(hops) < delay + SMALLEST_LEVEL_S
    assert len(hops) <= 3 * len(levels) + (delay / levels[-1])  # bounded: no level 4 times


def test_old_ladder_queues_are_the_ones_no_level_replaces() -> None:
    assert legacy_delays([5.0, 300.0, 36000.0]) == [5.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 36000.0]
    assert 1.0 not in legacy_delays([1.0])  # a level now as it was a step then
