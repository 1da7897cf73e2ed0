"""What each poll asks Patchwork for, and which events it returns are new. Pure logic, no I/O.

Patchwork makes events visible out of date order: concurrent writers commit late.
Ids come from one sequence at insert, inside the writer's transaction, so a late
event is a **gap** in the ids read so far. A poll therefore reads what is newer than
the newest date published, and reaches back only where a gap is open: between the
dates of the events just below and above it. Such a range is counted first (a count
serves Patchwork one event) and read only when it holds more than was published: a
read would serve every neighbour of the gap again, each time it is checked. A gap is
waited for at most ``overlap`` seconds (a rolled-back mail burns its id for good), and
never reaches back further than ``overlap`` before the newest date. A slow sweep of the
whole ``overlap`` (see ``sweep_range``) catches what a Patchwork whose ids do not behave
like that would still show late, and an event sharing the newest date to the
microsecond but committed after it was read.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from bridge.events import Event
from bridge.producer.cursor import Cursor, Gap

TICK = timedelta(microseconds=1)
"""Patchwork's dates are to the microsecond."""
GAP_SLACK = timedelta(seconds=0.05)
"""Added on both sides of a gap's dates once it is ``GAP_WIDEN_AFTER_S`` old: an event's
date is set just before its id (the row is built, then inserted), so a late event's date
lies between its neighbours' or a moment before. A larger skew is left to the sweep."""
GAP_WIDEN_AFTER_S = 5.0
"""Until then a gap is checked strictly between its neighbours' dates: a range holding
nothing published, so that the count costs Patchwork no event at all until the late
event is there, and then serves exactly that event."""
GAP_RECHECK_MIN_S = 0.9
GAP_RECHECK_MAX_S = 30.0
"""A gap is checked again half its age later, within these bounds: about once a second
while young (a poll of 0.2 s does not check it five times as often), at most 30 s apart
once old (a rolled-back mail's id is waited for the whole overlap). An event that commits
t seconds late is found by t * 1.5 at the latest, and a rolled-back mail's id costs about
a dozen counts."""
MAX_GAP_CHECKS = 10
"""Gap checks per poll at most, longest waiting first; the others wait for the next poll.
Those due are counted together with one request (``Window.due``)."""
MERGE_ABOVE_EVENTS = 30
"""Gap ranges with fewer published events than this between them are checked as one:
reading them again costs Patchwork about what one more request costs (1.9 ms an event
against 60 ms a request)."""
FOLD_BELOW_EVENTS = MERGE_ABOVE_EVENTS
"""A due gap range starting fewer published events than this below the newest date is
not counted: the poll's read of new events starts there instead, ``GAP_SLACK`` lower
(``Due.read_from``). One request, where a count and, once the event is there, its read
(or halving) were two to four; the events served again cost Patchwork less than one
more request. And the slack finds at once an event dated a few ms outside its
neighbours' dates, which a strict young range finds only when it widens. Polls closer
than a second fold fewer (``fold_below_events``)."""


def fold_below_events(poll_interval_s: float) -> int:
    """``FOLD_BELOW_EVENTS`` for a poll interval: below a second, the time Patchwork takes
    to serve the events again is a larger share of the interval and holds the next poll
    back (measured at 0.2 s: p99 1.4-1.6x the NIPA poller's with 30, 1.0x with 15), while
    the requests a fold saves matter less beside the many polls."""
    return max(5, round(FOLD_BELOW_EVENTS * min(1.0, poll_interval_s)))


READ_WHOLE_BELOW_EVENTS = 2 * MERGE_ABOVE_EVENTS
"""A check of several gap ranges whose count differs is read whole, not halved, while it
holds fewer published events than this: halving costs two counts a step, a read of
this many events about as much serving time in one request."""
MAX_OPEN_GAPS = 10_000
"""Beyond this many open gaps, the newest are not tracked (the sweep still covers them)."""


@dataclass(frozen=True, slots=True)
class GapChange:
    """What one ``confirm`` did to the gaps, for the metrics."""

    opened: int = 0
    filled: int = 0
    expired: int = 0


