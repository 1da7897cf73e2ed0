"""A window rebuilt from the event log's tail: the newest date published, and the ids
published within the overlap before it, as if the cursor file had been kept.

A producer whose state directory is lost, or that takes over from another host, starts
here: neither a gap (it resumes from what was published) nor a flood (what is in the
overlap counts as published). Reading less than the whole tail only costs duplicates:
an id not found here is published again, never skipped.

The first start's marker (``bridge.eventlog.start_marker``) holds the cursor BRIDGE_START
made: its floor, and the newest events that counted as published without being
published. The window is rebuilt on top of it, so nothing dated before the first start's
"now" is published, however young the log. A marker older than the tail read no longer
matters: the window's start has passed its floor.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from aio_pika.abc import AbstractConnection

from bridge.broker.calls import raise_if_cancelled
from bridge.broker.errors import BROKER_TROUBLE
from bridge.eventlog import LogMissing, logged_event, logged_start, read_log
from bridge.events import Event
from bridge.producer.cursor import Cursor, CursorError
from bridge.producer.window import Window
from bridge.settings import Settings

log = logging.getLogger(__name__)

MARGIN_S = 120.0
"""Read this much further back than the overlap: publish times trail event dates."""


async def cursor_from_log(connection: AbstractConnection, settings: Settings) -> Cursor | None:
    """None when the log is missing, empty or unreadable (then the cursor file, or
    BRIDGE_START, decides)."""
    try:
        last = [m async for m in read_log(connection, settings.exchange, "last")]
        stamps = [m.timestamp for m in last if m.timestamp is not None]
        if not stamps:
            return None
        margin = timedelta(seconds=settings.poll_late_wait + MARGIN_S)
        start = max(stamps) - margin
        events, started = await _read_since(connection, settings, start)
        if events:
            # An event is published after its date: all of the overlap below the newest
            # date was published after (newest - overlap). Read further back if earlier.
            newest = max(e.when for e in events).replace(tzinfo=settings.tz).astimezone(UTC)
            if newest - margin < start:
                events, started = await _read_since(connection, settings, newest - margin)
    except LogMissing:
        return None
    except BROKER_TROUBLE as exc:
        raise_if_cancelled()
        log.warning("cannot read the event log's tail (%s); not using it", exc)
        return None
    first = _start_cursor(started)
    if not events:
        return first  # a first start that has published nothing yet
    # On top of the first start's cursor: its floor, and what counted as published then.
    window = Window(first or Cursor(), settings.poll_late_wait)
    window.confirm(events)
    window.prune()
    window.take_changes()  # the gaps it found are not news
    return window.cursor()


async def _read_since(
    connection: AbstractConnection, settings: Settings, start: datetime
) -> tuple[list[Event], str | None]:
    """The events published from ``start`` on, and the newest start marker among them."""
    events = []
    started = None
    async for message in read_log(connection, settings.exchange, start):
        if (event := logged_event(message)) is not None:
            events.append(event)
        elif (cursor := logged_start(message)) is not None:
            started = cursor
    return events, started


def _start_cursor(text: str | None) -> Cursor | None:
    if text is None:
        return None
    try:
        return Cursor.from_json(text)
    except (CursorError, ValueError, KeyError, TypeError) as exc:
        log.warning("the event log's start marker is unreadable (%s); not using it", exc)
        return None
