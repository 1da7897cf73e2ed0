"""Webhook consumer test helpers: recorded events on the bus, fake sinks, a running consumer.

Every test uses its own exchange and subscription names; ``delete_subscription_queues``
removes every queue the consumer may have declared for them.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from zoneinfo import ZoneInfo

import aio_pika
import pika
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from bridge.broker.topology import replay_exchange
from bridge.delivery.engine import DeliveryRole
from bridge.delivery.queues import QueueControl, QueueSet, subscription_queues
from bridge.events import APP_ID, amqp_headers, parse_event
from bridge.metrics import Metrics
from bridge.runtime import InProcess
from bridge.settings import Settings
from bridge.sinks.base import Delivered, Delivery, Outcome
from bridge.webhook.role import lane_of
from bridge.webhook.subscriptions import Subscription
from tests.broker import AMQP_URL, rabbitmqctl

EVENTS_DIR = Path(__file__).resolve().parents[1] / "bridge" / "demo" / "data" / "events"
SOURCE = "http://127.0.0.1:8000/api/1.4"


def recorded_event(category: str = "patch-created", event_id: int | None = None) -> bytes:
    """A recorded event body; ``event_id`` gives it a new id so tests can tell events apart."""
    item = json.loads((EVENTS_DIR / f"{category}.json").read_text())
    if event_id is not None:
        item["id"] = event_id
    return json.dumps(item).encode()


def event_message(body: bytes) -> tuple[aio_pika.Message, str]:
    """The message the producer would publish for ``body``, and its routing key."""
    raw = body.decode()
    event = parse_event(json.loads(raw), raw)
    message = aio_pika.Message(
        event.body,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=event.message_id,
        type=event.category,
        app_id=APP_ID,
        headers=amqp_headers(event, SOURCE, ZoneInfo("Australia/Canberra")),
    )
    return message, event.routing_key


async def publish_events(
    exchange: str, events: Iterable[tuple[str, int]], *, url: str = AMQP_URL
) -> list[str]:
    """Publish (category, id) events to ``exchange`` (declared here if needed); returns the ids."""
    ids = []
    connection = await aio_pika.connect(url, timeout=10)
    try:
        channel = await connection.channel()
        ex = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        for category, event_id in events:
            message, key = event_message(recorded_event(category, event_id))
            await ex.publish(message, routing_key=key, timeout=10)
            ids.append(str(event_id))
    finally:
        await connection.close()
    return ids


async def publish_raw(queue: str, body: bytes, message_id: str | None = None) -> None:
    """Straight into a queue with only the properties given.

    Through pika: aiormq gives every message it publishes a message_id, and poison
    messages must be able to lack one.
    """

    def publish() -> None:
        connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        try:
            properties = pika.BasicProperties(message_id=message_id, delivery_mode=2)
            connection.channel().basic_publish("", queue, body, properties)
        finally:
            connection.close()

    await asyncio.to_thread(publish)


async def queue_depth(connection: AbstractConnection, queue: str) -> int | None:
    """Ready messages in ``queue``, None if it does not exist."""
    control = QueueControl(connection)
    try:
        result = await control.inspect(queue)
    finally:
        await control.close()
    return None if result is None else result.message_count


async def get_all(connection: AbstractConnection, queue: str) -> list[aio_pika.IncomingMessage]:
    """Take (and ack) every message waiting in ``queue``."""
    channel = await connection.channel()
    try:
        q = await channel.get_queue(queue, ensure=True)
        got = []
        while (message := await q.get(no_ack=True, fail=False, timeout=10)) is not None:
            got.append(message)
        return got
    finally:
        await channel.close()


async def wait_for(
    condition: Callable[[], bool | Awaitable[bool]], timeout: float = 15.0, what: str = ""
) -> None:
    """Poll ``condition`` until true; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        await asyncio.sleep(0.05)


def subscription(name: str, **fields: object) -> Subscription:
    fields.setdefault("url", "http://127.0.0.1:9/hook")
    return Subscription(name=name, **fields)  # type: ignore[arg-type]


class FakeSink:
    """Records every delivery and answers with ``answer(delivery)`` (default: delivered)."""

    def __init__(self, answer: Callable[[Delivery], Outcome | Awaitable[Outcome]] | None = None):
        self.answer = answer or (lambda _: Delivered(200))
        self.deliveries: list[Delivery] = []
        self.closed = False

    async def deliver(self, delivery: Delivery) -> Outcome:
        self.deliveries.append(delivery)
        result = self.answer(delivery)
        if inspect.isawaitable(result):
            result = await result
        return result

    async def close(self) -> None:
        self.closed = True

    @property
    def ids(self) -> list[str]:
        return [d.message_id for d in self.deliveries]

    def delivered_ids(self) -> set[str]:
        return set(self.ids)


