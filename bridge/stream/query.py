"""What a client asks the stream for: checked before anything is sent, each refusal a
status and a one-line reason. Pure, so the table of bad inputs is tested without a broker."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from multidict import MultiMapping

from bridge.stream.consumers import StreamConsumer, StreamConsumers
from bridge.stream.feed import After, Since, Start
from bridge.stream.positions import BadPosition, parse_position
from bridge.topics import check_pattern, covers

KNOWN_KEYS = ("events", "since")
SECRET_KEYS = frozenset({"token", "access_token", "auth", "authorization", "bearer", "key"})


class Refused(Exception):
    """The request is refused: ``status`` (400, 401, 403) and a reason for the client."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True, slots=True)
class StreamRequest:
    consumer: StreamConsumer
    patterns: list[str]
    start: Start


def parse_request(
    query: MultiMapping[str],
    headers: Mapping[str, str],
    consumers: StreamConsumers,
    tz: ZoneInfo,
) -> StreamRequest:
    """Raises Refused. Last-Event-ID wins over ``since``: a browser reconnects with the
    same URL and the id of the last event it got."""
    refuse_token_in_query(query)
    consumer = authenticate(headers, consumers)
    for key in query:
        if key not in KNOWN_KEYS:
            raise Refused(400, f"unknown query key {key!r} (known: {', '.join(KNOWN_KEYS)})")
    patterns = query.getall("events", [])
    for pattern in patterns:
        try:
            check_pattern(pattern)
        except ValueError as exc:
            raise Refused(400, f"events: {exc}") from None
        if not any(covers(allowed, pattern) for allowed in consumer.events):
            raise Refused(
                403,
                f"consumer {consumer.name!r} may not ask for {pattern!r} "
                f"(it may ask for {', '.join(consumer.events)})",
            )
    return StreamRequest(consumer, patterns or list(consumer.events), _start(query, headers, tz))


def refuse_token_in_query(query: MultiMapping[str]) -> None:
    """Checked before anything else, on every endpoint. The value is never echoed or
    logged: the URL may already be in a proxy's log."""
    if any(key.lower() in SECRET_KEYS for key in query):
        raise Refused(400, "a token goes in the Authorization header, never in the URL")


def authenticate(headers: Mapping[str, str], consumers: StreamConsumers) -> StreamConsumer:
    scheme, _, token = headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Refused(401, "send Authorization: Bearer <token> of a stream consumer")
    consumer = consumers.by_token(token.strip())
    if consumer is None:
        raise Refused(401, "unknown token")
    return consumer


def _start(query: MultiMapping[str], headers: Mapping[str, str], tz: ZoneInfo) -> Start:
    last_id = headers.get("Last-Event-ID")
    if last_id is not None and last_id.strip():
        try:
            return After(parse_position(last_id))
        except BadPosition as exc:
            raise Refused(400, str(exc)) from None
    since = query.getall("since", [])
    if len(since) > 1:
        raise Refused(400, "since: give it once")
    if not since:
        return None
    try:
        when = datetime.fromisoformat(since[0])
    except ValueError:
        raise Refused(400, "since: not an ISO 8601 time (2026-12-01T09:00:00)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=tz)  # as replay's --since: Patchwork's own zone
    return Since(when.astimezone(tz).replace(tzinfo=None), when.astimezone(UTC))
