"""Where the producer begins: its saved cursor, or BRIDGE_START on a first start."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from bridge.events import BadEvent, Event, parse_event
from bridge.producer.cursor import Cursor
from bridge.producer.window import Window
from bridge.settings import Settings

log = logging.getLogger(__name__)

NEWEST_PROBE = 20
"""BRIDGE_START=now starts after the newest usable of this many newest events."""


async def initial_cursor(
    saved: Cursor | None,
    settings: Settings,
    fetch_newest: Callable[[], Awaitable[list[tuple[Any, str]]]],
) -> Cursor:
    """Where polling begins: the saved cursor, or BRIDGE_START on a first start.

    ``fetch_newest`` asks Patchwork for its newest events (BRIDGE_START=now only).
    """
    if saved is not None:
        log.info("resuming from cursor %s (%d recent ids)", saved.high_water, len(saved.seen))
        return saved
    start = settings.start
    if start == "beginning":
        log.info("no cursor: publishing every event from the beginning")
        return Cursor()
    if start != "now":
        floor = _server_local(start, settings)
        log.info("no cursor: publishing events from %s (server time)", floor)
        return Cursor(floor=floor)
    # "now": everything already visible counts as seen; only what appears later is published.
    newest = await fetch_newest()
    if not newest:
        log.info("no cursor and no events yet: publishing every event from now on")
        return Cursor()
    usable = _usable_events(newest)
    if not usable:
        # Our clock, not Patchwork's: close enough when its newest items are unusable.
        floor = datetime.now(settings.tz).replace(tzinfo=None).isoformat()
        log.warning(
            "no cursor, and none of the %d newest events is usable: publishing events "
            "from %s (server time, by our clock)",
            len(newest),
            floor,
        )
        return Cursor(floor=floor)
    # "Now" is the newest visible event: what was visible then counts as published,
    # nothing else. No read of the overlap: anything committed while such a read ran
    # would be marked seen without being published. Ids missing among these newest
    # events are gaps, published if they fill in time.
    # The floor keeps the sweep and the gap reads from reaching below what was seen.
    oldest = min(usable, key=lambda e: e.when).date
    window = Window(Cursor(floor=oldest), settings.poll_late_wait)
    window.confirm(usable)
    log.info(
        "no cursor: starting after %s, the newest event now (id %d)",
        usable[0].date,
        max(e.id for e in usable),
    )
    return window.cursor()


def _usable_events(items: list[tuple[Any, str]]) -> list[Event]:
    events = []
    for item, raw in items:
        try:
            events.append(parse_event(item, raw))
        except BadEvent:
            continue  # reported when the normal poll meets it
    return events


def _server_local(start: str, settings: Settings) -> str:
    """BRIDGE_START as Patchwork's naive server-local time; a zone in it is converted."""
    when = datetime.fromisoformat(start)
    if when.tzinfo is not None:
        when = when.astimezone(settings.tz).replace(tzinfo=None)
    return when.isoformat()
