"""Stream positions: the SSE ``id`` of each event, ``<offset>-<tag>``.

The offset is the event's place in the log; the tag, from its ``message_id``, lets a
resume check that the position is one of this log's (a log deleted and declared again,
or another bridge's, numbers its events from 0 too). Opaque to clients.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

_POSITION_RE = re.compile(r"(\d{1,19})-([0-9a-f]{8})")


class BadPosition(ValueError):
    """A Last-Event-ID that is not, or no longer can be, a position in this log."""


@dataclass(frozen=True, slots=True)
class Position:
    offset: int
    tag: str

    def __str__(self) -> str:
        return f"{self.offset}-{self.tag}"


def position_of(offset: int, message_id: str | None) -> Position:
    return Position(offset, tag_of(message_id))


def tag_of(message_id: str | None) -> str:
    return hashlib.sha256((message_id or "").encode()).hexdigest()[:8]


def parse_position(text: str) -> Position:
    match = _POSITION_RE.fullmatch(text.strip())
    if match is None:
        raise BadPosition("Last-Event-ID: not a position of this stream (an id it sent)")
    return Position(int(match[1]), match[2])
