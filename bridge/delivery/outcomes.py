"""Every outcome a message can have, as values: what a sink answered (``Outcome``), and what
the engine found before or after asking one (``Invalid``, ``Unmatched``, ``SettleBug``).

A 500 from a receiver is data, not an exception. A sink raises only for its own bugs; the
engine counts that as ``sink_error`` and retries on the lane's schedule. The sinks' part
is re-exported by ``bridge.sinks.base``, the API plugins import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Delivery:
    """One attempt to hand one event to one sink."""

    body: bytes
    """The event exactly as Patchwork sent it (UTF-8 JSON)."""
    message_id: str
    """Stable for the event across republishes and retries (webhook-id, ce-id)."""
    routing_key: str
    headers: dict[str, str] = field(default_factory=dict)
    """The bus headers of the event: ce-* and x-patchwork-*."""
    attempt: int = 1
    """1 for the first attempt, 2 for the first retry, ..."""


# -- what a sink answers -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delivered:
    status: int | None = None


@dataclass(frozen=True, slots=True)
class RetryLater:
    """Try again later: after ``delay_s`` if the receiver asked (Retry-After), else on schedule."""

    reason: str
    """A bounded metric label, e.g. ``http_5xx``, ``timeout``, ``connect``."""
    detail: str = ""
    """One line for the log and the dead-letter headers; never a secret."""
    delay_s: float | None = None
    status: int | None = None


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Never retry this event here: it goes straight to the dead-letter queue."""

    reason: str
    detail: str = ""
    status: int | None = None


@dataclass(frozen=True, slots=True)
class Disable:
    """The receiver is gone for good (410): stop the whole lane until an operator acts."""

    reason: str
    detail: str = ""
    status: int | None = None


Outcome = Delivered | RetryLater | GiveUp | Disable


class Sink(Protocol):
    """Built per lane at start-up; owns its resources (sessions, processes) till close()."""

    enforces_timeout: bool
    """True when every ``deliver`` returns within the lane's timeout on its own; otherwise
    the engine cancels it a little later. A sink without it counts as False."""

    async def deliver(self, delivery: Delivery) -> Outcome: ...

    async def close(self) -> None: ...


def is_sink(obj: object) -> bool:
    """Whether ``obj`` has a sink's methods (``enforces_timeout`` is optional for plugins)."""
    return callable(getattr(obj, "deliver", None)) and callable(getattr(obj, "close", None))


# -- what the engine finds itself ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Invalid:
    """A message no sink can handle: dead-lettered without an attempt."""

    detail: str
    reason: str = "invalid"
    status: None = None


@dataclass(frozen=True, slots=True)
class Unmatched:
    """An event none of the lane's patterns match: a binding left from an earlier
    configuration routed it (AMQP cannot list bindings to remove them)."""

    routing_key: str


@dataclass(frozen=True, slots=True)
class SettleBug:
    """A message whose settling raised a bug of ours: retried a few times, then
    dead-lettered with the error's one-line summary (see ``bridge.delivery.settle``)."""

    detail: str
    tries: int
    """Settling attempts that raised so far, this one included."""
    reason: str = "bug"
    status: None = None


Failure = RetryLater | GiveUp | Invalid | SettleBug
"""What ends in a retry or a dead letter, with a reason and a detail."""
Settled = Outcome | Invalid | Unmatched | SettleBug
"""Everything ``bridge.delivery.settle.decide`` turns into an instruction."""
