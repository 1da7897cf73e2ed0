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
"""A gap is checked again a quarter of its age later, within these bounds: about once a
second while young (a poll of 0.2 s does not check it five times as often), at most 30 s
apart once old (a rolled-back mail's id is waited for the whole overlap)."""
MAX_GAP_CHECKS = 10
"""Gap checks per poll at most, longest waiting first; the others wait for the next poll.
Each is a count, side by side with the others; a long poll interval finds many due."""
MERGE_ABOVE_EVENTS = 30
"""Gap ranges with fewer published events than this between them are checked as one:
reading them again costs Patchwork about what one more request costs (1.9 ms an event
against 60 ms a request)."""
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


class Window:
    def __init__(
        self, cursor: Cursor, overlap_s: float, *, clock: Callable[[], float] | None = None
    ) -> None:
        """``clock`` is wall time in seconds (``time.time``): gaps' ages survive restarts."""
        self._clock = clock or time.time
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

    def gap_checks(self) -> list[GapCheck]:
        """The gap ranges due a check this poll, which the poller has Patchwork count
        before it reads them (the new events are read from ``since``).

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
                age_s = max(0.0, now - self._gaps[event_id].opened_at)
                wait_s = min(GAP_RECHECK_MAX_S, max(GAP_RECHECK_MIN_S, age_s / 4))
                self._next_check[event_id] = now + wait_s
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
