"""A Patchwork event as it travels: its raw JSON, routing key, bus properties and ce-* headers.

The body on the bus is the item exactly as Patchwork sent it: we cut each item's
text out of the page instead of re-serialising it, so consumers get Patchwork's
bytes and we parse each page only once.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from bridge import __version__

APP_ID = "patchwork-bridge"
USER_AGENT = f"patchwork-bridge/{__version__}"


def user_agent(role: str = "") -> str:
    """Which bridge process sent a request, for Patchwork's admins: role, host and pid."""
    who = f"{socket.gethostname()}:{os.getpid()}"
    return f"{USER_AGENT} {role} ({who})" if role else f"{USER_AGENT} ({who})"


CE_TYPE_PREFIX = "org.patchwork."

_decoder = json.JSONDecoder()
_WHITESPACE = " \t\n\r"


class BadPage(ValueError):
    """A page body that is not a JSON array of objects (HTML, truncated, an error object)."""


class BadEvent(ValueError):
    """An item without a usable id, category, date or project; ``reason`` is a metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Event:
    id: int
    category: str
    project: str
    date: str
    """Naive server-local time, exactly as Patchwork wrote it; passed back verbatim as ``since``."""
    body: bytes
    when: datetime
    """``date`` parsed, still naive: for ordering and window arithmetic only."""

    @property
    def routing_key(self) -> str:
        return f"{self.project}.{self.category}"

    @property
    def message_id(self) -> str:
        """Stable across republishes, so consumers can drop repeats."""
        return str(self.id)


def split_array(text: str) -> list[tuple[Any, str]]:
    """Each element of a JSON array with its exact source text.

    Raises BadPage for anything but a well-formed array (Patchwork's HTML error
    pages, truncated bodies, a JSON object where a list was expected).
    """
    n = len(text)
    i = _skip_ws(text, 0)
    if i >= n or text[i] != "[":
        raise BadPage("expected a JSON array")
    items: list[tuple[Any, str]] = []
    i = _skip_ws(text, i + 1)
    if i < n and text[i] == "]":
        return _end(text, i, items)
    while True:
        try:
            value, end = _decoder.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            raise BadPage(f"invalid JSON at offset {exc.pos}") from None
        items.append((value, text[i:end]))
        i = _skip_ws(text, end)
        if i >= n:
            raise BadPage("truncated JSON array")
        if text[i] == "]":
            return _end(text, i, items)
        if text[i] != ",":
            raise BadPage(f"expected ',' or ']' at offset {i}")
        i = _skip_ws(text, i + 1)


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WHITESPACE:
        i += 1
    return i


def _end(text: str, i: int, items: list[tuple[Any, str]]) -> list[tuple[Any, str]]:
    if _skip_ws(text, i + 1) != len(text):
        raise BadPage("trailing data after the JSON array")
    return items


def parse_event(item: Any, raw: str) -> Event:
    """Check the fields routing and the cursor depend on; everything else is passed through."""
    if not isinstance(item, dict):
        raise BadEvent("not_object", f"item is {type(item).__name__}")
    event_id = item.get("id")
    if not isinstance(event_id, int) or isinstance(event_id, bool):
        raise BadEvent("missing_id", f"id={event_id!r}")
    category = item.get("category")
    if not isinstance(category, str) or not category or "." in category:
        raise BadEvent("missing_category", f"event {event_id}: category={category!r}")
    project = item.get("project")
    link_name = project.get("link_name") if isinstance(project, dict) else None
    if not isinstance(link_name, str) or not link_name or "." in link_name:
        raise BadEvent("missing_project", f"event {event_id}: no project link_name")
    date = item.get("date")
    try:
        when = datetime.fromisoformat(date) if isinstance(date, str) else None
    except ValueError:
        when = None
    if when is None or not isinstance(date, str):
        raise BadEvent("missing_date", f"event {event_id}: date={date!r}")
    # Patchwork's dates are naive; a zone would mean a different server than we know.
    when = when.replace(tzinfo=None)
    return Event(event_id, category, link_name, date, raw.encode("utf-8"), when)


def ce_time(date: str, tz: ZoneInfo) -> str:
    """RFC 3339 time with offset, from Patchwork's naive server-local ``date``."""
    when = datetime.fromisoformat(date)
    # Patchwork writes naive dates; should one carry a zone, it is converted, not replaced.
    return (when.replace(tzinfo=tz) if when.tzinfo is None else when.astimezone(tz)).isoformat()


def ce_headers(event: Event, source: str, tz: ZoneInfo) -> dict[str, str]:
    """CloudEvents binary-mode attributes, keyed without the transport's prefix decisions."""
    return {
        "ce-specversion": "1.0",
        "ce-id": event.message_id,
        "ce-source": source,
        "ce-type": f"{CE_TYPE_PREFIX}{event.category}",
        "ce-subject": event.project,
        "ce-time": ce_time(event.date, tz),
    }


def amqp_headers(event: Event, source: str, tz: ZoneInfo) -> dict[str, str]:
    headers = ce_headers(event, source, tz)
    headers["x-patchwork-project"] = event.project
    headers["x-patchwork-category"] = event.category
    return headers
