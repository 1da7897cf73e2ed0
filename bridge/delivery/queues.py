"""The delivery lanes' queues: their names, their declaration, and marker changes.

Every name belongs to one deployment, the exchange it reads (``BRIDGE_EXCHANGE``): two
bridges with different exchanges on one vhost share no queue. Per subscription ``<name>``
of exchange ``<ex>``: ``<ex>.webhook.<name>`` (main, bound to the exchange with the
subscription's patterns), one ``.retry.<delay>s`` queue per delay level (queue-wide TTL,
dead-lettered back to the main queue, so a long delay never blocks a short one; see
``bridge.delivery.retry``), ``.dead`` (dead letters) and, while the subscription
is disabled, an empty ``.disabled`` marker queue. The checks role's lane is
``<ex>.checks`` with the same suffixes. Everything lives on the broker, so it survives
restarts and is shared by competing consumers of the same deployment.

Versions before 0.2 named them ``bridge.webhook.<name>`` and ``bridge.checks`` for every
deployment alike (``LEGACY_*``); ``patchwork-bridge migrate`` moves what waits there.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractQueue
from aiormq import spec
from aiormq.abc import AbstractChannel as AbstractChannelUnderlay
from aiormq.exceptions import (
    ChannelAccessRefused,
    ChannelNotFoundEntity,
    ChannelPreconditionFailed,
)

from bridge.broker.calls import (
    BROKER_TIMEOUT_S,
    close_channel,
    open_bare_channel,
    raise_if_cancelled,
)
from bridge.broker.errors import BROKER_TROUBLE, QueueUnavailable, TopologyError
from bridge.broker.topology import QueueType, declare_queue, declare_replay_route, queue_arguments
from bridge.delivery.retry import legacy_delays, levels_for

log = logging.getLogger(__name__)
T = TypeVar("T")

LEGACY_PREFIX = "bridge.webhook"
LEGACY_CHECKS = "bridge.checks"


@dataclass(frozen=True, slots=True)
class QueueSet:
    """One lane's queues, all named after its main queue."""

    main: str

    @property
    def dead(self) -> str:
        return f"{self.main}.dead"

    @property
    def marker(self) -> str:
        """Exists exactly while the lane is disabled."""
        return f"{self.main}.disabled"

    @property
    def breaker(self) -> str:
        """Exists exactly while the lane's circuit breaker is open (``bridge.delivery.breaker``)."""
        return f"{self.main}.breaker"

    def retry(self, delay_s: float) -> str:
        """Named by the delay in seconds, to the millisecond (``retry.0.2s``, ``retry.300s``).

        The name fixes the TTL, so every process declares the same queue the same way.
        """
        text = f"{ttl_ms(delay_s) / 1000:.3f}".rstrip("0").rstrip(".")
        return f"{self.main}.retry.{text}s"

    def retries(self, retry_schedule: Sequence[float]) -> dict[float, str]:
        """Each delay level of a lane with this schedule and the queue that waits that long."""
        return {d: self.retry(d) for d in levels_for(retry_schedule)}

    def legacy_retries(self, retry_schedule: Sequence[float]) -> list[str]:
        """Retry queues versions before 0.3 declared for this schedule, no longer used."""
        return [self.retry(d) for d in legacy_delays(retry_schedule)]

    def every_retry(self, retry_schedule: Sequence[float]) -> list[str]:
        """Its retry queues of this version and of earlier ones: what removing it deletes."""
        return [*self.retries(retry_schedule).values(), *self.legacy_retries(retry_schedule)]

    def watched(self, retry_schedule: Sequence[float]) -> list[str]:
        """Main, retry and dead queues: the ones whose depth an operator watches."""
        return [self.main, *self.retries(retry_schedule).values(), self.dead]


def subscription_queues(exchange: str, name: str) -> QueueSet:
    return QueueSet(f"{exchange}.webhook.{name}")


def checks_queues(exchange: str) -> QueueSet:
    """The checks role's lane; it binds ``<exchange>.results``, named for the deployment."""
    return QueueSet(f"{exchange}.checks")


def legacy_subscription_queues(name: str) -> QueueSet:
    """Where versions before 0.2 kept a subscription's events, whatever the exchange."""
    return QueueSet(f"{LEGACY_PREFIX}.{name}")


def ttl_ms(delay_s: float) -> int:
    return max(0, round(delay_s * 1000))


