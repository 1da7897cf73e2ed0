"""The one live reader of the event log, shared by every client of the stream.

Each client's own read of the log lasts only while it catches up; from the log's tail
on, the hub hands it each event it may see. A client that falls ``limit`` events behind
is told so (``overflow``) and dropped: memory per client stays bounded, and it resumes
from its last id.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from aiormq.exceptions import ChannelNotFoundEntity

from bridge.broker.calls import (
    BROKER_TIMEOUT_S,
    close_channel,
    open_channel,
    raise_if_cancelled,
    uncancelled,
)
from bridge.broker.connect import is_connected
from bridge.broker.errors import BROKER_TROUBLE
from bridge.eventlog import READ_PREFETCH, LogMissing, is_marker, log_queue, offset_of
from bridge.stream.positions import Position, position_of
from bridge.waiting import sleep_unless

log = logging.getLogger(__name__)

RETRY_S = 3.0
"""How often the hub looks again for a log that is missing or a broker that is back."""


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One event of the log as the stream sends it."""

    offset: int
    position: Position
    routing_key: str
    frame: bytes
    """The event as an SSE block (id, category, Patchwork's JSON on one line), rendered
    once for every client it goes to."""


def entry_of(message: AbstractIncomingMessage, offset: int) -> LogEntry | None:
    """The log message at ``offset`` as the stream sends it; None for a message that is not
    an event (the log's own markers, a message published to the exchange by hand)."""
    if is_marker(message):
        return None
    try:
        data = message.body.decode()
        if "\n" in data or "\r" in data:  # SSE data lines: the contract says one line
            data = json.dumps(json.loads(data), separators=(",", ":"), ensure_ascii=False)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    key = message.routing_key or ""
    category = key.rpartition(".")[2]
    if any(c in category for c in "\r\n\0"):
        return None
    position = position_of(offset, message.message_id)
    frame = f"id: {position}\r\nevent: {category}\r\ndata: {data}\r\n\r\n".encode()
    return LogEntry(offset, position, key, frame)


class Subscriber:
    """A client's place at the hub: the events it may see, ``limit`` at most waiting."""

    def __init__(self, wanted: Callable[[str], bool], limit: int) -> None:
        self.wanted = wanted
        self.entries: asyncio.Queue[LogEntry] = asyncio.Queue(limit)
        self.seam: int | None = None
        """The last offset the client must read from the log itself; all after it come here."""
        self.overflowed = asyncio.Event()

    def offer(self, entry: LogEntry) -> None:
        if self.overflowed.is_set():
            return
        try:
            self.entries.put_nowait(entry)
        except asyncio.QueueFull:
            self.overflowed.set()


class Hub:
    def __init__(self, connection: AbstractRobustConnection, exchange: str) -> None:
        self._connection = connection
        self._exchange = exchange
        self._subscribers: set[Subscriber] = set()
        self.tail: int | None = None
        """The newest offset the hub has handed out; None before its first event."""
        self.tail_published: datetime | None = None
        """When the message at ``tail`` was published (its AMQP timestamp), if it says."""
        self.attached = False

    def holds(self, offset: int) -> bool:
        """Whether the log is known to hold ``offset``: the hub has handed it out."""
        return self.tail is not None and offset <= self.tail

    def holds_published_since(self, when: datetime) -> bool:
        """Whether the log is known to hold a message published at or after ``when``."""
        return self.tail_published is not None and self.tail_published >= when

    def subscribe(self, subscriber: Subscriber) -> None:
        # No await between reading the tail and joining: every later event reaches it.
        subscriber.seam = self.tail
        self._subscribers.add(subscriber)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.discard(subscriber)

    async def run(self, stop: asyncio.Event) -> None:
        """Follow the log until stop, from where it left off after a broker outage."""
        said_missing = False
        while not stop.is_set():
            try:
                await self._follow(stop)
            except LogMissing:
                if not said_missing:
                    log.warning(
                        "stream: no event log %s yet; waiting for a producer to declare it",
                        log_queue(self._exchange),
                    )
                    said_missing = True
            except BROKER_TROUBLE as exc:
                raise_if_cancelled()
                if is_connected(self._connection):
                    log.warning("stream: reading the event log failed (%s); again", exc)
            finally:
                self.attached = False
            await sleep_unless(stop, RETRY_S)

    async def _follow(self, stop: asyncio.Event) -> None:
        channel = await open_channel(self._connection)
        lost = asyncio.Event()
        channel.close_callbacks.add(lambda *_: lost.set())
        try:
            await channel.set_qos(prefetch_count=READ_PREFETCH, timeout=BROKER_TIMEOUT_S)
            try:
                queue = await channel.declare_queue(
                    log_queue(self._exchange), passive=True, timeout=BROKER_TIMEOUT_S
                )
            except ChannelNotFoundEntity:
                raise LogMissing(f"no event log {log_queue(self._exchange)!r} yet") from None
            start: int | str = "next" if self.tail is None else self.tail + 1
            await uncancelled(queue.consume(self._arrived, arguments={"x-stream-offset": start}))
            self.attached = True
            log.info("stream: following the event log from %s", start)
            stopped = asyncio.ensure_future(stop.wait())
            gone = asyncio.ensure_future(lost.wait())
            try:
                await asyncio.wait({stopped, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopped.cancel()
                gone.cancel()
            if lost.is_set() and not stop.is_set():
                log.warning("stream: the event log's channel closed; following it again")
        finally:
            await close_channel(channel)

    async def _arrived(self, message: AbstractIncomingMessage) -> None:
        # Nothing awaited before the fan-out: messages are handed out in the log's order.
        offset = offset_of(message)
        if self.tail is None or offset > self.tail:
            entry = entry_of(message, offset)
            for subscriber in self._subscribers:
                if subscriber.seam is None:
                    subscriber.seam = offset - 1
                if entry is not None and subscriber.wanted(entry.routing_key):
                    subscriber.offer(entry)
            self.tail = offset
            self.tail_published = _aware(message.timestamp)
        assert message.delivery_tag is not None
        # Acks only move a stream's prefetch window.
        await message.channel.basic_ack(message.delivery_tag, wait=False)


def _aware(when: datetime | None) -> datetime | None:
    """AMQP timestamps are UTC; the client library may hand them over naive."""
    return when.replace(tzinfo=UTC) if when is not None and when.tzinfo is None else when
