"""Queue depth gauges, sampled by passive declares on the real broker."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import aio_pika
import pytest

from bridge.delivery.depth import QueueDepthSampler
from bridge.metrics import Metrics
from tests.amqp_helpers import (
    HangingSink,
    delete_subscription_queues,
    lane,
    make_consumer,
    publish_events,
    running,
    subscription,
    wait_for,
)


def gauge(metrics: Metrics, name: str, queue: str) -> float | None:
    return metrics.registry.get_sample_value(f"patchwork_bridge_{name}", {"queue": queue})


@pytest.fixture
async def queues(amqp: aio_pika.abc.AbstractConnection, unique: str) -> AsyncIterator[list[str]]:
    """Two queues: one holding 3 messages, one with a consumer; deleted afterwards."""
    channel = await amqp.channel()
    full = await channel.declare_queue(f"test-depth-{unique}-full", durable=True)
    busy = await channel.declare_queue(f"test-depth-{unique}-busy", durable=True)
    for _ in range(3):
        await channel.default_exchange.publish(aio_pika.Message(b"{}"), routing_key=full.name)

    async def ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        """Holds the message unacked: it counts as a consumer, not as ready."""

    await busy.consume(ignore)
    yield [full.name, busy.name]
    await channel.queue_delete(full.name)
    await channel.queue_delete(busy.name)
    await channel.close()


async def test_sampler_sets_ready_messages_and_consumers_per_queue(
    amqp: aio_pika.abc.AbstractConnection, queues: list[str], unique: str, caplog
) -> None:
    full, busy = queues
    missing = f"test-depth-{unique}-missing"
    metrics = Metrics()
    sampler = QueueDepthSampler(amqp, [missing, full, busy], metrics, interval_s=1.0)
    with caplog.at_level(logging.WARNING, logger="bridge.webhook.queue_depth"):
        await sampler.sample_once()
        await sampler.sample_once()

    assert gauge(metrics, "queue_messages_ready", full) == 3
    assert gauge(metrics, "queue_consumers", full) == 0
    assert gauge(metrics, "queue_messages_ready", busy) == 0
    assert gauge(metrics, "queue_consumers", busy) == 1
    # A missing queue is skipped (after it, the others are still sampled) and logged once.
    assert gauge(metrics, "queue_messages_ready", missing) is None
    assert [r.getMessage() for r in caplog.records] == [
        f"queue depth: queue {missing} does not exist; skipping it"
    ]


async def test_sampler_stops_between_samples_when_asked(
    amqp: aio_pika.abc.AbstractConnection, queues: list[str], caplog
) -> None:
    """Not cancelled in the middle of a declare: aiormq would close the channel and warn."""
    metrics = Metrics()
    sampler = QueueDepthSampler(amqp, queues * 50, metrics, interval_s=0.01)
    stop = asyncio.Event()
    with caplog.at_level(logging.WARNING):
        task = asyncio.create_task(sampler.run(stop))
        await wait_for(lambda: gauge(metrics, "queue_consumers", queues[1]) == 1)
        stop.set()
        await asyncio.wait_for(task, 10)  # returns by itself, never cancelled
    assert not task.cancelled() and task.exception() is None
    assert caplog.records == []


async def test_consumer_samples_its_main_retry_and_dead_queues(
    amqp: aio_pika.abc.AbstractConnection, exchange_name: str, unique: str
) -> None:
    stuck = subscription(f"depth-{unique}", concurrency=1, retry_schedule=[0.5])
    metrics = Metrics()
    consumer = make_consumer(exchange_name, [(stuck, HangingSink())], metrics=metrics)
    main, dead = lane(exchange_name, stuck.name).main, lane(exchange_name, stuck.name).dead
    retry = lane(exchange_name, stuck.name).retry(0.25)
    try:
        async with running(consumer):
            await publish_events(exchange_name, [("patch-created", i) for i in range(1, 5)])
            # One event is held by the hanging receiver; three are ready.
            await wait_for(
                lambda: gauge(metrics, "queue_messages_ready", main) == 3, what="3 ready in main"
            )
            assert gauge(metrics, "queue_consumers", main) == 1
            assert gauge(metrics, "queue_messages_ready", retry) == 0
            assert gauge(metrics, "queue_messages_ready", dead) == 0
    finally:
        await delete_subscription_queues(amqp, exchange_name, [stuck])
