"""What every role declares and how: the topic exchange, queue arguments that make a silent
loss impossible on RabbitMQ 4, replay routes, and a confirmed publish straight to a queue."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue
from aiormq import spec

from bridge.broker.calls import BROKER_TIMEOUT_S
from bridge.broker.errors import NotConfirmed

QueueType = Literal["classic", "quorum"]


async def declare_exchange(channel: AbstractChannel, name: str) -> AbstractExchange:
    """The durable topic exchange events are published to; keys are ``<project>.<category>``."""
    return await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)


def replay_exchange(exchange: str, queue: str) -> str:
    """The queue's replay route: a topic exchange with the same bindings as the queue has to
    ``exchange``, and no other queue bound. ``replay`` publishes each copy there with its
    original routing key, so the broker gives the queue exactly what it would have routed
    to it live. Its existence also says that this deployment made the queue."""
    return f"{exchange}.replay.{queue}"


async def declare_replay_route(
    channel: AbstractChannel, exchange: str, queue: AbstractQueue, patterns: Sequence[str]
) -> None:
    """Declare ``queue``'s replay route and bind it with ``patterns`` (idempotent)."""
    route = await channel.declare_exchange(
        replay_exchange(exchange, queue.name), aio_pika.ExchangeType.TOPIC, durable=True
    )
    for pattern in patterns:
        await queue.bind(route, pattern)


DELIVERY_LIMIT = 100
"""Quorum queues: deliveries of one message (a return on a closed channel, a nack with
requeue, a crash of the consumer) before the broker dead-letters it. RabbitMQ 4.0 sets 20
and then *drops* the message when the queue has no dead-letter target; ours always have
one (``.dead``), and 100 lets a crash-looping consumer restart for a long while first."""
DEAD_DELIVERY_LIMIT = 1_000_000
"""Quorum dead-letter queues: in effect never. ``dlq list`` returns each message it shows,
which counts as a delivery; -1 (no limit) means "no limit" on 4.x but "drop at once" on
3.x, and a dead queue cannot dead-letter to itself (the broker drops the cycle)."""


def queue_arguments(
    queue_type: QueueType,
    *,
    dead_letter_exchange: str | None = None,
    dead_letter_routing_key: str | None = None,
    message_ttl_ms: int | None = None,
    dead_letters: bool = False,
) -> dict[str, Any]:
    """Arguments for a durable queue of the given type.

    Every quorum queue states its delivery limit: ``DELIVERY_LIMIT`` for a queue with a
    dead-letter target, ``DEAD_DELIVERY_LIMIT`` for a queue of dead letters
    (``dead_letters=True``); nothing is left to the broker's default. Quorum queues
    dead-letter at-least-once only with ``reject-publish`` overflow, so a message moved
    between our queues is never dropped on the way.
    """
    args: dict[str, Any] = {"x-queue-type": queue_type}
    if dead_letter_exchange is not None:
        args["x-dead-letter-exchange"] = dead_letter_exchange
    if dead_letter_routing_key is not None:
        args["x-dead-letter-routing-key"] = dead_letter_routing_key
    if message_ttl_ms is not None:
        args["x-message-ttl"] = message_ttl_ms
    if queue_type == "quorum":
        if dead_letters:
            args["x-delivery-limit"] = DEAD_DELIVERY_LIMIT
        elif dead_letter_exchange is not None:
            args["x-delivery-limit"] = DELIVERY_LIMIT
            args["x-dead-letter-strategy"] = "at-least-once"
            args["x-overflow"] = "reject-publish"
        else:
            raise ValueError("a quorum queue needs a dead-letter target or dead_letters=True")
    return args


async def declare_queue(
    channel: AbstractChannel, name: str, arguments: dict[str, Any]
) -> AbstractQueue:
    return await channel.declare_queue(name, durable=True, arguments=arguments)


async def publish_confirmed(
    channel: AbstractChannel, queue: str, message: aio_pika.Message
) -> None:
    """Publish straight to ``queue`` and wait for the broker's confirm.

    ``mandatory`` makes a missing queue an error instead of a silent drop. Raises one of
    BROKER_ERRORS (a nack is aiormq's DeliveryError, a return is NotConfirmed).
    """
    result = await channel.default_exchange.publish(
        message, routing_key=queue, mandatory=True, timeout=BROKER_TIMEOUT_S
    )
    if not isinstance(result, spec.Basic.Ack):
        raise NotConfirmed(f"{queue}: returned by the broker (does the queue exist?)")
