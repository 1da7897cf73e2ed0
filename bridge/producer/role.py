"""The producer role: one poller among several producers, its connection, its event log.

Before connecting it checks its state directory; once connected it declares the exchange
and the event log, and waits for the poller lock (``bridge.producer.lock``). While it holds
the lock it polls (``bridge.producer.poller``) from where the bus left off: its cursor file
or the event log's tail, whichever is further. When the lock is lost it stops at once and
stands by again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from aio_pika.abc import AbstractConnection, AbstractRobustConnection

from bridge.broker.calls import close_channel, raise_if_cancelled
from bridge.broker.connect import connect_with_retry, is_connected
from bridge.broker.errors import BROKER_TROUBLE
from bridge.broker.nodes import node_of
from bridge.broker.topology import declare_exchange
from bridge.eventlog import declare_log, log_exists
from bridge.metrics import Metrics
from bridge.producer.cursor import Cursor, CursorStore, probe_writable
from bridge.producer.lock import poller_lock
from bridge.producer.logtail import cursor_from_log
from bridge.producer.patchwork import PatchworkClient
from bridge.producer.poller import Poller, Stopped, until_stopped
from bridge.producer.publisher import Publisher
from bridge.producer.triage import EventCheck, PageSorter
from bridge.settings import Settings
from bridge.wakeup.listener import Listener

log = logging.getLogger(__name__)

REDECLARE_S = 5.0
"""How often the exchange and the log are declared again after a reconnect, until it works."""


class Producer:
    name = "producer"

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        *,
        check_event: EventCheck | None = None,
        prepare: Callable[[AbstractConnection], Awaitable[None]] | None = None,
    ) -> None:
        """``prepare`` runs once on the connection before the first poll (queues that must
        exist before anything is published)."""
        self._settings = settings
        self._metrics = metrics
        self._source = settings.api_base  # raises SettingsError early if the URL is missing
        self._prepare = prepare
        self._store = CursorStore(settings.state_dir)
        metrics.producer_started(wakeup=settings.patchwork_db is not None)
        self._listener = (
            Listener(settings.patchwork_db.get_secret_value(), metrics)
            if settings.patchwork_db is not None
            else None
        )
        self._poller = Poller(
            settings,
            metrics,
            PageSorter(settings, metrics, check_event),
            self._store,
            listener=self._listener,
        )
        self._connection: AbstractRobustConnection | None = None
        self._lock = poller_lock(settings)
        self._log_was_new = False
        """This producer declared the event log: nothing was published to it before."""
        self._redeclaring: asyncio.Task[None] | None = None

    # -- Role ---------------------------------------------------------------------------------

    def connected(self) -> bool:
        return is_connected(self._connection)

    def node(self) -> str | None:
        return node_of(self._connection)

    def readiness(self) -> tuple[bool, str]:
        if not self.connected():
            return False, "producer not connected to RabbitMQ"
        if self._lock.standby:
            return True, ""  # a standby is healthy: it takes over when the poller goes
        if self._poller.cursor_failure is not None:
            return False, f"producer cannot save its cursor ({self._poller.cursor_failure})"
        # Three missed polls, each allowed its full request timeout.
        stale_s = 3 * self._settings.poll_interval + self._settings.patchwork_timeout
        last = self._poller.last_success
        if last is None or time.monotonic() - last > stale_s:
            return False, "producer has no recent successful poll"
        return True, ""

    async def run(self, stop: asyncio.Event) -> None:
        # Before connecting: an unusable state directory or an unreadable cursor is the
        # operator's to mend, at once (not when this producer's turn to poll comes).
        await asyncio.to_thread(probe_writable, self._settings.state_dir)
        await self._store.load()
        self._connection = await connect_with_retry(self._settings, "producer", stop)
        if self._connection is None:
            return  # stopped before RabbitMQ answered
        try:
            exists = await log_exists(self._connection, self._settings.exchange)
            self._log_was_new = not exists
            await self._declare_topology()
            self._connection.reconnect_callbacks.add(self._declare_again)
            channel = await self._connection.channel(publisher_confirms=True)
            # Not declared through this robust channel, so a reconnect declares nothing
            # again: on a cluster, declaring the log waits for its leader, and with it
            # every publish, for as long as RabbitMQ takes to call a hung node down.
            exchange = await channel.get_exchange(self._settings.exchange, ensure=False)
            if self._prepare is not None:
                await self._prepare(self._connection)
            publisher = Publisher(
                exchange,
                self._source,
                self._settings.tz,
                self._metrics,
                self._settings.publish_in_flight,
            )
            async with PatchworkClient(
                self._settings, self._metrics.patchwork_request_duration
            ) as client:
                while await self._lock.acquire(stop):
                    await self._poll_while_holding(client, publisher, stop)
        finally:
            if self._redeclaring is not None:
                self._redeclaring.cancel()
                await asyncio.gather(self._redeclaring, return_exceptions=True)
            await self._lock.release()
            await self._connection.close()

    async def _declare_topology(self) -> None:
        """The exchange and the event log, once, on a channel of their own."""
        assert self._connection is not None
        channel = await self._connection.channel()
        try:
            await declare_exchange(channel, self._settings.exchange)
            await declare_log(channel, self._settings)
        finally:
            await close_channel(channel)

    def _declare_again(self, *_: object) -> None:
        """After a reconnect, beside the publishes, never before them: a broker that came
        back without its data (no volume) gets the exchange and the log again."""
        if self._redeclaring is None or self._redeclaring.done():
            self._redeclaring = asyncio.create_task(self._declare_until_done())

    async def _declare_until_done(self) -> None:
        while True:
            try:
                await self._declare_topology()
                return
            except BROKER_TROUBLE as exc:
                raise_if_cancelled()
                log.warning("cannot declare the exchange and the event log (%s); again in "
                            "%gs", exc or type(exc).__name__, REDECLARE_S)  # fmt: skip
                await asyncio.sleep(REDECLARE_S)

    async def _poll_while_holding(
        self, client: PatchworkClient, publisher: Publisher, stop: asyncio.Event
    ) -> None:
        """Poll until stopped or the lock is lost; then stand by again, window forgotten:
        whoever polls next starts from the event log."""
        polling = asyncio.Event()
        watcher = asyncio.create_task(self._stand_down_when_lost(polling, stop))
        listening = (
            asyncio.create_task(self._listener.run(polling), name="producer-wakeup")
            if self._listener is not None
            else None
        )
        try:
            await self._store.lock()
            self._metrics.producer_active.set(1)
            try:
                resume_from = await self._resume_point(polling)
            except Stopped:
                return
            await self._poller.run(client, publisher, resume_from, polling)
        finally:
            if listening is not None:
                listening.cancel()
                await asyncio.gather(listening, return_exceptions=True)
            self._metrics.producer_active.set(0)
            self._store.unlock()
            if not self._lock.lost.is_set():
                watcher.cancel()  # else it is handing the lock on: let it finish
            await asyncio.gather(watcher, return_exceptions=True)

    async def _stand_down_when_lost(self, polling: asyncio.Event, stop: asyncio.Event) -> None:
        """Tell the poller to stop when told to or when the lock is lost; in the latter
        case let go of the lock at once, so that a standby need not wait for a publish
        in flight here to finish or time out."""
        await _set_on_first(polling, stop, self._lock.lost)
        if self._lock.lost.is_set() and not stop.is_set():
            log.warning(
                "lost the poller lock: stopped polling; another producer may poll now, "
                "this one stands by"
            )
            await self._lock.release()

    async def _resume_point(self, polling: asyncio.Event) -> Cursor | None:
        """The cursor file or the log's tail, whichever is further (None: neither, and
        BRIDGE_START decides); raises Stopped when told to stop meanwhile."""
        saved = await self._store.load()
        assert self._connection is not None
        if self._log_was_new and not self._lock.waited:
            # Only a lock holder publishes, and none could hold it before this one: an
            # empty log, known without waiting for a read to find nothing.
            log.info("the event log is new: nothing published before this producer")
            log_tail = None
        else:
            log_tail = await until_stopped(
                cursor_from_log(self._connection, self._settings), polling
            )
        self._log_was_new = False
        return _newer(saved, log_tail)


def _newer(saved: Cursor | None, log_tail: Cursor | None) -> Cursor | None:
    """The cursor file when it is at least as far as the log (it also knows the open
    gaps); else the log's tail: a lost state directory, or a takeover from another host."""
    if log_tail is None:
        return saved
    if saved is not None and (saved.max_id or 0) >= (log_tail.max_id or 0):
        return saved
    log.info(
        "starting from the event log's tail (newest id %s)%s",
        log_tail.max_id,
        "" if saved is None else f", ahead of the cursor file (newest id {saved.max_id})",
    )
    return log_tail


async def _set_on_first(target: asyncio.Event, *events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        target.set()
    finally:
        for wait in waits:
            wait.cancel()
