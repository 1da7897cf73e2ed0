"""The webhook consumer's queues: their names, their declaration, and marker changes.

Per subscription ``<name>``: ``bridge.webhook.<name>`` (main, bound to the exchange
with the subscription's patterns), one ``.retry.<delay>s`` queue per step of the
retry ladder (queue-wide TTL, dead-lettered back to the main queue, so a long delay
never blocks a short one), ``.dead`` (dead letters) and, while the subscription is
disabled, an empty ``.disabled`` marker queue. Everything lives on the broker, so
it survives restarts and is shared by competing consumers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractQueue
from aiormq import spec
from aiormq.abc import AbstractChannel as AbstractChannelUnderlay
from aiormq.exceptions import ChannelNotFoundEntity

from bridge.amqp import (
    BROKER_ERRORS,
    BROKER_TIMEOUT_S,
    QueueType,
    close_channel,
    declare_queue,
    open_bare_channel,
    queue_arguments,
)
from bridge.webhook.retry import delay_ladder
from bridge.webhook.subscriptions import RESERVED, Subscription

PREFIX = "bridge.webhook"


class TopologyError(Exception):
    """A queue cannot be declared as configured (most often: it exists with another type)."""


def main_queue(name: str) -> str:
    return RESERVED.get(name, f"{PREFIX}.{name}")


def dead_queue(name: str) -> str:
    return f"{main_queue(name)}.dead"


def marker_queue(name: str) -> str:
    return f"{main_queue(name)}.disabled"


def retry_queue(name: str, delay_s: float) -> str:
    """Named by the delay in seconds, to the millisecond (``retry.0.2s``, ``retry.300s``).

    The name fixes the TTL, so every process declares the same queue the same way.
    """
    text = f"{ttl_ms(delay_s) / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{main_queue(name)}.retry.{text}s"


def ttl_ms(delay_s: float) -> int:
    return max(0, round(delay_s * 1000))


def retry_queues(subscription: Subscription) -> dict[float, str]:
    """Each delay of the subscription's ladder and the queue that waits that long."""
    return _retry_queues(subscription.name, subscription.retry_schedule)


def queue_names(subscription: Subscription) -> list[str]:
    """Main, retry and dead queues: the ones whose depth an operator watches."""
    return queue_names_of(subscription.name, subscription.retry_schedule)


def queue_names_of(name: str, retry_schedule: Sequence[float]) -> list[str]:
    """``queue_names`` for a subscription known only by name and schedule."""
    return [main_queue(name), *_retry_queues(name, retry_schedule).values(), dead_queue(name)]


def _retry_queues(name: str, retry_schedule: Sequence[float]) -> dict[float, str]:
    return {d: retry_queue(name, d) for d in delay_ladder(retry_schedule)}


async def declare_subscription(
    channel: AbstractChannel, exchange: str, subscription: Subscription, queue_type: QueueType
) -> AbstractQueue:
    """Declare and bind all queues of one subscription; returns the main queue to consume.

    Idempotent, so any number of processes may run it. Raises TopologyError naming
    the queue when the broker refuses (e.g. it exists as a classic queue and
    BRIDGE_QUEUE_TYPE says quorum).
    """
    name = subscription.name
    main = main_queue(name)
    current = main
    try:
        async with asyncio.timeout(BROKER_TIMEOUT_S):
            # Quorum: past the delivery limit the broker moves an event to .dead (x-death
            # says delivery_limit), never a silent drop on RabbitMQ 4. Classic queues have
            # no delivery limit, and keep the arguments they always had.
            main_arguments = (
                queue_arguments(
                    queue_type, dead_letter_exchange="", dead_letter_routing_key=dead_queue(name)
                )
                if queue_type == "quorum"
                else queue_arguments(queue_type)
            )
            queue = await declare_queue(channel, main, main_arguments)
            for pattern in subscription.events:
                await queue.bind(exchange, pattern)
            for delay_s, retry_name in retry_queues(subscription).items():
                current = retry_name
                arguments = queue_arguments(
                    queue_type,
                    dead_letter_exchange="",
                    dead_letter_routing_key=main,
                    message_ttl_ms=ttl_ms(delay_s),
                )
                await declare_queue(channel, retry_name, arguments)
            current = dead_queue(name)
            await declare_queue(channel, current, queue_arguments(queue_type, dead_letters=True))
    except BROKER_ERRORS as exc:
        raise TopologyError(
            f"cannot declare queue {current} ({type(exc).__name__}: {exc}); "
            f"if it exists with another type, check BRIDGE_QUEUE_TYPE"
        ) from None
    return queue


class QueueControl:
    """Passive declares and marker changes on a bare channel of its own.

    The broker closes a channel that passively declares a missing queue, which for a
    marker queue is the normal, enabled state. An aio-pika robust channel would reopen
    itself in the background and fail the calls made meanwhile, and every aio-pika channel
    leaves residue on its connection; so this uses a bare aiormq channel
    (``open_bare_channel``) and opens a fresh one when the last was closed. Calls are
    serialised: one RPC at a time on the channel.
    """

    def __init__(self, connection: AbstractConnection) -> None:
        self._connection = connection
        self._channel: AbstractChannelUnderlay | None = None
        self._lock = asyncio.Lock()

    async def inspect(self, queue: str) -> spec.Queue.DeclareOk | None:
        """Ready-message and consumer counts of ``queue``, or None if it does not exist."""
        async with self._lock, asyncio.timeout(BROKER_TIMEOUT_S):
            channel = await self._underlay()
            try:
                return await channel.queue_declare(queue, passive=True)
            except ChannelNotFoundEntity:
                return None

    async def is_disabled(self, name: str) -> bool:
        """Whether the subscription's marker queue exists."""
        return await self.inspect(marker_queue(name)) is not None

    async def set_disabled(self, name: str, disabled: bool, queue_type: QueueType) -> None:
        """Persist the disabled state: the marker queue exists exactly while disabled."""
        async with self._lock, asyncio.timeout(BROKER_TIMEOUT_S):
            channel = await self._underlay()
            if disabled:
                await channel.queue_declare(
                    marker_queue(name),
                    durable=True,
                    # Empty; its existence is the state. Holds nothing to dead-letter.
                    arguments=queue_arguments(queue_type, dead_letters=True),
                )
            else:
                await channel.queue_delete(marker_queue(name))

    async def close(self) -> None:
        if self._channel is not None:
            await close_channel(self._channel)
        self._channel = None

    async def _underlay(self) -> AbstractChannelUnderlay:
        if self._channel is None or self._channel.is_closed:
            self._channel = await open_bare_channel(self._connection)
        return self._channel
