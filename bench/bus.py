"""Declaring, loading and deleting a benchmark's own exchange and queues on the broker."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from zoneinfo import ZoneInfo

import aio_pika
from common import CONTROL_TIMEOUT_S, PRELOAD_CHUNK, SOURCE, TZ

from bridge.broker.topology import declare_exchange, replay_exchange
from bridge.delivery.history import history_queue
from bridge.delivery.queues import subscription_queues
from bridge.eventlog import log_queue
from bridge.events import Event
from bridge.metrics import Metrics
from bridge.producer.publisher import Publisher
from bridge.webhook.role import declare_subscription
from bridge.webhook.subscriptions import Subscription, load_subscriptions
from tests.broker import AMQP_URL  # TEST_AMQP_URL, as for the tests


async def declare(exchange: str, subscriptions_file: Path) -> None:
    """The exchange and every queue of the file's subscriptions, as the bridge declares them."""
    connection = await aio_pika.connect(AMQP_URL, timeout=CONTROL_TIMEOUT_S)
    try:
        channel = await connection.channel()
        await declare_exchange(channel, exchange)
        for subscription in load_subscriptions(subscriptions_file):
            await declare_subscription(channel, exchange, subscription, "classic")
    finally:
        await connection.close()


async def park(exchange: str, queue: str) -> None:
    """A durable queue bound to every event that nobody reads: a CI system that is away."""
    connection = await aio_pika.connect(AMQP_URL, timeout=CONTROL_TIMEOUT_S)
    try:
        channel = await connection.channel()
        parked = await channel.declare_queue(queue, durable=True)
        await parked.bind(exchange, "#")
    finally:
        await connection.close()


async def preload(exchange: str, events: Sequence[Event]) -> None:
    """Publish ``events`` through the producer's own publisher, every one confirmed."""
    connection = await aio_pika.connect(AMQP_URL, timeout=CONTROL_TIMEOUT_S)
    try:
        channel = await connection.channel(publisher_confirms=True)
        target = await channel.get_exchange(exchange)
        publisher = Publisher(target, SOURCE, ZoneInfo(TZ), Metrics(), PRELOAD_CHUNK)
        for start in range(0, len(events), PRELOAD_CHUNK):
            result = await publisher.publish(events[start : start + PRELOAD_CHUNK])
            if result.failed:
                raise RuntimeError(f"pre-loading: {len(result.failed)} publishes not confirmed")
    finally:
        await connection.close()


async def forget_log(exchange: str) -> None:
    """Delete the exchange's event log, so the next producer's first start is a first start:
    with the log, a producer without a cursor resumes after what the log holds."""
    connection = await aio_pika.connect(AMQP_URL, timeout=CONTROL_TIMEOUT_S)
    try:
        channel = await connection.channel()
        await channel.queue_delete(log_queue(exchange))
        await channel.queue_delete(history_queue(exchange))  # the webhook role's attempt history
    finally:
        await connection.close()


async def queue_depth(queue: str) -> int:
    connection = await aio_pika.connect(AMQP_URL, timeout=CONTROL_TIMEOUT_S)
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)
    finally:
        await connection.close()


async def delete_topology(
    exchange: str, names: Sequence[str], extra_queues: Sequence[str] = ()
) -> None:
    """Every queue the bridge may have declared for subscriptions ``names``, the
    ``extra_queues`` and the exchange."""
    connection = await aio_pika.connect(AMQP_URL, timeout=CONTROL_TIMEOUT_S)
    try:
        channel = await connection.channel()
        for queue in extra_queues:
            await channel.queue_delete(queue)
        for name in names:
            # The benchmarks keep the default retry schedule, so these are all its queues.
            subscription = Subscription(name=name)
            queues = subscription_queues(exchange, name)
            for queue in [
                *queues.watched(subscription.retry_schedule),
                queues.marker,
                queues.breaker,
            ]:
                await channel.queue_delete(queue)
            await channel.exchange_delete(replay_exchange(exchange, queues.main))
        await channel.exchange_delete(exchange)
        await channel.queue_delete(log_queue(exchange))
        await channel.queue_delete(history_queue(exchange))  # the webhook role's attempt history
    finally:
        await connection.close()
