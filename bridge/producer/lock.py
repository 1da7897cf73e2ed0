"""One poller among several producers: the holder of a lock the broker keeps.

The broker, not the bridge, decides who holds it, and the lock goes with the holder's
connection. That connection is a plain one (never reconnected behind our back) with a
short heartbeat, so a dead holder's lock goes within seconds; the holder stops polling
the moment it is lost. See docs/operations.md, "Several producers".

Two locks, by BRIDGE_QUEUE_TYPE:

- ``classic`` (one node): an exclusive queue, ``bridge.producer.lock.<exchange>``. Standbys
  try to declare it every few seconds.
- ``quorum`` (a cluster): an exclusive queue lives on one node, and when that node dies
  RabbitMQ keeps it until the node is back (seen on 4.3: two minutes without a poller).
  So the lock is a replicated quorum queue, ``<exchange>.producer.lock``, with a single
  active consumer: every producer consumes it and publishes a probe to it now and then;
  the broker delivers to one consumer only, and hands that role to the next the moment
  the active one's channel goes, or (its node gone) after ``x-consumer-disconnected-timeout``.
  The producer whose consumer gets probes holds the lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from aiormq.exceptions import ChannelLockedResource

from bridge.broker.calls import BROKER_TIMEOUT_S, raise_if_cancelled
from bridge.broker.connect import connect_plain
from bridge.broker.errors import BROKER_ERRORS, BROKER_TROUBLE
from bridge.settings import Settings
from bridge.waiting import sleep_unless

log = logging.getLogger(__name__)

LOCK_HEARTBEAT_S = 5
"""The lock connection's AMQP heartbeat: a holder that vanished loses it after two misses."""
RETRY_S = 3.0
"""How often a standby tries to take the lock."""


PROBE_S = 1.0
"""How often every producer publishes a probe to the quorum lock: a producer handed the
lock learns it within this long."""
PASSED_OVER_S = 5 * PROBE_S
"""A holder that got no probe for this long (its own included) no longer holds the lock."""


def lock_queue(exchange: str) -> str:
    return f"bridge.producer.lock.{exchange}"


def quorum_lock_queue(exchange: str) -> str:
    return f"{exchange}.producer.lock"


def poller_lock(settings: Settings) -> PollerLock | QuorumLock:
    """The lock of the deployment's kind: see the module's note."""
    return QuorumLock(settings) if settings.queue_type == "quorum" else PollerLock(settings)


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
                connection = await connect_plain(
                    self._settings, "producer-lock", heartbeat_s=LOCK_HEARTBEAT_S
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


class QuorumLock:
    """The lock on a cluster: the single active consumer of a quorum queue (module note)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._connection: AbstractConnection | None = None
        self._prober: asyncio.Task[None] | None = None
        self._last_probe = 0.0
        self.lost = asyncio.Event()
        """Set when the lock's connection closes: stop polling at once."""
        self.standby = False
        """Another producer's consumer is the active one (none of our probes came back)."""
        self.waited = False
        """Not handed the lock on the first probe: another may have held it."""

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Wait until this process holds the lock (True) or ``stop`` is set (False)."""
        name = quorum_lock_queue(self._settings.exchange)
        said_standby = False
        while not stop.is_set():
            active = asyncio.Event()
            try:
                await self._join(name, active)
            except BROKER_TROUBLE as exc:
                raise_if_cancelled()
                log.warning("cannot join the poller lock %s (%s); trying again", name, exc)
                await self.release()
                self.waited = True
                await sleep_unless(stop, RETRY_S)
                continue
            waits = [asyncio.ensure_future(e.wait()) for e in (active, stop, self.lost)]
            try:
                while not (await asyncio.wait(waits, timeout=PROBE_S * 1.5))[0]:
                    self.standby = self.waited = True
                    if not said_standby:
                        log.info("standby: another producer polls (%s's active consumer)", name)
                        said_standby = True
            finally:
                for wait in waits:
                    wait.cancel()
            if active.is_set():
                self.standby = False
                log.info("holding the poller lock %s: this producer polls", name)
                return True
            await self.release()  # stopped, or the connection went: join again
        return False

    async def _join(self, name: str, active: asyncio.Event) -> None:
        self.lost.clear()
        connection = self._connection = await connect_plain(
            self._settings, "producer-lock", heartbeat_s=LOCK_HEARTBEAT_S
        )
        connection.close_callbacks.add(lambda *_: self.lost.set())
        async with asyncio.timeout(BROKER_TIMEOUT_S):
            channel = await connection.channel()
            queue = await channel.declare_queue(
                name,
                durable=True,
                arguments={
                    "x-queue-type": "quorum",
                    "x-single-active-consumer": True,
                    # A holder whose node died keeps the lock this long (RabbitMQ's
                    # default: 60 s without a poller), as long as a holder cut off waits
                    # before it stops (PASSED_OVER_S).
                    "x-consumer-disconnected-timeout": int(PASSED_OVER_S * 1000),
                    # Probes nobody took yet (between two active consumers): a few at most.
                    "x-max-length": 10,
                    "x-overflow": "drop-head",
                },
            )

            async def probed(message: AbstractIncomingMessage) -> None:
                await message.ack()
                self._last_probe = asyncio.get_running_loop().time()
                active.set()

            await queue.consume(probed)
        self._prober = asyncio.create_task(self._probe(channel, name, active), name="lock probes")

    async def _probe(self, channel: AbstractChannel, name: str, active: asyncio.Event) -> None:
        """A probe now and then, whoever holds the lock: the active consumer gets them all.

        A holder whose probes stop coming back was passed over (the broker chose another
        consumer while this connection lived on): it counts the lock as lost.
        """
        loop = asyncio.get_running_loop()
        while not self.lost.is_set():
            try:
                await channel.default_exchange.publish(
                    aio_pika.Message(b"", expiration=60), routing_key=name, timeout=PASSED_OVER_S
                )
            except BROKER_TROUBLE as exc:
                raise_if_cancelled()
                log.warning("cannot probe the poller lock %s (%r): counted as lost", name, exc)
                self.lost.set()
                return
            if active.is_set() and loop.time() - self._last_probe > PASSED_OVER_S:
                log.warning(
                    "no probe of %s for %gs: passed over, polling stops", name, PASSED_OVER_S
                )
                self.lost.set()
            await sleep_unless(self.lost, PROBE_S)

    async def release(self) -> None:
        prober, self._prober = self._prober, None
        if prober is not None:
            prober.cancel()
            await asyncio.gather(prober, return_exceptions=True)
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(*BROKER_ERRORS):
                async with asyncio.timeout(BROKER_TIMEOUT_S):
                    await connection.close()
