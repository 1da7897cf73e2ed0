"""The overlap window: late-visible events are caught, nothing confirmed is sent twice."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from bridge.events import Event, parse_event
from bridge.producer.cursor import Cursor
from bridge.producer.window import Window

T0 = datetime(2026, 11, 24, 13, 0, 0)


def event(event_id: int, when: datetime) -> Event:
    item = {
        "id": event_id,
        "category": "patch-created",
        "project": {"link_name": "dpdk"},
        "date": when.isoformat(),
    }
    return parse_event(item, json.dumps(item))


def test_first_poll_asks_from_the_floor_or_from_the_beginning():
    assert Window(Cursor(), 60).since() is None
    assert Window(Cursor(floor="2026-01-01T00:00:00"), 60).since() == "2026-01-01T00:00:00"


def test_since_is_the_high_water_mark_minus_the_overlap_in_naive_server_time():
    window = Window(Cursor(), 60)
    window.confirm([event(1, T0)])
    assert window.since() == "2026-11-24T12:59:00"


def test_since_never_goes_before_the_floor():
    window = Window(Cursor(floor="2026-11-24T12:59:30"), 60)
    window.confirm([event(1, T0)])
    assert window.since() == "2026-11-24T12:59:30"


def test_late_event_with_an_older_date_is_new_but_confirmed_ones_are_not():
    window = Window(Cursor(), 60)
    window.confirm([event(1, T0), event(3, T0 + timedelta(seconds=5))])
    late = event(2, T0 + timedelta(seconds=1))
    assert window.is_new(late)
    assert not window.is_new(event(3, T0 + timedelta(seconds=5)))


def test_unconfirmed_earlier_event_holds_the_high_water_mark():
    window = Window(Cursor(), 0)
    window.confirm([event(1, T0)])
    window.confirm([event(5, T0 + timedelta(hours=1))], advance=False)
    assert window.high_water == T0.isoformat()
    assert not window.is_new(event(5, T0 + timedelta(hours=1)))


def test_cursor_round_trips_through_json():
    window = Window(Cursor(floor="2026-11-01T00:00:00"), 60)
    window.confirm([event(1, T0), event(2, T0 + timedelta(microseconds=163041))])
    restored = Window(Cursor.from_json(window.cursor().to_json()), 60)
    assert restored.since() == window.since()
    assert not restored.is_new(event(2, T0))
    assert restored.high_water == "2026-11-24T13:00:00.163041"


@given(
    st.lists(
        st.tuples(st.integers(0, 3600), st.integers(0, 30)),  # (date offset s, visibility delay s)
        min_size=1,
        max_size=60,
        unique_by=lambda t: t,
    ),
    st.integers(1, 20),
)
def test_polling_with_an_overlap_longer_than_the_delay_sees_every_event_once(schedule, step_s):
    """Simulate events that become visible up to 30 s after their date, polled every step."""
    overlap_s = 31
    events = [event(i, T0 + timedelta(seconds=d)) for i, (d, _) in enumerate(schedule)]
    visible_at = {
        e.id: e.when + timedelta(seconds=lag) for e, (_, lag) in zip(events, schedule, strict=True)
    }
    window = Window(Cursor(), overlap_s)
    published: list[int] = []
    now = T0
    end = T0 + timedelta(seconds=3600 + 31 + step_s)
    while now <= end:
        since = window.since()
        page = sorted(
            (e for e in events if visible_at[e.id] <= now and (since is None or e.date >= since)),
            key=lambda e: e.when,
        )
        fresh = [e for e in page if window.is_new(e)]
        published += [e.id for e in fresh]
        window.confirm(page)
        window.prune()
        now += timedelta(seconds=step_s)
    assert sorted(published) == sorted(e.id for e in events)
