"""The sink interface plugins import: an event in, an outcome out. The delivery engine turns
outcomes into ack, retry or dead letter (``bridge.delivery``).

The outcome types themselves live with the engine's own (``bridge.delivery.outcomes``);
they are re-exported here so that a plugin needs this module alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from pydantic import SecretStr

from bridge.delivery.outcomes import (
    Delivered,
    Delivery,
    Disable,
    GiveUp,
    Outcome,
    RetryLater,
    Sink,
    is_sink,
)

__all__ = [
    "Delivered",
    "Delivery",
    "Disable",
    "GiveUp",
    "Outcome",
    "RetryLater",
    "Sink",
    "SinkSpec",
    "is_sink",
]


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
