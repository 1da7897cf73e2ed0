"""The event log: a stream queue bound ``#`` that keeps every published event for a while.

It is the bus's memory: a producer without a cursor file rebuilds its window from the
log's tail, ``patchwork-bridge replay`` copies events from it into one queue, and a
consumer joining late reads it. Messages keep their ``message_id`` and headers. A
stream has no "end": a read ends when the broker has sent nothing for a moment, which
only ever makes it shorter, never skips a message inside it.
See docs/operations.md, "The event log".
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncGenerator
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from aiormq.exceptions import ChannelNotFoundEntity

from bridge.broker.calls import BROKER_TIMEOUT_S, close_channel, open_channel, uncancelled
from bridge.events import BadEvent, Event, parse_event
from bridge.settings import Settings

READ_PREFETCH = 1000
"""Stream reads must set a prefetch; a large one lets the broker send whole chunks."""
SINCE_SKEW = timedelta(seconds=60)
"""Read this much before a ``since`` in publish time: clocks of Patchwork and the broker
differ a little, and each event is kept or not by its own date anyway."""
IDLE_END_S = 0.5
"""A read is at the log's end once nothing has come for this long."""
FIRST_WAIT_S = 3.0
"""Before the first message, wait longer: "nothing" means an empty log, which makes a
producer fall back to BRIDGE_START, so a slow broker must not look like one."""

Offset = int | str | datetime
"""Where a read starts: an offset, "first", "last" (the last chunk), or a publish time
(the broker starts at a chunk at or before it: filter by each message's timestamp)."""


MARKER = "x-bridge-marker"
"""Header of the log's own records, which are not events: every reader skips them."""
START = "start"
"""A producer's first start (BRIDGE_START applied): its cursor, so that "now" holds for a
producer that later rebuilds its window from the log (no state directory, a takeover)."""


class LogMissing(Exception):
    """The exchange has no event log yet (no producer of this version has started)."""


def log_queue(exchange: str) -> str:
    return f"{exchange}.log"


def log_arguments(settings: Settings) -> dict[str, Any]:
    arguments: dict[str, Any] = {
        "x-queue-type": "stream",
        "x-max-age": settings.log_max_age,
        "x-max-length-bytes": settings.log_max_bytes,
    }
    if settings.log_replicas is not None:
        # Compared on every declare: a log declared without it refuses it (and the reverse).
        arguments["x-initial-cluster-size"] = settings.log_replicas
    return arguments


async def log_exists(connection: AbstractConnection, exchange: str) -> bool:
    """Whether the log was declared before. One that was not never got a message, which a
    read can only tell by waiting (see FIRST_WAIT_S)."""
    channel = await connection.channel()  # a failed passive declare closes its channel
    try:
        async with asyncio.timeout(BROKER_TIMEOUT_S):
            await channel.declare_queue(log_queue(exchange), passive=True)
        return True
    except ChannelNotFoundEntity:
        return False
    finally:
        await close_channel(channel)


async def declare_log(channel: AbstractChannel, settings: Settings) -> None:
    """Before the producer's first publish, so nothing it publishes is missing from it."""
    async with asyncio.timeout(BROKER_TIMEOUT_S):
        queue = await channel.declare_queue(
            log_queue(settings.exchange), durable=True, arguments=log_arguments(settings)
        )
        await queue.bind(settings.exchange, "#")


async def read_log(
    connection: AbstractConnection,
    exchange: str,
    start: Offset,
    *,
    idle_end_s: float = IDLE_END_S,
    first_wait_s: float = FIRST_WAIT_S,
    prefetch: int = READ_PREFETCH,
) -> AsyncGenerator[AbstractIncomingMessage]:
    """The log's messages from ``start`` to its end (see the module's note), in order.

    Raises LogMissing if there is no log. Its own channel, closed when the read ends.
    """
    read = read_stream(
        connection,
        log_queue(exchange),
        start,
        idle_end_s=idle_end_s,
        first_wait_s=first_wait_s,
        prefetch=prefetch,
    )
    try:
        async for message in read:
            yield message
    except LogMissing:
        raise LogMissing(f"no event log {log_queue(exchange)!r} yet") from None


async def read_stream(
    connection: AbstractConnection,
    queue_name: str,
    start: Offset,
    *,
    idle_end_s: float = IDLE_END_S,
    first_wait_s: float = FIRST_WAIT_S,
    prefetch: int = READ_PREFETCH,
) -> AsyncGenerator[AbstractIncomingMessage]:
    """Any stream queue's messages from ``start`` to its end, as ``read_log`` reads the log;
    LogMissing if the queue does not exist."""
    channel = await open_channel(connection)
    try:
        await channel.set_qos(prefetch_count=prefetch, timeout=BROKER_TIMEOUT_S)
        try:
            queue = await channel.declare_queue(queue_name, passive=True, timeout=BROKER_TIMEOUT_S)
        except ChannelNotFoundEntity:
            raise LogMissing(f"no stream {queue_name!r} yet") from None
        inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

        async def arrived(message: AbstractIncomingMessage) -> None:
            await inbox.put(message)

        await uncancelled(queue.consume(arrived, arguments={"x-stream-offset": start}))
        wait_s = max(first_wait_s, idle_end_s)
        while True:
            try:
                async with asyncio.timeout(
                    wait_s
                ):  # not wait_for: see bridge.broker.calls.uncancelled
                    message = await inbox.get()
            except TimeoutError:
                break
            wait_s = idle_end_s
            yield message
            # Acks only move the prefetch window of a stream; nothing is removed.
            assert message.delivery_tag is not None
            await message.channel.basic_ack(message.delivery_tag, wait=False)
    finally:  # closing the channel ends the consumer: no Basic.Cancel to time out
        await close_channel(channel)


def offset_of(message: AbstractIncomingMessage) -> int:
    """A log message's offset, which the broker puts in its headers."""
    offset = (message.headers or {}).get("x-stream-offset")
    if not isinstance(offset, int):
        raise ValueError("a stream message without an x-stream-offset header")
    return offset


def is_marker(message: AbstractIncomingMessage) -> bool:
    return MARKER in (message.headers or {})


def start_marker(cursor_json: str) -> aio_pika.Message:
    """The record of a first start, published straight into the log (not to the exchange:
    no consumer is bound to see it)."""
    return aio_pika.Message(
        cursor_json.encode(),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=f"start-{uuid.uuid4().hex}",
        type="bridge-start",
        timestamp=datetime.now(UTC),
        headers={MARKER: START},
    )


def logged_start(message: AbstractIncomingMessage) -> str | None:
    """The cursor (as JSON) a start marker records; None for any other message."""
    if (message.headers or {}).get(MARKER) not in (START, START.encode()):
        return None
    return message.body.decode("utf-8", "replace")


def logged_event(message: AbstractIncomingMessage) -> Event | None:
    """The event a log message carries, as the producer read it from Patchwork; None for
    anything else in the log (its markers, what was published there by hand or by a test)."""
    if is_marker(message):
        return None
    try:
        item = json.loads(message.body)
        return parse_event(item, message.body.decode())
    except (BadEvent, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
