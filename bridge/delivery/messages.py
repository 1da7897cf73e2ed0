"""The messages on a lane's queues: how one is read, and the copies moved between queues.

A copy carries the event's body and properties unchanged, plus ``x-bridge-*`` headers
that say which attempt it is for and, on a dead letter, why it failed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from bridge.delivery.outcomes import Delivery, Failure, RetryLater, SettleBug
from bridge.logs import one_line

# Headers the bridge adds to copies it moves between its queues.
ATTEMPT = "x-bridge-attempt"
"""The attempt the copy is for: 2 for the first retry. Absent means 1."""
ROUTING_KEY = "x-bridge-routing-key"
"""The event's ``<project>.<category>``; a copy travels with the queue name as its key."""
LAST_STATUS = "x-bridge-last-status"
LAST_REASON = "x-bridge-last-reason"
LAST_ERROR = "x-bridge-last-error"
ATTEMPTS = "x-bridge-attempts"
DEAD_AT = "x-bridge-dead-at"
SETTLE_BUGS = "x-bridge-settle-bugs"
"""How often settling this message raised a bug of ours; bounds the tries (see settle.py)."""
DUE = "x-bridge-due"
"""When a parked copy is due, in Unix milliseconds: until then the lane parks it again
(see ``bridge.delivery.retry``). Absent means now."""
BRIDGE_HEADERS = (
    ATTEMPT,
    LAST_STATUS,
    LAST_REASON,
    LAST_ERROR,
    ATTEMPTS,
    DEAD_AT,
    SETTLE_BUGS,
    DUE,
)

# Added by the broker on dead-lettering and by quorum queues on redelivery; a copy
# starts clean so they do not pile up across retries.
_BROKER_HEADER_PREFIXES = ("x-death", "x-first-death-", "x-last-death-", "x-delivery-count")
_EVENT_HEADER_PREFIXES = ("ce-", "x-patchwork-")


class InvalidMessage(ValueError):
    """The body is not a JSON object, or the message has no routing key."""


def delivery_from(message: AbstractIncomingMessage) -> Delivery:
    """The sink's view of a message; raises InvalidMessage for a poison message."""
    try:
        # Decoded first: json.loads would also take UTF-16 or UTF-32 bytes (and decodes
        # UTF-8 faster this way).
        body = json.loads(message.body.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError included
        raise InvalidMessage("body is not UTF-8 JSON") from None
    if not isinstance(body, dict):
        raise InvalidMessage(f"body is a JSON {type(body).__name__}, not an object")
    headers = message.headers or {}
    routing_key = header_text(headers.get(ROUTING_KEY)) or message.routing_key
    if not routing_key:
        raise InvalidMessage("no routing key")
    event_headers = {
        k: header_text(v) for k, v in headers.items() if k.startswith(_EVENT_HEADER_PREFIXES)
    }
    return Delivery(
        body=message.body,
        message_id=message.message_id or derived_id(routing_key, message.body),
        routing_key=routing_key,
        headers=event_headers,
        attempt=attempt_of(message),
    )


def derived_id(routing_key: str, body: bytes) -> str:
    """An id for a message published without one (pika, kombu and most clients set none):
    the same for every copy of it, since its routing key and body are what identify it."""
    digest = hashlib.sha256(routing_key.encode() + b"\n" + body).hexdigest()
    return f"sha256-{digest[:32]}"


def attempt_of(message: AbstractIncomingMessage) -> int:
    return _count_header(message, ATTEMPT, 1)


def settle_bugs_of(message: AbstractIncomingMessage) -> int:
    return _count_header(message, SETTLE_BUGS, 0)


def _count_header(message: AbstractIncomingMessage, key: str, default: int) -> int:
    value = (message.headers or {}).get(key)
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= default
    return value if ok else default  # type: ignore[return-value]


class Carried(Protocol):
    """What the header functions read of a message: an incoming one, or ``Facts``."""

    @property
    def headers(self) -> Mapping[str, Any] | None: ...
    @property
    def routing_key(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class Facts:
    """What the settle decision needs of a message, read once from it."""

    message_id: str | None
    routing_key: str | None
    headers: Mapping[str, Any]
    attempt: int
    settle_bugs: int
    due_ms: int = 0
    """When it may be attempted, in Unix milliseconds (0: now)."""

    @classmethod
    def of(cls, message: AbstractIncomingMessage) -> Facts:
        return cls(
            message.message_id,
            message.routing_key,
            message.headers or {},
            attempt_of(message),
            settle_bugs_of(message),
            _count_header(message, DUE, 0),
        )


def carried_headers(message: Carried) -> dict[str, Any]:
    """The message's headers without those the broker adds, plus the event's routing key."""
    headers = {
        k: v
        for k, v in (message.headers or {}).items()
        if not k.startswith(_BROKER_HEADER_PREFIXES)
    }
    headers.setdefault(ROUTING_KEY, message.routing_key or "")
    return headers


def copy_message(message: AbstractIncomingMessage, headers: dict[str, Any]) -> aio_pika.Message:
    """Same body and properties, new headers; persistent whatever the original said."""
    return aio_pika.Message(
        message.body,
        headers=headers,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        type=message.type,
        timestamp=message.timestamp,
        app_id=message.app_id,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


def retry_headers(
    message: Carried, outcome: RetryLater | SettleBug, next_attempt: int, due_ms: int
) -> dict[str, Any]:
    headers = _failure_headers(message, outcome) | {ATTEMPT: next_attempt, DUE: due_ms}
    if isinstance(outcome, SettleBug):
        headers[SETTLE_BUGS] = outcome.tries
    return headers


def dead_headers(
    message: Carried, outcome: Failure, attempts: int, now: datetime
) -> dict[str, Any]:
    """What an operator needs to judge a dead letter (``dlq list`` shows these)."""
    headers = _failure_headers(message, outcome)
    headers.pop(ATTEMPT, None)
    headers.pop(DUE, None)
    headers[ATTEMPTS] = attempts
    headers[DEAD_AT] = now.astimezone(UTC).isoformat(timespec="seconds")
    return headers


def replay_headers(message: Carried) -> dict[str, Any]:
    """A dead letter sent back starts again at attempt 1, with no failure recorded."""
    headers = carried_headers(message)
    for key in BRIDGE_HEADERS:
        headers.pop(key, None)
    return headers


def _failure_headers(message: Carried, outcome: Failure) -> dict[str, Any]:
    headers = carried_headers(message)
    headers[LAST_REASON] = outcome.reason
    headers[LAST_ERROR] = one_line(outcome.detail)
    if outcome.status is None:
        headers.pop(LAST_STATUS, None)
    else:
        headers[LAST_STATUS] = outcome.status
    return headers


def header_text(value: Any) -> str:
    """Header values come back as str or bytes depending on the publisher's client."""
    if type(value) is str:  # the common case, first: this runs for every header of every delivery
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)