async def declare_lane(
    channel: AbstractChannel,
    exchange: str,
    queues: QueueSet,
    patterns: Sequence[str],
    retry_schedule: Sequence[float],
    queue_type: QueueType,
    *,
    replay_from: str | None = None,
) -> AbstractQueue:
    """Declare and bind all queues of one lane; returns the main queue to consume.

    ``exchange`` is what the main queue is bound to with ``patterns``; ``replay_from``, the
    deployment's event exchange whose replay route (``bridge.broker.topology.replay_exchange``) gets
    the same bindings, so that ``replay`` gives the queue only what it would have routed.
    Idempotent, so any number of processes may run it. Raises TopologyError naming the
    queue when the broker refuses it for good (it exists with other arguments, say as a
    classic queue where BRIDGE_QUEUE_TYPE says quorum; the user may not declare it), and
    QueueUnavailable when it may not just now (try again, on a new channel: the broker
    closed this one).
    """
    current = queues.main
    try:
        async with asyncio.timeout(BROKER_TIMEOUT_S):
            # Quorum: past the delivery limit the broker moves an event to .dead (x-death
            # says delivery_limit), never a silent drop on RabbitMQ 4. Classic queues have
            # no delivery limit, and keep the arguments they always had.
            main_arguments = (
                queue_arguments(
                    queue_type, dead_letter_exchange="", dead_letter_routing_key=queues.dead
                )
                if queue_type == "quorum"
                else queue_arguments(queue_type)
            )
            queue = await declare_queue(channel, queues.main, main_arguments)
            for pattern in patterns:
                await queue.bind(exchange, pattern)
            if replay_from is not None:
                await declare_replay_route(channel, replay_from, queue, patterns)
            for delay_s, retry_name in queues.retries(retry_schedule).items():
                current = retry_name
                arguments = queue_arguments(
                    queue_type,
                    dead_letter_exchange="",
                    dead_letter_routing_key=queues.main,
                    message_ttl_ms=ttl_ms(delay_s),
                )
                await declare_queue(channel, retry_name, arguments)
            current = queues.dead
            await declare_queue(channel, current, queue_arguments(queue_type, dead_letters=True))
    except (ChannelPreconditionFailed, ChannelAccessRefused) as exc:
        raise TopologyError(
            f"cannot declare queue {current} ({type(exc).__name__}: {exc}); "
            f"if it exists with another type, check BRIDGE_QUEUE_TYPE"
        ) from None
    except BROKER_TROUBLE as exc:
        raise_if_cancelled()
        raise QueueUnavailable(f"cannot declare queue {current} just now ({exc})") from None
    return queue


DECLARE_TRIES = 8
"""Declaring queues that may not be declared just now, at most; a second longer between
each try (28 s in all)."""


async def until_declared(
    connection: AbstractConnection,
    declare: Callable[[AbstractChannel], Awaitable[T]],
    what: str,
    *,
    prefetch: int | None = None,
) -> tuple[AbstractChannel, T]:
    """``declare`` on a channel of its own, and again on a new one while it raises
    QueueUnavailable (the broker closes the channel of a refused declare). Returns the
    channel, the caller's to keep or close."""
    for attempt in range(1, DECLARE_TRIES + 1):
        async with asyncio.timeout(BROKER_TIMEOUT_S):
            channel = await connection.channel()
            if prefetch is not None:
                await channel.set_qos(prefetch_count=prefetch)
        try:
            return channel, await declare(channel)
        except QueueUnavailable as exc:
            await close_channel(channel)
            if attempt == DECLARE_TRIES:
                raise
            log.warning("%s: %s; trying again in %ds", what, exc, attempt)
            await asyncio.sleep(attempt)
    raise AssertionError("unreachable")


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

    async def is_disabled(self, queues: QueueSet) -> bool:
        """Whether the lane's marker queue exists."""
        return await self.inspect(queues.marker) is not None

    async def set_disabled(self, queues: QueueSet, disabled: bool, queue_type: QueueType) -> None:
        """Persist the disabled state: the marker queue exists exactly while disabled."""
        await self._set_marker(queues.marker, disabled, queue_type)

    async def is_breaker_open(self, queues: QueueSet) -> bool:
        return await self.inspect(queues.breaker) is not None

    async def set_breaker_open(
        self, queues: QueueSet, is_open: bool, queue_type: QueueType
    ) -> None:
        await self._set_marker(queues.breaker, is_open, queue_type)

    async def _set_marker(self, name: str, present: bool, queue_type: QueueType) -> None:
        async with self._lock, asyncio.timeout(BROKER_TIMEOUT_S):
            channel = await self._underlay()
            if present:
                await channel.queue_declare(
                    name,
                    durable=True,
                    # Empty; its existence is the state. Holds nothing to dead-letter.
                    arguments=queue_arguments(queue_type, dead_letters=True),
                )
            else:
                await channel.queue_delete(name)

    async def delete_if_empty(self, queue: str) -> int:
        """Delete ``queue`` if it holds nothing; returns what it still holds (0: gone)."""
        async with self._lock, asyncio.timeout(BROKER_TIMEOUT_S):
            channel = await self._underlay()
            try:
                found = await channel.queue_declare(queue, passive=True)
            except ChannelNotFoundEntity:
                return 0
            if found.message_count:
                return found.message_count
            try:
                await channel.queue_delete(queue, if_empty=True)
            except ChannelPreconditionFailed:
                return 1  # a message arrived in between; the next look deletes it
            return 0

    async def close(self) -> None:
        if self._channel is not None:
            await close_channel(self._channel)
        self._channel = None

    async def _underlay(self) -> AbstractChannelUnderlay:
        if self._channel is None or self._channel.is_closed:
            self._channel = await open_bare_channel(self._connection)
        return self._channel
