"""Channels and calls on them that survive aio-pika 10.2's and aiormq 7.2's edge cases:
a cancelled RPC, a closed channel, a bare RuntimeError for "closed". Each workaround
names what it works around; tests/test_broker_calls.py holds each to it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aio_pika
import aiormq.abc
from aio_pika.abc import AbstractChannel, AbstractConnection
from aiormq.exceptions import ChannelInvalidStateError

from bridge.broker.errors import BROKER_ERRORS, BrokerUnavailable

T = TypeVar("T")
BROKER_TIMEOUT_S = 10.0
"""For each declare, publish and delete: a broker that does not answer is an error, not a hang."""


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
    opened on a connection (mosquito/aio-pika#490; see RecycledConnection). The webhook
    role checks each subscription's missing marker queue every 5 s, each check closing
    its channel, for the life of the process: 57 MB a day per subscription. A bare
    channel leaves nothing, so the connection can stay robust and long-lived.
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

    aiormq (7.2) answers a cancelled RPC by closing its channel (mosquito/aiormq#56) and
    stops reading it,
    while the channel stays registered until the broker's Close-Ok. Deliveries already on
    their way to it then fill its 10-frame buffer, and the connection's reader waits on
    that buffer for good: every channel of the connection stops (bench/memory.py, 50 stream
    clients: the hub's channel held 1,000 unacked messages for minutes). A cancelled
    Channel.Close is worse: aiormq sends a second one, which the broker takes as a
    connection error ("CHANNEL_ERROR - expected 'channel.open'"). So Basic.Consume and
    Channel.Close, after which deliveries may be in flight, go through here.

    When the connection dies during the call, aiormq cancels it: that is raised as
    BrokerUnavailable, like any other loss of the broker (a cancel of the caller stays a
    cancel). Not ``asyncio.wait_for``: on Python 3.11 it swallows a cancel that arrives as the call
    ends, returning the result instead (python/cpython#86296, fixed in 3.12). A stream
    client dropped as slow at that moment went on waiting for the hub's events for good
    (bench/memory.py), so no code here waits with it.
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
        task = asyncio.current_task()
        if running.cancelled() and not (task is not None and task.cancelling()):
            # aiormq cancels the calls in flight when their connection dies: that is the
            # broker gone, for the caller to retry, not a cancel of the caller.
            raise BrokerUnavailable("the connection closed during the call") from None
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
