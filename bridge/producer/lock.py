"""One poller among several producers: the one holding an exclusive queue on the broker.

The broker, not the bridge, decides who holds it: an exclusive queue belongs to one
connection and goes with it. That connection is a plain one (never reconnected behind
our back) with a short heartbeat, so a dead holder's lock goes within seconds; the
holder stops polling the moment it is lost. Standbys try again every few seconds.
See docs/operations.md, "Several producers".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aio_pika
from aio_pika.abc import AbstractConnection
from aiormq.exceptions import ChannelLockedResource

from bridge.broker.calls import BROKER_TIMEOUT_S
from bridge.broker.connect import CONNECT_TIMEOUT_S, connection_name
from bridge.broker.errors import BROKER_ERRORS
from bridge.settings import Settings
from bridge.waiting import sleep_unless

log = logging.getLogger(__name__)

LOCK_HEARTBEAT_S = 5
"""The lock connection's AMQP heartbeat: a holder that vanished loses it after two misses."""
RETRY_S = 3.0
"""How often a standby tries to take the lock."""


def lock_queue(exchange: str) -> str:
    return f"bridge.producer.lock.{exchange}"


class PollerLock:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._connection: AbstractConnection | None = None
        self.lost = asyncio.Event()
        """Set when the lock's connection closes: stop polling at once."""
        self.standby = False
        """Another producer holds the lock (this one found so at its last try)."""
        self.waited = False
        """A try failed before this process took the lock: another may have held it."""

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Wait until this process holds the lock (True) or ``stop`` is set (False)."""
        name = lock_queue(self._settings.exchange)
        waiting = False
        while not stop.is_set():
            connection: AbstractConnection | None = None
            try:
                connection = await aio_pika.connect(
                    self._settings.amqp_url.get_secret_value(),
                    timeout=CONNECT_TIMEOUT_S,
                    heartbeat=LOCK_HEARTBEAT_S,
                    client_properties={"connection_name": connection_name("producer-lock")},
                )
                async with asyncio.timeout(BROKER_TIMEOUT_S):
                    channel = await connection.channel()
                    await channel.declare_queue(
                        name, exclusive=True, arguments={"x-queue-type": "classic"}
                    )
            except ChannelLockedResource:
                self.standby = True
                if not waiting:
                    log.info(
                        "standby: another producer polls (it holds %s); trying every %gs",
                        name,
                        RETRY_S,
                    )
                    waiting = True
            except BROKER_ERRORS as exc:
                log.warning("cannot take the poller lock %s (%s); trying again", name, exc)
            else:
                self.standby = False
                self.lost.clear()
                connection.close_callbacks.add(lambda *_: self.lost.set())
                self._connection = connection
                log.info("holding the poller lock %s: this producer polls", name)
                return True
            self.waited = True
            if connection is not None:
                with contextlib.suppress(*BROKER_ERRORS):
                    await connection.close()
            await sleep_unless(stop, RETRY_S)
        return False

    async def release(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(*BROKER_ERRORS):
                async with asyncio.timeout(BROKER_TIMEOUT_S):
                    await connection.close()
