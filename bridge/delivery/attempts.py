"""One lane's attempts: what a sink is handed for a message, what it answers, and the
attempt's record. Nothing here touches the broker or the lane's consuming state."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from aio_pika.abc import AbstractIncomingMessage

from bridge.delivery.history import Attempt, attempt_at
from bridge.delivery.messages import InvalidMessage, delivery_from
from bridge.delivery.outcomes import (
    Delivered,
    Delivery,
    Disable,
    GiveUp,
    Invalid,
    Outcome,
    RetryLater,
    Sink,
    Unmatched,
)
from bridge.logs import one_line
from bridge.metrics import Metrics
from bridge.topics import TopicMatcher

log = logging.getLogger(__name__)

SINK_GRACE_S = 5.0
"""A sink gets its lane's timeout plus this before the lane gives up on it."""


@dataclass(frozen=True, slots=True)
class Tried:
    """A sink's outcome, with when the attempt started and how long it took."""

    outcome: Outcome
    delivery: Delivery
    at: datetime
    took_s: float


class Attempts:
    def __init__(
        self,
        name: str,
        label: str,
        sink: Sink,
        patterns: tuple[str, ...],
        timeout_s: float,
        metrics: Metrics,
        history: Callable[[Attempt], None] | None,
    ) -> None:
        """``history``: where each attempt's record goes (None: kept nowhere)."""
        self._name = name
        self._label = label
        self.sink = sink
        self._wants = TopicMatcher(patterns)
        self._limit_s = timeout_s + SINK_GRACE_S
        self._sink_times_out = bool(getattr(sink, "enforces_timeout", False))
        self._history = history
        self._duration = metrics.delivery_duration.labels(name)
        self._logged: set[str] = set()
        """Kinds of sink errors whose traceback was logged (once each)."""

    def read(self, message: AbstractIncomingMessage) -> Delivery | Invalid | Unmatched:
        """What a sink would be handed, or why no sink is handed it."""
        try:
            delivery = delivery_from(message)
        except InvalidMessage as exc:
            return Invalid(str(exc))
        if not self._wants(delivery.routing_key):
            return Unmatched(delivery.routing_key)
        return delivery

    async def attempt(self, delivery: Delivery) -> Tried:
        at = datetime.now(UTC)
        started = time.monotonic()
        outcome = await self._deliver(delivery)
        took_s = time.monotonic() - started
        self._duration.observe(took_s)
        return Tried(outcome, delivery, at, took_s)

    def remember(self, tried: Tried, what_became: str) -> None:
        """The attempt's record in the attempt history (``bridge.delivery.history``)."""
        if self._history is None:
            return
        outcome, delivery = tried.outcome, tried.delivery
        failed = not isinstance(outcome, Delivered)
        self._history(
            Attempt(
                subscription=self._name,
                event=delivery.message_id,
                routing_key=delivery.routing_key,
                attempt=delivery.attempt,
                at=attempt_at(tried.at),
                duration_ms=round(tried.took_s * 1000, 1),
                outcome=what_became,
                status=outcome.status,
                reason=outcome.reason if failed else None,  # type: ignore[union-attr]
                detail=one_line(outcome.detail) if failed else "",  # type: ignore[union-attr]
            )
        )

    async def _deliver(self, delivery: Delivery) -> Outcome:
        """The sink's outcome; a sink that raises, hangs or answers nonsense is retried."""
        deadline: asyncio.Timeout | None = None
        try:
            if self._sink_times_out:  # it needs no second deadline
                outcome = await self.sink.deliver(delivery)
            else:
                async with (deadline := asyncio.timeout(self._limit_s)):
                    outcome = await self.sink.deliver(delivery)
        except Exception as exc:
            if isinstance(exc, TimeoutError) and deadline is not None and deadline.expired():
                return RetryLater("timeout", f"sink gave no outcome within {self._limit_s:g}s")
            kind = type(exc).__name__
            if kind not in self._logged:  # a traceback once per kind, not per event
                self._logged.add(kind)
                log.exception("%s: sink raised %s", self._label, kind)
            else:
                log.warning("%s: sink raised %s again", self._label, kind)
            return RetryLater("sink_error", kind)
        if not isinstance(outcome, Delivered | RetryLater | GiveUp | Disable):
            return RetryLater("sink_error", f"sink returned {type(outcome).__name__}")
        return outcome
