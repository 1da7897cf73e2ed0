"""RabbitMQ connection and the topology every role declares (exchange and queue arguments).

Connections are aio-pika robust connections: they reconnect by themselves and
re-declare what was declared on them. Code that must know about a lost
connection (the producer's in-flight publishes) sees the publish fail and
retries from its cursor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import aio_pika
import aiormq.abc
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractQueue,
    AbstractRobustConnection,
)
from aiormq import spec
from aiormq.exceptions import AMQPError, ChannelInvalidStateError, ProbableAuthenticationError

from bridge.settings import Settings
from bridge.waiting import sleep_unless

log = logging.getLogger(__name__)

QueueType = Literal["classic", "quorum"]
T = TypeVar("T")
CONNECT_TIMEOUT_S = 10.0
BROKER_TIMEOUT_S = 10.0
"""For each declare, publish and delete: a broker that does not answer is an error, not a hang."""


class TopologyError(Exception):
    """What the bridge must declare cannot be, or a queue of its name is another
    deployment's: an operator's to mend (one line, no retry)."""


class NotConfirmed(Exception):
    """The broker returned a publish (no such queue) instead of confirming it."""


# Errors of a broker call: the broker refused it, the channel or connection went away, or
# it took longer than BROKER_TIMEOUT_S.
class BrokerUnavailable(ConnectionError):
    """A channel could not be opened: the connection is closed or reconnecting."""


BROKER_ERRORS: tuple[type[BaseException], ...] = (
    AMQPError,
    ChannelInvalidStateError,
    NotConfirmed,
    OSError,  # BrokerUnavailable included
    TimeoutError,
)
"""Broker trouble, never our own bugs: a RuntimeError or a KeyError is not in here."""


async def open_channel(connection: AbstractConnection) -> aio_pika.Channel:
    """A plain channel on ``connection``; BrokerUnavailable while it is down.

    aio-pika and aiormq say "closed" or "not ready" with a bare RuntimeError here; this
    is the one place that turns it into a broker error, so nothing else has to catch
    RuntimeError (and hide a bug as broker trouble).
    """
    channel = aio_pika.Channel(connection, publisher_confirms=False)
    try:  # initialize() takes a timeout and ignores it (aio-pika 10.2)
        await uncancelled(channel.initialize(), if_abandoned=lambda _: close_channel(channel))
    except ChannelInvalidStateError:
        raise
    except RuntimeError as exc:
        raise BrokerUnavailable(f"cannot open a channel: {exc}") from None
    return channel


async def open_bare_channel(connection: AbstractConnection) -> aiormq.abc.AbstractChannel:
    """An aiormq channel on ``connection``'s current socket, for RPCs that may close it
    (a passive declare of a missing queue); BrokerUnavailable while the connection is down.

    Not an aio-pika Channel: aio-pika 10.2 keeps about 3 kB for every one of those ever
    opened on a connection (see RecycledConnection). The webhook role checks each
    subscription's missing marker queue every 5 s, each check closing its channel, for the
    life of the process: 57 MB a day per subscription. A bare channel leaves nothing, so
    the connection can stay robust and long-lived.
    """
    transport = connection.transport
    if transport is None or connection.is_closed:  # a robust connection while reconnecting
        raise BrokerUnavailable("cannot open a channel: the connection is down")
    try:
        return await uncancelled(
            transport.connection.channel(publisher_confirms=False),
            if_abandoned=close_channel,
        )
    except RuntimeError as exc:  # aiormq's "closed"
        raise BrokerUnavailable(f"cannot open a channel: {exc}") from None


_UNCANCELLED: set[asyncio.Future[Any]] = set()
"""Broker calls still running after their caller stopped waiting, held until they end."""


async def uncancelled(
    call: Awaitable[T],
    timeout_s: float = BROKER_TIMEOUT_S,
    *,
    if_abandoned: Callable[[T], Awaitable[object]] | None = None,
) -> T:
    """``call``'s result; if the caller is cancelled or gives up after ``timeout_s``
    (TimeoutError), the call itself runs on until the broker answers or the connection
    closes, and ``if_abandoned`` undoes what it did (closes the channel it opened).

    aiormq (7.2) answers a cancelled RPC by closing its channel and stops reading it,
    while the channel stays registered until the broker's Close-Ok. Deliveries already on
    their way to it then fill its 10-frame buffer, and the connection's reader waits on
    that buffer for good: every channel of the connection stops (bench/memory.py, 50 stream
    clients: the hub's channel held 1,000 unacked messages for minutes). A cancelled
    Channel.Close is worse: aiormq sends a second one, which the broker takes as a
    connection error ("CHANNEL_ERROR - expected 'channel.open'"). So Basic.Consume and
    Channel.Close, after which deliveries may be in flight, go through here.

    Not ``asyncio.wait_for``: on Python 3.11 it swallows a cancel that arrives as the call
    ends, returning the result instead (fixed in 3.12). A stream client dropped as slow at
    that moment went on waiting for the hub's events for good (bench/memory.py), so no
    code here waits with it.
    """
    running = asyncio.ensure_future(call)
    _UNCANCELLED.add(running)
    running.add_done_callback(_ended)
    try:
        async with asyncio.timeout(timeout_s):
            return await asyncio.shield(running)
    except (TimeoutError, asyncio.CancelledError):
        if if_abandoned is not None:
            running.add_done_callback(lambda ended: _undo(ended, if_abandoned))
        raise


def _ended(running: asyncio.Future[Any]) -> None:
    _UNCANCELLED.discard(running)
    if not running.cancelled():
        running.exception()  # retrieved: whoever gave up on it has said so already


def _undo(ended: asyncio.Future[T], undo: Callable[[T], Awaitable[object]]) -> None:
    if ended.cancelled() or ended.exception() is not None:
        return  # nothing was done
    undoing = asyncio.ensure_future(undo(ended.result()))
    _UNCANCELLED.add(undoing)
    undoing.add_done_callback(_ended)


async def close_channel(channel: AbstractChannel | aiormq.abc.AbstractChannel) -> None:
    """Close ``channel``, never cancelling the close (see ``uncancelled``); a broker error
    closing it is nothing to report."""
    if channel.is_closed:
        return
    with contextlib.suppress(*BROKER_ERRORS):
        await uncancelled(channel.close())


def raise_if_cancelled() -> None:
    """Re-raise a cancellation that a broker call turned into an error.

    aiormq may surface a cancelled RPC as a channel error, and a timeout racing a
    cancel may surface as TimeoutError; a loop catching BROKER_ERRORS calls this
    first so that it still stops when its owner cancels it.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def connect(settings: Settings, role: str) -> AbstractRobustConnection:
    """A robust connection named after the role, so operators can see it in RabbitMQ."""
    connection = await aio_pika.connect_robust(
        settings.amqp_url.get_secret_value(),
        timeout=CONNECT_TIMEOUT_S,
        client_properties={"connection_name": connection_name(role)},
        reconnect_interval=1.0,
        fail_fast=True,
    )
    log.info("connected to RabbitMQ at %s as %s", settings.amqp_url_redacted, role)
    _say_when_lost_and_back(connection, role)
    return connection


RECONNECT_NOTE = {
    "producer": "events not yet confirmed are published again from the cursor",
    "webhook": "deliveries not yet acked go back to their queues",
    "checks": "results not yet acked go back to bridge.checks",
    "stream": "clients keep their streams; the log is followed again from where it was",
}


def _say_when_lost_and_back(connection: AbstractRobustConnection, role: str) -> None:
    """One line when the connection is lost, one when it is back (bridge.logs quiets
    aio-pika's and aiormq's many records of the same)."""
    lost_at: float | None = None

    def on_close(_: object, exc: BaseException | None) -> None:
        nonlocal lost_at
        # Our own close() drops the transport first; a reconnect attempt that fails
        # while the connection is down is part of the same outage.
        if connection.transport is None or lost_at is not None:
            return
        lost_at = time.monotonic()
        log.warning(
            "%s: lost its RabbitMQ connection (%s); reconnecting; %s",
            role,
            exc if exc is not None else "closed",
            RECONNECT_NOTE.get(role, "nothing is lost"),
        )

    def on_reconnect(_: object) -> None:
        nonlocal lost_at
        if lost_at is not None:
            log.info(
                "%s: connected to RabbitMQ again after %.1fs", role, time.monotonic() - lost_at
            )
        lost_at = None

    connection.close_callbacks.add(on_close)
    connection.reconnect_callbacks.add(on_reconnect)


CHANNELS_PER_CONNECTION = 200
"""How many short-lived channels a RecycledConnection opens before it is replaced."""


class RecycledConnection:
    """A plain connection for short-lived channels, replaced after ``per_connection`` of
    them and closed once the last channel leased on it is done.

    aio-pika 10.2 with aiormq 7.2 keeps about 4.4 kB for every channel ever opened on a
    connection, until the connection closes: aiormq's ``closing`` returns a new observer
    future on each access, and aio-pika adds its close callback to one and removes it from
    another. The stream opens a channel for each read of the log by a client catching up,
    so on one long-lived connection memory grew with every read (bench/memory.py).

    Not robust: a read whose connection is lost fails, and its client resumes from its
    last id, on a new connection.
    """

    def __init__(
        self, settings: Settings, name: str, per_connection: int = CHANNELS_PER_CONNECTION
    ) -> None:
        self._settings = settings
        self._name = name
        self._per_connection = per_connection
        self._current: AbstractConnection | None = None
        self._opened = 0
        """Leases taken on ``_current``."""
        self._leases: dict[AbstractConnection, int] = {}
        self._connecting = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()

    @contextlib.asynccontextmanager
    async def lease(self) -> AsyncIterator[AbstractConnection]:
        """A connection to open one channel on for the length of the ``async with``."""
        connection = await self._take()
        try:
            yield connection
        finally:
            left = self._leases.get(connection)  # None once close() has retired it
            if left is not None:
                self._leases[connection] = left - 1
                if left == 1 and connection is not self._current:
                    self._retire(connection)

    async def _take(self) -> AbstractConnection:
        async with self._connecting:
            current = self._current
            if current is None or current.is_closed or self._opened >= self._per_connection:
                if current is not None and not self._leases.get(current):
                    self._retire(current)
                self._current = None  # still leased: closed when its last lease ends
                current = self._current = await aio_pika.connect(
                    self._settings.amqp_url.get_secret_value(),
                    timeout=CONNECT_TIMEOUT_S,
                    client_properties={"connection_name": connection_name(self._name)},
                )
                self._opened = 0
                self._leases[current] = 0
            self._opened += 1
            self._leases[current] += 1
            return current

    def _retire(self, connection: AbstractConnection) -> None:
        del self._leases[connection]
        if not connection.is_closed:
            closing = asyncio.create_task(
                _close_quietly(connection), name=f"close {self._name} connection"
            )
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """Close every connection, leased or not; leases still held then fail."""
        for connection in list(self._leases):
            self._retire(connection)
        self._current = None
        await asyncio.gather(*self._closing, return_exceptions=True)


async def _close_quietly(connection: AbstractConnection) -> None:
    with contextlib.suppress(*BROKER_ERRORS):
        async with asyncio.timeout(BROKER_TIMEOUT_S):
            await connection.close()


def is_connected(connection: AbstractRobustConnection | None) -> bool:
    """True while the connection is up; a robust connection that is reconnecting is not."""
    return connection is not None and not connection.is_closed and connection.connected.is_set()


def connection_name(role: str) -> str:
    """``patchwork-bridge <role> <host>:<pid>``: which process holds a connection, at a glance."""
    return f"patchwork-bridge {role} {socket.gethostname()}:{os.getpid()}"


class LoginRefused(Exception):
    """RabbitMQ refused the user or password of BRIDGE_AMQP_URL: retrying will not help."""


async def connect_with_retry(
    settings: Settings, role: str, stop: asyncio.Event
) -> AbstractRobustConnection | None:
    """Keep trying until the broker answers, so a process may start before RabbitMQ does.

    Returns None as soon as ``stop`` is set, even in the middle of an attempt. Raises
    LoginRefused for a refused login, which no retry mends.
    """
    delay_s = 1.0
    while not stop.is_set():
        attempt = asyncio.ensure_future(connect(settings, role))
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({attempt, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if not attempt.done():
            attempt.cancel()
            with contextlib.suppress(asyncio.CancelledError, *BROKER_ERRORS):
                await attempt
            return None
        try:
            return attempt.result()
        except ProbableAuthenticationError:
            user = urlsplit(settings.amqp_url.get_secret_value()).username or "guest"
            raise LoginRefused(
                f"RabbitMQ at {settings.amqp_url_redacted} refused the login of user {user!r}: "
                "check the user and password in BRIDGE_AMQP_URL"
            ) from None
        except (TimeoutError, OSError, aio_pika.exceptions.AMQPError) as exc:
            log.warning(
                "cannot reach RabbitMQ at %s (%s); retrying in %.0fs",
                settings.amqp_url_redacted,
                type(exc).__name__,
                delay_s,
            )
        if await sleep_unless(stop, delay_s):
            break
        delay_s = min(delay_s * 2, 30.0)
    return None


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
