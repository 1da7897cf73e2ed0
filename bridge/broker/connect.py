"""Connections to RabbitMQ: robust ones named after the role, one line when lost and one
when back, a retry until the broker answers, and recycled ones for short-lived channels.

Robust connections reconnect by themselves and re-declare what was declared on them.
Code that must know about a lost connection (the producer's in-flight publishes) sees
the publish fail and retries from its cursor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractRobustConnection

from bridge.broker.calls import BROKER_TIMEOUT_S
from bridge.broker.errors import BROKER_ERRORS
from bridge.broker.nodes import (
    HEARTBEAT_S,
    UNREACHABLE,
    first_answering,
    follow_nodes,
    node_of,
    url_of,
    with_heartbeat,
)
from bridge.settings import Settings, redact_url
from bridge.waiting import sleep_unless

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0


def node_urls(settings: Settings) -> list[str]:
    """BRIDGE_AMQP_URL's nodes, each with the bridge's heartbeat unless it names one."""
    return [with_heartbeat(url) for url in settings.amqp_urls]


async def connect(settings: Settings, role: str) -> AbstractRobustConnection:
    """A robust connection named after the role, so operators can see it in RabbitMQ, to the
    first node that answers; it moves to another node when its own goes (``bridge.broker
    .nodes``). Raises BrokerRefused for a refused login or vhost."""
    urls = node_urls(settings)

    async def attempt(url: str) -> AbstractRobustConnection:
        return await aio_pika.connect_robust(
            url,
            timeout=CONNECT_TIMEOUT_S,
            client_properties={"connection_name": connection_name(role)},
            reconnect_interval=1.0,
            fail_fast=True,
        )

    connection = await first_answering(urls, attempt)
    log.info(
        "connected to RabbitMQ at %s as %s", redact_url(url_of(connection).split("?")[0]), role
    )
    _say_when_lost_and_back(connection, role)
    follow_nodes(connection, urls, role)
    return connection


async def connect_plain(
    settings: Settings, name: str, *, heartbeat_s: int | None = None
) -> AbstractConnection:
    """A plain connection (never reconnected behind our back) to the first node that
    answers. Raises BrokerRefused, or the last node's error."""
    urls = settings.amqp_urls

    async def attempt(url: str) -> AbstractConnection:
        return await aio_pika.connect(
            with_heartbeat(url, heartbeat_s or HEARTBEAT_S),
            timeout=CONNECT_TIMEOUT_S,
            client_properties={"connection_name": connection_name(name)},
        )

    return await first_answering(urls, attempt)


RECONNECT_NOTE = {
    "producer": "events not yet confirmed are published again from the cursor",
    "webhook": "deliveries not yet acked go back to their queues",
    "checks": "results not yet acked go back to their queue",
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
                "%s: connected to RabbitMQ again after %.1fs, on node %s",
                role,
                time.monotonic() - lost_at,
                node_of(connection),
            )
        lost_at = None

    connection.close_callbacks.add(on_close)
    connection.reconnect_callbacks.add(on_reconnect)


CHANNELS_PER_CONNECTION = 200
"""How many short-lived channels a RecycledConnection opens before it is replaced."""
SHORT_LIVED_HEARTBEAT_S = 10
"""The heartbeat of a RecycledConnection, not the 2 s of the others: aiormq (7.2) gives a
Channel.Close the heartbeat to be answered, then sends a second one, which the broker
answers by closing the connection and every channel on it. Short-lived channels are
closed all the time, and a broker busy for 2 s (200 stream clients resuming at once,
bench/stream.py --resume) then ended every client's read at once. A hung node is left
after 33 s instead of 9; the reads on it end by their own waits before that."""


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
        self,
        settings: Settings,
        name: str,
        per_connection: int = CHANNELS_PER_CONNECTION,
        *,
        heartbeat_s: int = SHORT_LIVED_HEARTBEAT_S,
    ) -> None:
        self._settings = settings
        self._name = name
        self._per_connection = per_connection
        self._heartbeat_s = heartbeat_s
        self._current: AbstractConnection | None = None
        self._opened = 0
        """Leases taken on ``_current``."""
        self._leases: dict[AbstractConnection, int] = {}
        self._connecting = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()

    @contextlib.asynccontextmanager
    async def lease(self) -> AsyncIterator[AbstractConnection]:
        """A connection to open one channel on for the length of the ``async with``."""
        async with self._leased() as connection:
            yield connection

    @contextlib.asynccontextmanager
    async def _leased(self) -> AsyncIterator[AbstractConnection]:
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
                current = self._current = await connect_plain(
                    self._settings, self._name, heartbeat_s=self._heartbeat_s
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


async def connect_with_retry(
    settings: Settings, role: str, stop: asyncio.Event
) -> AbstractRobustConnection | None:
    """Keep trying until the broker answers, so a process may start before RabbitMQ does.

    Returns None as soon as ``stop`` is set, even in the middle of an attempt. Raises
    BrokerRefused for a refused login or vhost, which no retry mends.
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
        except UNREACHABLE as exc:
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
