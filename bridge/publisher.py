"""Publish events to the topic exchange with publisher confirms, many in flight at once."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import aio_pika
from aio_pika.abc import AbstractExchange

from bridge.events import APP_ID, Event, amqp_headers
from bridge.metrics import Metrics

log = logging.getLogger(__name__)

CONFIRM_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class PublishResult:
    confirmed: list[Event]
    failed: list[tuple[Event, str]]
    """(event, reason) for each publish the broker did not confirm."""


def build_message(event: Event, source: str, tz: ZoneInfo) -> aio_pika.Message:
    """The bus message of DESIGN.md: Patchwork's bytes plus properties and ce-* headers."""
    return aio_pika.Message(
        event.body,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=event.message_id,
        type=event.category,
        timestamp=datetime.now(UTC),
        app_id=APP_ID,
        headers=amqp_headers(event, source, tz),  # type: ignore[arg-type]
    )


class Publisher:
    """Publishes through one confirming channel's exchange; the caller owns the connection."""

    def __init__(
        self,
        exchange: AbstractExchange,
        source: str,
        tz: ZoneInfo,
        metrics: Metrics,
        max_in_flight: int,
    ) -> None:
        self._exchange = exchange
        self._source = source
        self._tz = tz
        self._metrics = metrics
        self._slots = asyncio.Semaphore(max_in_flight)

    async def publish(self, events: Sequence[Event]) -> PublishResult:
        """Publish all, wait for every confirm; never raises for a broker failure."""
        outcomes = await asyncio.gather(*(self._publish_one(e) for e in events))
        confirmed = [e for e, reason in zip(events, outcomes, strict=True) if reason is None]
        failed = [(e, r) for e, r in zip(events, outcomes, strict=True) if r is not None]
        for event in confirmed:
            self._metrics.events_published.labels(event.project, event.category).inc()
        for _, reason in failed:
            self._metrics.publish_failures.labels(reason).inc()
        return PublishResult(confirmed, failed)

    async def _publish_one(self, event: Event) -> str | None:
        message = build_message(event, self._source, self._tz)
        async with self._slots:
            try:
                await self._exchange.publish(
                    message, event.routing_key, mandatory=False, timeout=CONFIRM_TIMEOUT_S
                )
            except aio_pika.exceptions.DeliveryError:
                return "nack"
            except aio_pika.exceptions.PublishError:
                return "returned"
            except TimeoutError:
                return "timeout"
            except (aio_pika.exceptions.AMQPError, ConnectionError, RuntimeError):
                # Channel or connection gone: the robust connection is reconnecting.
                return "connection"
        return None
