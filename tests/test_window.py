"""The window: what each poll reads, and which events are new. Late events are id gaps."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.events import Event, parse_event
from bridge.producer.cursor import Cursor, Gap
from bridge.producer.window import (
    FOLD_BELOW_EVENTS,
    GAP_RECHECK_MAX_S,
    GAP_RECHECK_MIN_S,
    GAP_SLACK,
    GAP_WIDEN_AFTER_S,
    MAX_GAP_CHECKS,
    MERGE_ABOVE_EVENTS,
    TICK,
    Due,
    GapCheck,
    Window,
)

T0 = datetime(2026, 11, 24, 13, 0, 0)
SWEEP_S = 10.0


def event(event_id: int, when: datetime) -> Event:
    item = {
        "id": event_id,
        "category": "patch-created",
        "project": {"link_name": "dpdk"},
        "date": when.isoformat(),
    }
    return parse_event(item, json.dumps(item))


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_first_poll_asks_from_the_floor_or_from_the_beginning():
    assert Window(Cursor(), 60).since() is None
    assert Window(Cursor(floor="2026-01-01T00:00:00"), 60).since() == "2026-01-01T00:00:00"


def test_a_poll_reads_just_after_the_newest_date_published():
    window = Window(Cursor(), 60)
    window.confirm([event(1, T0), event(2, at(0.5))])
    # ``since`` is inclusive: from the newest date itself, it would be served every poll.
    assert window.since() == (at(0.5) + TICK).isoformat()
    assert window.gap_checks() == []  # contiguous ids: nothing more


def after(first_id: int, n: int, t: float) -> list[Event]:
    """``n`` contiguous events from ``first_id`` on, 0.1 s apart from ``t`` seconds."""
    return [event(first_id + i, at(t + 0.1 * i)) for i in range(n)]


def test_a_young_gap_is_looked_for_strictly_between_its_neighbours_an_older_one_wider():
    clock = Clock()
    window = Window(Cursor(), 300, clock=clock)
    window.confirm([event(10, at(0)), event(12, at(2)), event(13, at(3))])
    assert window.open_gaps == 1 and window.take_changes().opened == 1
    # Nothing published lies in that range: its count serves no event until the late one
    # is there, and then serves exactly it.
    assert window.gap_checks() == [GapCheck((((at(0) + TICK).isoformat(), at(2).isoformat()),))]
    clock.now += GAP_WIDEN_AFTER_S
    # Old enough for a date set a moment before a neighbour's: a little slack each side.
    assert window.gap_checks() == [
        GapCheck((((at(0) - GAP_SLACK).isoformat(), (at(2) + GAP_SLACK).isoformat()),))
    ]


def test_neighbours_sharing_a_date_are_looked_around_at_once():
    window = Window(Cursor(), 300, clock=Clock())
    window.confirm([event(10, at(1)), event(12, at(1)), event(13, at(3))])
    assert window.gap_checks() == [
        GapCheck((((at(1) - GAP_SLACK).isoformat(), (at(1) + GAP_SLACK).isoformat()),))
    ]


def test_near_gaps_are_one_check_far_ones_their_own():
    window = Window(Cursor(), 300, clock=Clock())
    events = [event(1, at(0)), *after(3, 5, 1), *after(9, MERGE_ABOVE_EVENTS + 5, 2)]
    events += after(9 + MERGE_ABOVE_EVENTS + 6, 3, 20)  # id 9 + MERGE + 5 is missing too
    window.confirm(events)
    far, near = window.gap_checks()  # never checked: the youngest first
    assert [len(near.spans), len(far.spans)] == [2, 1]
    assert near.since == (at(0) + TICK).isoformat() and near.before == at(2).isoformat()
    low, high = near.halves()
    assert low.spans + high.spans == near.spans and low.spans and high.spans


def test_a_gap_near_the_newest_date_is_read_with_the_new_events_not_counted():
    """One request a poll, where a count and then a read were two: the read of new events
    starts a little below the gap (an event dated a few ms before its neighbour is in it).
    A gap further down than FOLD_BELOW_EVENTS published events is counted as before."""
    clock = Clock()
    window = Window(Cursor(), 300, clock=clock)
    many = FOLD_BELOW_EVENTS + 5
    far_below = after(99, many, 10)  # 98 is missing below these
    near = after(100 + many, FOLD_BELOW_EVENTS - 2, 100)  # and 99 + many below these
    window.confirm([event(97, at(0)), *far_below, *near])
    due = window.due()
    assert due.read_from == (far_below[-1].when + TICK - GAP_SLACK).isoformat()
    assert due.checks == [GapCheck((((at(0) + TICK).isoformat(), at(10).isoformat()),))]
    # Both were checked: neither is due again within GAP_RECHECK_MIN_S.
    assert window.due() == Due(None, [])


def test_a_read_through_gaps_not_due_yet_checks_them_too():
    clock = Clock()
    window = Window(Cursor(), 300, clock=clock)
    window.confirm([event(1, at(0)), *after(3, 5, 1)])  # gap 2
    assert window.due().read_from == (at(0) + TICK - GAP_SLACK).isoformat()
    clock.now += 0.45
    window.confirm(after(9, 5, 3))  # gap 8, above gap 2, due at once
    assert window.due().read_from == (at(1.4) + TICK - GAP_SLACK).isoformat()
    clock.now += 0.5  # gap 2 due again: its read looks through gap 8 too
    assert window.due().read_from == (at(0) + TICK - GAP_SLACK).isoformat()
    clock.now += 0.45  # gap 8 would be due, had that read not checked it
    assert window.due() == Due(None, [])


def test_far_gaps_are_counted_with_one_request_and_halved_on_a_difference():
    window = Window(Cursor(), 300, clock=Clock())
    many = FOLD_BELOW_EVENTS + MERGE_ABOVE_EVENTS + 5
    window.confirm([event(1, at(0)), *after(3, many, 1), *after(4 + many, many, 20)])
    far, near = window.gap_checks()  # two checks, counted side by side before
    due = Window(Cursor(), 300, clock=Clock())
    due.confirm([event(1, at(0)), *after(3, many, 1), *after(4 + many, many, 20)])
    assert due.due(fold=False).checks == [GapCheck(tuple(sorted(far.spans + near.spans)))]


def test_a_woken_poll_checks_only_the_gaps_opened_while_nothing_listened():
    clock = Clock()
    window = Window(Cursor(), 300, clock=clock)
    window.confirm([event(1, at(0)), *after(3, 5, 1)])  # gap 2, opened while unheard
    unheard_until = clock.now
    clock.now += 10
    window.confirm([*after(9, 5, 3)])  # gaps 8: a notification will name its event
    assert [c.since for c in window.gap_checks(opened_by=unheard_until)] == [
        (at(0) - GAP_SLACK).isoformat()
    ]
    assert len(window.gap_checks()) == 1  # the other: only a full poll checks it


def test_the_late_event_fills_its_gap_and_is_new_once():
    window = Window(Cursor(), 300, clock=Clock())
    window.confirm([event(10, at(0)), event(12, at(2))])
    late = event(11, at(1))
    assert window.is_new(late)
    window.confirm([event(10, at(0)), late, event(12, at(2))])
    assert not window.is_new(late) and window.has_seen(11)
    assert window.open_gaps == 0 and window.gap_checks() == []
    assert window.take_changes().filled == 1


def test_a_young_gap_is_checked_about_once_a_second_an_old_one_less_often():
    clock = Clock()
    window = Window(Cursor(), 3600, clock=clock)
    window.confirm([event(1, at(0)), *after(3, 5, 1)])
    assert len(window.gap_checks()) == 1
    clock.now += 0.2  # a 0.2 s poll does not check it again yet
    assert window.gap_checks() == []
    clock.now += GAP_RECHECK_MIN_S
    assert len(window.gap_checks()) == 1
    clock.now += 1000
    assert len(window.gap_checks()) == 1
    clock.now += 1  # checked at age 1001 s: next in 30 s, not sooner
    assert window.gap_checks() == []
    clock.now += GAP_RECHECK_MAX_S
    assert len(window.gap_checks()) == 1


def test_at_most_a_few_gap_checks_a_poll_youngest_first_the_others_next_poll():
    clock = Clock()
    window = Window(Cursor(), 3600, clock=clock)
    events: list[Event] = []
    for k in range(MAX_GAP_CHECKS + 3):  # gaps far apart, each followed by many events
        first = 1 + k * 100
        events += after(first, MERGE_ABOVE_EVENTS + 5, k * 100)
    window.confirm(events)
    first_poll = window.gap_checks()
    assert len(first_poll) == MAX_GAP_CHECKS
    assert [c.since for c in first_poll] == sorted((c.since for c in first_poll), reverse=True)
    # The two not checked yet come first next time, before those just checked.
    clock.now += GAP_RECHECK_MIN_S
    second_poll = window.gap_checks()
    assert len(second_poll) == MAX_GAP_CHECKS
    assert not set(second_poll[:2]) & set(first_poll)


def test_gaps_close_unfilled_after_the_overlap_and_are_counted():
    clock = Clock()
    window = Window(Cursor(), 300, clock=clock)
    window.confirm([event(1, at(0)), event(3, at(1))])
    clock.now += 299
    assert window.prune() == 0
    clock.now += 2
    assert window.prune() == 1
    assert window.open_gaps == 0
    assert window.take_changes().expired == 1


def test_a_gap_older_than_the_overlap_by_date_closes_when_the_newest_date_moves_on():
    window = Window(Cursor(), 60, clock=Clock())
    window.confirm([event(1, at(0)), event(3, at(1))])
    window.confirm([event(4, at(120))])
    assert window.prune() == 1


def test_a_first_id_opens_no_gaps_below_it():
    window = Window(Cursor(), 60, clock=Clock())
    window.confirm([event(500, T0)])
    assert window.open_gaps == 0


def test_unconfirmed_earlier_event_holds_the_high_water_mark():
    window = Window(Cursor(), 0)
    window.confirm([event(1, T0)])
    window.confirm([event(5, T0 + timedelta(hours=1))], advance=False)
    assert window.high_water == T0.isoformat()
    assert not window.is_new(event(5, T0 + timedelta(hours=1)))


def test_the_sweep_covers_the_overlap_below_the_newest_date():
    window = Window(Cursor(), 60)
    assert window.sweep_range() is None
    window.confirm([event(1, at(0)), event(2, at(30)), event(3, at(90))])
    since, before = window.sweep_range()
    # Up to the newest date included: the new events are read from just after it.
    assert (since, before) == (at(30).isoformat(), (at(90) + TICK).isoformat())
    assert window.known_between(since, before) == 2


def test_pruning_forgets_ids_older_than_the_overlap_never_the_newest():
    window = Window(Cursor(), 60)
    window.confirm([event(1, at(0)), event(2, at(100))])
    window.prune()
    assert window.is_new(event(1, at(0)))
    assert not window.is_new(event(2, at(100)))


def test_cursor_round_trips_gaps_and_all():
    clock = Clock()
    window = Window(Cursor(floor="2026-11-01T00:00:00"), 60, clock=clock)
    window.confirm([event(1, T0), event(3, T0 + timedelta(microseconds=163041))])
    restored = Window(Cursor.from_json(window.cursor().to_json()), 60, clock=clock)
    assert restored.since() == window.since() == "2026-11-24T13:00:00.163042"
    assert not restored.is_new(event(3, T0))
    assert restored.cursor().gaps == {
        2: Gap(T0.isoformat(), "2026-11-24T13:00:00.163041", clock.now)
    }
    assert restored.gap_checks() == window.gap_checks()


def test_a_version_1_cursor_is_read_as_having_no_gaps():
    text = json.dumps(
        {"version": 1, "high_water": T0.isoformat(), "floor": None, "seen": [[7, T0.isoformat()]]}
    )
    cursor = Cursor.from_json(text)
    assert cursor.max_id is None and cursor.gaps == {}
    assert not Window(cursor, 60).is_new(event(7, T0))


# -- the whole loop, as the poller drives it -------------------------------------------------


def between(visible: list[Event], since: str | None, before: str | None) -> list[Event]:
    return sorted(
        (
            e
            for e in visible
            if (since is None or e.when >= datetime.fromisoformat(since))
            and (before is None or e.when < datetime.fromisoformat(before))
        ),
        key=lambda e: e.when,
    )


def poll(window: Window, visible: list[Event], sweep: bool = False) -> list[int]:
    """One poll as the poller runs it: the new events; each gap check counted, halved on a
    difference (a count's one event published at once, when it is the only one missing);
    the ranges the checks found a difference in; last, on a sweep whose count differs,
    the whole overlap. Returns the ids published."""
    published: list[int] = []

    def read(since: str | None, before: str | None) -> None:
        page = between(visible, since, before)
        published.extend(e.id for e in page if window.is_new(e))
        window.confirm(page)

    def filled(check: GapCheck) -> list[tuple[str, str]]:
        served = between(visible, check.since, check.before)
        known = window.known_between(check.since, check.before)
        if len(served) == known:
            return []
        if len(served) == known + 1 and window.is_new(served[0]):
            read(served[0].date, (served[0].when + TICK).isoformat())
            return []
        if len(check.spans) == 1:
            return list(check.spans)
        low, high = check.halves()
        return filled(low) + filled(high)

    read(window.since(), None)
    for since, before in [s for check in window.gap_checks() for s in filled(check)]:
        read(since, before)
    span = window.sweep_range() if sweep else None
    if span is not None and len(between(visible, *span)) != window.known_between(*span):
        read(*span)
    window.prune()
    return published


@given(
    st.lists(
        st.tuples(
            st.floats(0, 5),  # seconds after the previous insert
            st.floats(-0.5, 0),  # date set this much before the insert
            st.integers(0, 30),  # commit delay, seconds: visible this much later
            st.booleans(),  # rolled back: the id is burned, never visible
        ),
        min_size=1,
        max_size=80,
    ),
    st.floats(0.2, 10),
)
@settings(deadline=None)
def test_every_id_visible_within_the_overlap_is_published_exactly_once(inserts, step_s):
    """Any commit order: what becomes visible within the overlap is published once, and
    ids that never fill are waited for no longer than the overlap. A late event above
    every id seen (nothing newer to show its gap) is left to the sweep, so the overlap must
    cover the longest commit delay plus a sweep interval plus a poll."""
    overlap_s = 30 + SWEEP_S + 10 + 1
    clock = Clock(0.0)
    window = Window(Cursor(), overlap_s, clock=clock)
    events, visible_at, t = [], {}, 0.0
    for event_id, (gap_s, early_s, delay_s, rolled_back) in enumerate(inserts, start=1):
        t += gap_s
        if rolled_back:
            continue
        e = event(event_id, at(t + early_s))
        events.append(e)
        visible_at[e.id] = t + delay_s
    published: list[int] = []
    # The last late event commits by t + 30 s; the sweep may take SWEEP_S to show its
    # gap; an unfilled gap is then waited for overlap_s.
    end = t + 30 + SWEEP_S + overlap_s + 3 * step_s
    next_sweep = 0.0
    while clock.now <= end + GAP_RECHECK_MAX_S:
        visible = [e for e in events if visible_at[e.id] <= clock.now]
        sweep = clock.now >= next_sweep
        if sweep:
            next_sweep = clock.now + SWEEP_S
        published += poll(window, visible, sweep)
        clock.now += step_s
    assert len(published) == len(set(published))
    assert sorted(published) == sorted(e.id for e in events)
    assert window.open_gaps == 0


def test_the_sweep_stops_below_the_oldest_young_gap_only():
    """Above a young gap the checks look already, and its event, committed but not read
    yet, would make the count differ and the sweep read the whole overlap. A gap that
    stays open (a burned id) must not hold the sweep back: an event dated outside every
    gap's range would wait behind it until it left the overlap, and be lost."""
    clock = Clock()
    window = Window(Cursor(), 60, clock=clock)
    window.confirm([event(i, at(t)) for i, t in [(1, 0), (2, 30), (3, 40), (5, 50), (6, 90)]])
    assert window.sweep_range() == (at(30).isoformat(), at(39.95).isoformat())
    clock.now += GAP_WIDEN_AFTER_S  # gap 4 is old now: the sweep reaches the newest date
    assert window.sweep_range() == (at(30).isoformat(), (at(90) + TICK).isoformat())
    window.confirm([event(8, at(95))])  # a young gap at 7 holds it back again
    assert window.sweep_range() == (at(35).isoformat(), at(89.95).isoformat())
    window.confirm([event(7, at(92))])
    assert window.sweep_range() == (at(35).isoformat(), (at(95) + TICK).isoformat())


def test_between_pages_a_catch_up_forgets_ids_older_than_the_window_and_the_planned_reads():
    """A backlog of hours read in one poll: only the last overlap's ids are kept (and
    saved with each page), except where a read of an older range is still to come."""
    window = Window(Cursor(), 60)
    window.confirm([event(i, at(i * 10)) for i in range(1, 361)])  # an hour, one every 10 s
    window.forget_seen_before(None)
    assert len(window) == 7  # 3,540 s to 3,600 s
    assert not window.is_new(event(360, at(3600))) and window.is_new(event(300, at(3000)))
    window.confirm([event(i, at(i * 10)) for i in range(300, 361)])
    window.forget_seen_before(at(3300))  # a gap read from 3,300 s is planned in this poll
    assert len(window) == 31
    assert not window.is_new(event(330, at(3300)))
