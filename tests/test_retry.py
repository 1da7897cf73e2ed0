"""Retry arithmetic: the schedule, Retry-After and the broker's delay ladder."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.delivery.retry import (
    RETRY_AFTER_STEPS_S,
    delay_for_attempt,
    delay_ladder,
    round_up_to_ladder,
)
from bridge.sinks.retry_after import RETRY_AFTER_MAX_S, RETRY_AFTER_MIN_S, parse_retry_after

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


def test_ladder_merges_schedule_and_retry_after_steps_without_repeats() -> None:
    assert delay_ladder([5, 300, 1800, 36000, 36000]) == [
        1.0,
        5.0,
        30.0,
        60.0,
        300.0,
        900.0,
        1800.0,
        3600.0,
        36000.0,
    ]


@pytest.mark.parametrize(
    ("delay", "expected"),
    [(0.2, 1.0), (1.0, 1.0), (1.5, 5.0), (120.0, 300.0), (3600.0, 3600.0), (7200.0, 36000.0)],
)
def test_delays_round_up_to_the_next_ladder_step(delay: float, expected: float) -> None:
    ladder = delay_ladder([5, 300, 36000])
    assert round_up_to_ladder(delay, ladder) == expected


def test_delay_beyond_the_ladder_gets_the_longest_step() -> None:
    assert round_up_to_ladder(99999.0, delay_ladder([5])) == 3600.0


@given(st.lists(delays, max_size=10), delays)
def test_rounding_waits_at_least_as_long_unless_beyond_the_ladder(
    schedule: list[float], delay: float
) -> None:
    ladder = delay_ladder(schedule)
    step = round_up_to_ladder(delay, ladder)
    assert step in ladder
    assert set(RETRY_AFTER_STEPS_S) | set(schedule) == set(ladder)
    assert ladder == sorted(ladder)
    if delay <= ladder[-1]:
        assert step >= delay
        assert all(s < delay for s in ladder if s < step)
    else:
        assert step == ladder[-1]


@given(st.lists(delays, max_size=10))
def test_every_schedule_delay_is_a_ladder_step_exactly(schedule: list[float]) -> None:
    ladder = delay_ladder(schedule)
    assert all(round_up_to_ladder(d, ladder) == d for d in schedule)
