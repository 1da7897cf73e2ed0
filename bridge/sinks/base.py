"""The sink interface: an event in, an outcome out. The consumer turns outcomes into ack/retry/dead.

Outcomes are values, not exceptions: a 500 from a receiver is data. A sink
raises only for its own bugs; the consumer counts that as ``sink_error`` and
retries on the subscription's schedule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import SecretStr


@dataclass(frozen=True, slots=True)
class Delivery:
    """One attempt to hand one event to one subscription."""

    body: bytes
    """The event exactly as Patchwork sent it (UTF-8 JSON)."""
    message_id: str
    """Stable for the event across republishes and retries (webhook-id, ce-id)."""
    routing_key: str
    headers: dict[str, str] = field(default_factory=dict)
    """The bus headers of the event: ce-* and x-patchwork-*."""
    attempt: int = 1
    """1 for the first attempt, 2 for the first retry, ..."""


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
    """The receiver is gone for good (410): stop the whole subscription until an operator acts."""

    reason: str
    detail: str = ""
    status: int | None = None


Outcome = Delivered | RetryLater | GiveUp | Disable


class SinkSpec(Protocol):
    """What a sink factory is given: one subscription's settings, already validated.

    The subscriptions file's ``[[webhook]]`` tables satisfy it; a sink reads what it
    needs and ignores the rest. Secrets stay ``SecretStr`` until the sink uses them.
    """

    @property
    def name(self) -> str: ...
    @property
    def url(self) -> str | None: ...
    @property
    def command(self) -> Sequence[str] | None: ...
    @property
    def options(self) -> Mapping[str, Any]: ...
    @property
    def secret(self) -> SecretStr | None: ...
    @property
    def bearer_token(self) -> SecretStr | None: ...
    @property
    def timeout(self) -> float:
        """Seconds for one whole attempt."""

    @property
    def concurrency(self) -> int:
        """Deliveries at once, at most."""

    @property
    def allow_private_network(self) -> bool: ...


class Sink(Protocol):
    """Built per subscription at start-up; owns its resources (sessions, processes) till close()."""

    enforces_timeout: bool
    """True when every ``deliver`` returns within the subscription's timeout on its own;
    otherwise the consumer cancels it a little later. A sink without it counts as False."""

    async def deliver(self, delivery: Delivery) -> Outcome: ...

    async def close(self) -> None: ...


def is_sink(obj: object) -> bool:
    """Whether ``obj`` has a sink's methods (``enforces_timeout`` is optional for plugins)."""
    return callable(getattr(obj, "deliver", None)) and callable(getattr(obj, "close", None))