class HangingSink(FakeSink):
    """Never answers until released: a receiver that accepts the connection and hangs."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def deliver(self, delivery: Delivery) -> Outcome:
        self.deliveries.append(delivery)
        await self.release.wait()
        return Delivered(200)


def make_consumer(
    exchange: str,
    pairs: list[tuple[Subscription, FakeSink]],
    *,
    queue_type: str = "classic",
    metrics: Metrics | None = None,
    role: str | None = None,
    **kwargs: object,
) -> DeliveryRole:
    """The webhook role for these subscriptions and sinks; ``role`` names its connections."""
    settings = Settings(exchange=exchange, queue_type=queue_type, queue_depth_interval=0.2)  # type: ignore[arg-type]
    return DeliveryRole(
        "webhook",
        settings,
        metrics or Metrics(),
        [(lane_of(exchange, sub), sink) for sub, sink in pairs],
        connection_name=role or f"webhook test-{uuid.uuid4().hex[:8]}",
        marker_check_interval_s=kwargs.pop("marker_check_interval_s", 0.2),  # type: ignore[arg-type]
        drain_timeout_s=kwargs.pop("drain_timeout_s", 2.0),  # type: ignore[arg-type]
    )


@asynccontextmanager
async def running(consumer: DeliveryRole) -> AsyncIterator[DeliveryRole]:
    """Run the consumer until the block ends; fails fast if it does not become ready."""
    async with InProcess([consumer]) as bridge:
        await bridge.wait_ready(20)
        yield consumer


def lane(exchange: str, name: str) -> QueueSet:
    """A subscription's queues in the deployment of ``exchange``."""
    return subscription_queues(exchange, name)


async def delete_subscription_queues(
    connection: AbstractConnection, exchange: str, subscriptions: Iterable[Subscription]
) -> None:
    """Delete every queue the consumer may have declared for these subscriptions, and
    their replay routes."""
    channel = await connection.channel()
    try:
        for sub in subscriptions:
            queues = lane(exchange, sub.name)
            for queue in [*queues.watched(sub.retry_schedule), queues.marker, queues.breaker]:
                with suppress(Exception):
                    await channel.queue_delete(queue)
            with suppress(Exception):
                await channel.exchange_delete(replay_exchange(exchange, queues.main))
    finally:
        with suppress(Exception):
            await channel.close()


def connection_pids(connection_name: str) -> list[str]:
    # The text output, not --formatter json: its pids are node-local ("#PID<12576.1.0>")
    # and close_connection rejects them.
    result = rabbitmqctl("list_connections", "pid", "client_properties", "-q")
    result.check_returncode()
    out = result.stdout
    wanted = f'{{"connection_name","{connection_name}"}}'
    return [line.split("\t", 1)[0] for line in out.splitlines() if wanted in line]


async def cut_connection(connection_name: str) -> int:
    """Close the broker side of the named connection, like a network fault; returns how many."""

    def cut() -> int:
        closed = 0
        for pid in connection_pids(connection_name):
            result = rabbitmqctl("close_connection", pid, "test: connection cut")
            # A connection that closed on its own meanwhile is not an error.
            closed += result.returncode == 0
        return closed

    return await asyncio.to_thread(cut)


async def drain(
    queue: str,
    expected: int,
    *,
    timeout: float = 20.0,
    until: Callable[[list[AbstractIncomingMessage]], bool] | None = None,
) -> list[AbstractIncomingMessage]:
    """Consume and ack until ``expected`` messages (or ``until``) arrived; fail after ``timeout``.

    ``expected=0`` collects whatever arrives during ``timeout`` seconds, to show nothing does.
    """
    done = until or (lambda got: len(got) >= expected)
    connection = await aio_pika.connect(AMQP_URL, timeout=10)
    got: list[AbstractIncomingMessage] = []
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=500)
        q = await channel.get_queue(queue, ensure=True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with q.iterator() as messages:
            while expected == 0 or not done(got):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    if expected == 0:
                        return got
                    raise AssertionError(f"{len(got)} of {expected} messages arrived in {timeout}s")
                try:
                    message = await asyncio.wait_for(anext(messages), remaining)
                except TimeoutError:
                    continue
                await message.ack()
                got.append(message)
    finally:
        await connection.close()
    return got
