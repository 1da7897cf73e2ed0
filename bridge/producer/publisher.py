"""Publish events to the topic exchange with publisher confirms, many in flight at once."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange
from aiormq import spec

from bridge.broker.errors import BROKER_ERRORS
from bridge.broker.topology import publish_confirmed
from bridge.eventlog import log_queue, start_marker
from bridge.events import APP_ID, Event, amqp_headers
from bridge.metrics import Metrics

log = logging.getLogger(__name__)

CONFIRM_TIMEOUT_S = 30.0
"""For the confirms of one ``publish`` call, all of them together."""


class PublishFailed(Exception):
    """Publishes the broker did not confirm; ``reason`` is a metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason

    @classmethod
    def of(cls, failed: list[tuple[Event, str]]) -> PublishFailed:
        reasons = sorted({reason for _, reason in failed})
        return cls(reasons[0], f"{len(failed)} publishes not confirmed ({', '.join(reasons)})")


@dataclass(frozen=True, slots=True)
class PublishResult:
    confirmed: list[Event]
    failed: list[tuple[Event, str]]
    """(event, reason) for each publish the broker did not confirm."""


def message_properties(event: Event, source: str, tz: ZoneInfo) -> spec.Basic.Properties:
    """The bus message's properties and ce-* headers (docs/bus.md); body: Patchwork's bytes."""
    return spec.Basic.Properties(
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=event.message_id,
        message_type=event.category,
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
        # The channel publishing goes through; a robust channel stays the same object
        # across reconnects. (AbstractExchange does not declare the attribute.)
        self._channel: AbstractChannel = exchange.channel  # type: ignore[attr-defined]
        self._source = source
        self._tz = tz
        self._metrics = metrics
        self._slots = asyncio.Semaphore(max_in_flight)

    async def publish(self, events: Sequence[Event]) -> PublishResult:
        """Publish all, wait for every confirm; never raises for a broker failure.

        One deadline for the whole batch rather than a timer per message: with
        thousands in flight, the event loop's timer heap was a measurable cost.
        """
        if not events:
            return PublishResult([], [])
        tasks = [asyncio.create_task(self._publish_one(e)) for e in events]
        try:
            _, late = await asyncio.wait(tasks, timeout=CONFIRM_TIMEOUT_S)
        except asyncio.CancelledError:
            for task in tasks:
                task.cancel()
            raise
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late)
        outcomes = ["timeout" if task.cancelled() else task.result() for task in tasks]
        confirmed = [e for e, reason in zip(events, outcomes, strict=True) if reason is None]
        failed = [(e, r) for e, r in zip(events, outcomes, strict=True) if r is not None]
        for (project, category), n in Counter((e.project, e.category) for e in confirmed).items():
            self._metrics.events_published.labels(project, category).inc(n)
        for reason, n in Counter(reason for _, reason in failed).items():
            self._metrics.publish_failures.labels(reason).inc(n)
        return PublishResult(confirmed, failed)

    async def mark_start(self, cursor_json: str) -> None:
        """Record a first start's cursor in the event log (``bridge.eventlog.start_marker``);
        PublishFailed unless the broker confirms it."""
        try:
            await publish_confirmed(
                self._channel, log_queue(self._exchange.name), start_marker(cursor_json)
            )
        except BROKER_ERRORS as exc:
            self._metrics.publish_failures.labels("connection").inc()
            raise PublishFailed(
                "connection", f"the start marker was not confirmed ({exc})"
            ) from None

    async def _publish_one(self, event: Event) -> str | None:
        properties = message_properties(event, self._source, self._tz)
        async with self._slots:
            try:
                channel = await self._channel.get_underlay_channel()
                # aiormq's own publish (aio-pika's would also build a Message): wait=False
                # queues the frames without waiting for them to reach the socket, so
                # publishes in flight share socket writes; the confirm is still awaited.
                await channel.basic_publish(
                    event.body,
                    exchange=self._exchange.name,
                    routing_key=event.routing_key,
                    properties=properties,
                    wait=False,  # aiormq's Channel takes it; its abstract base does not say so
                )  # type: ignore[call-arg]
            except aio_pika.exceptions.DeliveryError:
                return "nack"
            except aio_pika.exceptions.PublishError:
                return "returned"
            except (aio_pika.exceptions.AMQPError, ConnectionError, RuntimeError):
                # Channel or connection gone: the robust connection is reconnecting.
                return "connection"
        return None