@dataclass(frozen=True, slots=True)
class GapCheck:
    """Near gap ranges, checked with one count; on a difference, halved until the ranges
    that hold it are found (``halves``), and those read."""

    spans: tuple[tuple[str, str], ...]
    """``(since, before)`` of each gap's range, in date order; they may overlap."""

    @property
    def since(self) -> str:
        return self.spans[0][0]

    @property
    def before(self) -> str:
        return max(before for _, before in self.spans)

    def halves(self) -> tuple[GapCheck, GapCheck]:
        middle = len(self.spans) // 2
        return GapCheck(self.spans[:middle]), GapCheck(self.spans[middle:])


@dataclass(frozen=True, slots=True)
class Due:
    """What a poll asks of Patchwork for the gaps: where its read of new events starts
    (None: at ``since()``), and the gap ranges to count."""

    read_from: str | None
    checks: list[GapCheck]
    """One at most: every due range counted at once. Most polls find nothing there (a
    rolled-back mail's gap stays open the whole ``overlap``), and then one request tells;
    on a difference the halving finds the ranges that differ."""


class Window:
    def __init__(
        self,
        cursor: Cursor,
        overlap_s: float,
        *,
        clock: Callable[[], float] | None = None,
        fold_below: int = FOLD_BELOW_EVENTS,
    ) -> None:
        """``clock`` is wall time in seconds (``time.time``): gaps' ages survive restarts."""
        self._clock = clock or time.time
        self._fold_below = fold_below
        self._overlap = timedelta(seconds=overlap_s)
        self._floor = cursor.floor
        self._high_water = cursor.high_water
        self._high_water_dt = _parse(cursor.high_water)
        self._seen: dict[int, tuple[datetime, str]] = {
            event_id: (parse_date(date), date) for event_id, date in cursor.seen.items()
        }
        self._max_id = cursor.max_id
        self._gaps: dict[int, Gap] = dict(cursor.gaps)
        self._next_check: dict[int, float] = {}
        self.changes = GapChange()
        """Gap counts since the last ``take_changes``."""

    @property
    def high_water(self) -> str | None:
        return self._high_water

    @property
    def high_water_dt(self) -> datetime | None:
        return self._high_water_dt

    @property
    def open_gaps(self) -> int:
        return len(self._gaps)

    def gaps_opened_by(self, when: float) -> bool:
        """Whether a gap opened at or before ``when`` (wall time) is still open."""
        return any(gap.opened_at <= when for gap in self._gaps.values())

    def since(self) -> str | None:
        """The ``since`` of the next poll's read of new events: a microsecond after the
        newest date published (``since`` is inclusive; the newest would be served again
        on every poll)."""
        if self._high_water_dt is None:
            return self._floor
        return (self._high_water_dt + TICK).isoformat()

    def sweep_range(self) -> tuple[str, str] | None:
        """``(since, before)`` for the sweep: the overlap below the newest date, up to the
        oldest gap younger than ``GAP_WIDEN_AFTER_S``. Above that, the checks look already,
        and its event, about to commit, would make the count differ. An older gap (a
        burned id stays open the whole overlap) must not hold the sweep back: an event
        dated outside every gap's range would wait behind it until it left the overlap."""
        if self._high_water_dt is None or self._high_water is None:
            return None
        start = self._window_start()
        now = self._clock()
        before = min(
            (
                parse_date(gap.below) - GAP_SLACK
                for gap in self._gaps.values()
                if now - gap.opened_at < GAP_WIDEN_AFTER_S
            ),
            default=self._high_water_dt + TICK,
        )
        # A gap recorded from a page confirmed only in part (advance=False) may lie above.
        before = min(before, self._high_water_dt + TICK)
        if before <= start:
            return None
        return start.isoformat(), before.isoformat()

    def known_between(self, since: str, before: str) -> int:
        """Events already published with ``since <= date < before``; the sweep compares
        this with Patchwork's count of the same range."""
        return self._known(parse_date(since), parse_date(before))

    def _known(self, lo: datetime, hi: datetime) -> int:
        return sum(1 for when, _ in self._seen.values() if lo <= when < hi)

    def due(self, *, opened_by: float | None = None, fold: bool = True) -> Due:
        """This poll's gap checks (``gap_checks``) as one, those near the newest date
        folded into the read of new events (``FOLD_BELOW_EVENTS``) unless not ``fold``
        (no such read this poll)."""
        checks = self.gap_checks(opened_by=opened_by)
        if self._high_water_dt is None or not checks or not fold:
            return Due(None, _as_one(checks))
        top = self._high_water_dt + TICK
        start = self._window_start()
        near = [
            c
            for c in checks
            if self._known(parse_date(c.since) - GAP_SLACK, top) < self._fold_below
        ]
        if not near:
            return Due(None, _as_one(checks))
        read_from = max(min(parse_date(c.since) for c in near) - GAP_SLACK, start)
        # Every gap that read looks through is checked by it, due or not: else each would
        # have the read start down there again on a poll of its own.
        now = self._clock()
        for event_id, gap in self._gaps.items():
            if _gap_range(gap, now)[0] >= read_from:
                self._next_check[event_id] = now + _recheck_wait(gap, now)
        return Due(read_from.isoformat(), _as_one([c for c in checks if c not in near]))

    def gap_checks(self, *, opened_by: float | None = None) -> list[GapCheck]:
        """The gap ranges due a check this poll, which the poller has Patchwork count
        before it reads them (the new events are read from ``since``). ``opened_by``:
        only gaps opened by then (wall time), those no notification will name.

        Near ranges are checked as one (``MERGE_ABOVE_EVENTS``); at most
        ``MAX_GAP_CHECKS`` checks, longest waiting first, the others stay due for the next
        poll. Each gap returned is marked checked (``GAP_RECHECK_MIN_S``,
        ``GAP_RECHECK_MAX_S``). No range reaches below the window's start, where forgotten
        ids would be published again.
        """
        now = self._clock()
        start = self._window_start() if self._high_water_dt is not None else _parse(self._floor)
        checks: list[tuple[list[tuple[datetime, datetime]], list[int]]] = []
        for event_id, gap in sorted(self._gaps.items(), key=lambda kv: kv[1].below):
            if self._next_check.get(event_id, 0.0) > now:
                continue
            if opened_by is not None and gap.opened_at > opened_by:
                continue
            lo, hi = _gap_range(gap, now)
            if start is not None:
                if hi <= start:
                    continue
                lo = max(lo, start)
            if checks and self._known(checks[-1][0][-1][1], lo) <= MERGE_ABOVE_EVENTS:
                spans, ids = checks[-1]
                if hi > spans[-1][1]:  # else within the range before (lo < hi)
                    spans.append((lo, hi))
                ids.append(event_id)
            else:
                checks.append(([(lo, hi)], [event_id]))
        # Longest waiting first (never checked counts as longest), then youngest: under a
        # stream of new gaps, the old ones still get their turn.
        checks.sort(
            key=lambda check: (
                min(self._next_check.get(i, 0.0) for i in check[1]),
                -check[0][0][0].timestamp(),
            )
        )
        due = []
        for spans, ids in checks[:MAX_GAP_CHECKS]:
            due.append(GapCheck(tuple((lo.isoformat(), hi.isoformat()) for lo, hi in spans)))
            for event_id in ids:
                self._next_check[event_id] = now + _recheck_wait(self._gaps[event_id], now)
        return due

    def is_new(self, event: Event) -> bool:
        return event.id not in self._seen

    def has_seen(self, event_id: object) -> bool:
        return event_id in self._seen

    def confirm(self, events: Iterable[Event], *, advance: bool = True) -> None:
        """Record events the broker has confirmed (and those not ours to publish).

        Their ids fill gaps; ids missing between them and the newest id known open
        gaps. ``advance=False`` when an earlier event of the same page was not
        confirmed: the high-water mark must not pass it, or the next poll would not
        read it again.
        """
        batch = sorted(events, key=lambda e: e.id)
        if not batch:
            return
        now = self._clock()
        filled = opened = 0
        for event in batch:
            self._seen[event.id] = (event.when, event.date)
            if self._gaps.pop(event.id, None) is not None:
                self._next_check.pop(event.id, None)
                filled += 1
        if self._max_id is None:
            self._max_id = batch[0].id - 1  # nothing is known below the first id seen
        below_id = self._max_id
        below = self._seen.get(below_id)
        for event in batch:
            if event.id <= self._max_id:
                continue
            if below is not None:
                for missing in range(below_id + 1, event.id):
                    if len(self._gaps) >= MAX_OPEN_GAPS:
                        break
                    self._gaps[missing] = Gap(below[1], event.date, now)
                    opened += 1
            below_id, below = event.id, (event.when, event.date)
        self._max_id = max(self._max_id, batch[-1].id)
        if advance:
            newest = max(batch, key=lambda e: e.when)
            if self._high_water_dt is None or newest.when > self._high_water_dt:
                self._high_water_dt = newest.when
                self._high_water = newest.date
        self.changes = GapChange(
            self.changes.opened + opened, self.changes.filled + filled, self.changes.expired
        )

    def forget_seen_before(self, keep_from: datetime | None) -> None:
        """Between the pages of a poll: forget ids older than the window and than every read
        still planned (``keep_from``). Else a catch-up carries, and saves with each page,
        every id it has read: quadratic in the backlog."""
        if self._high_water_dt is None:
            return
        start = self._window_start()
        if keep_from is not None:
            start = min(start, keep_from)
        for event_id in [i for i, (when, _) in self._seen.items() if when < start]:
            del self._seen[event_id]

    def prune(self) -> int:
        """Forget ids older than the overlap, and close gaps waited for long enough.

        Returns the number of gaps closed unfilled.
        """
        if self._high_water_dt is None:
            return 0
        start = self._window_start()
        for event_id in [i for i, (when, _) in self._seen.items() if when < start]:
            del self._seen[event_id]
        now = self._clock()
        expired = [
            event_id
            for event_id, gap in self._gaps.items()
            if now - gap.opened_at > self._overlap.total_seconds() or parse_date(gap.above) < start
        ]
        for event_id in expired:
            del self._gaps[event_id]
            self._next_check.pop(event_id, None)
        if expired:
            self.changes = GapChange(
                self.changes.opened, self.changes.filled, self.changes.expired + len(expired)
            )
        return len(expired)

    def take_changes(self) -> GapChange:
        changes, self.changes = self.changes, GapChange()
        return changes

    def cursor(self) -> Cursor:
        return Cursor(
            self._high_water,
            self._floor,
            {i: date for i, (_, date) in self._seen.items()},
            self._max_id,
            dict(self._gaps),
        )

    def __len__(self) -> int:
        return len(self._seen)

    def _window_start(self) -> datetime:
        assert self._high_water_dt is not None
        start = self._high_water_dt - self._overlap
        floor_dt = _parse(self._floor)
        return max(start, floor_dt) if floor_dt is not None else start


def _recheck_wait(gap: Gap, now: float) -> float:
    age_s = max(0.0, now - gap.opened_at)
    return min(GAP_RECHECK_MAX_S, max(GAP_RECHECK_MIN_S, age_s / 2))


def _as_one(checks: list[GapCheck]) -> list[GapCheck]:
    if len(checks) <= 1:
        return checks
    return [GapCheck(tuple(sorted(span for check in checks for span in check.spans)))]


def _gap_range(gap: Gap, now: float) -> tuple[datetime, datetime]:
    """Where a gap's event is looked for: strictly between its neighbours' dates while the
    gap is young, with ``GAP_SLACK`` on both sides after that."""
    below, above = parse_date(gap.below), parse_date(gap.above)
    if now - gap.opened_at < GAP_WIDEN_AFTER_S and below + TICK < above:
        return below + TICK, above
    return below - GAP_SLACK, above + GAP_SLACK


def parse_date(date: str) -> datetime:
    """A Patchwork date (naive, server-local) as the window compares it."""
    return datetime.fromisoformat(date).replace(tzinfo=None)


def _parse(date: str | None) -> datetime | None:
    return None if date is None else parse_date(date)
