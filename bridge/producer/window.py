"""The overlap window: which events a poll must ask for again, and which of them are new.

Patchwork makes events visible out of date order (concurrent writers commit
late), so asking only ``since=<newest date>`` loses events. Every poll asks
again for the last ``overlap`` seconds and drops the ids already confirmed.
Pure logic: no I/O, so it is tested with tables and hypothesis.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

from bridge.events import Event
from bridge.producer.cursor import Cursor


class Window:
    def __init__(self, cursor: Cursor, overlap_s: float) -> None:
        self._overlap = timedelta(seconds=overlap_s)
        self._floor = cursor.floor
        self._high_water = cursor.high_water
        self._high_water_dt = _parse(cursor.high_water)
        self._seen: dict[int, tuple[datetime, str]] = {
            event_id: (_parse(date), date) for event_id, date in cursor.seen.items()
        }

    @property
    def high_water(self) -> str | None:
        return self._high_water

    @property
    def high_water_dt(self) -> datetime | None:
        return self._high_water_dt

    def since(self) -> str | None:
        """The ``since`` of the next poll: the window's start, never before the floor."""
        if self._high_water_dt is None:
            return self._floor
        start = self._high_water_dt - self._overlap
        floor_dt = _parse(self._floor)
        if floor_dt is not None and floor_dt > start:
            return self._floor
        return start.isoformat()

    def is_new(self, event: Event) -> bool:
        return event.id not in self._seen

    def confirm(self, events: Iterable[Event], *, advance: bool = True) -> None:
        """Record events the broker has confirmed.

        ``advance=False`` when an earlier event of the same page was not confirmed:
        the high-water mark must not pass it, or a long page could push it out of
        the next poll's window and lose it.
        """
        for event in events:
            self._seen[event.id] = (event.when, event.date)
            if not advance:
                continue
            if self._high_water_dt is None or event.when > self._high_water_dt:
                self._high_water_dt = event.when
                self._high_water = event.date

    def prune(self) -> int:
        """Forget ids older than the window: the next poll cannot return them again."""
        since = _parse(self.since())
        if since is None:
            return 0
        old = [event_id for event_id, (when, _) in self._seen.items() if when < since]
        for event_id in old:
            del self._seen[event_id]
        return len(old)

    def cursor(self) -> Cursor:
        return Cursor(
            self._high_water, self._floor, {i: date for i, (_, date) in self._seen.items()}
        )

    def __len__(self) -> int:
        return len(self._seen)


def _parse(date: str | None) -> datetime | None:
    return None if date is None else datetime.fromisoformat(date).replace(tzinfo=None)
