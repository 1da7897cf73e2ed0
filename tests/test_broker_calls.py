"""What bridge.broker.calls works around, held to it: each test shows the client libraries'
behaviour that a workaround exists for. When one starts to fail after an upgrade of aio-pika
or aiormq, the behaviour is gone, and so can the workaround be (pyproject pins the
versions these were seen with)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys

import aio_pika
import pytest
from aiormq.exceptions import ChannelInvalidStateError

from bridge.broker.calls import close_channel, open_bare_channel, uncancelled
from bridge.broker.errors import BrokerUnavailable
from bridge.broker.nodes import with_heartbeat
from tests.broker import AMQP_URL
from tests.node_proxy import NodeProxy

pytestmark = pytest.mark.broker


async def test_aio_pika_keeps_a_callback_for_every_channel_a_connection_opened(unique):
    """mosquito/aio-pika#490: each aio-pika channel leaves its close callback on the
    connection's ``closing`` observer until the connection closes. Why the marker checks
    use bare aiormq channels (``open_bare_channel``) and the stream's reads a
    ``RecycledConnection``."""
    connection = await aio_pika.connect(AMQP_URL, timeout=10)
    try:
        underlay = connection.transport.connection  # type: ignore[union-attr]

        def kept() -> int:
            """Observers hooked to the connection's own closing future."""
            return len(underlay._closing._callbacks)

        before = kept()
        for _ in range(20):
            channel = await connection.channel()
            await channel.close()
        aio_pika_kept = kept() - before
        for _ in range(20):
            bare = await open_bare_channel(connection)
            await close_channel(bare)
        bare_kept = kept() - before - aio_pika_kept
    finally:
        await connection.close()
    assert aio_pika_kept >= 20, "aio-pika no longer keeps one: open_bare_channel may go"
    assert bare_kept == 0


async def test_aiormq_closes_the_channel_of_a_cancelled_rpc():
    """mosquito/aiormq#56: an RPC cancelled while it waits for its answer closes its
    channel. Why Basic.Consume and Channel.Close go through ``uncancelled``: the close it
    starts, cancelled in turn, sends a second Channel.Close, which the broker answers by
    closing the whole connection. Cancels land at several moments; through ``uncancelled``
    the channel stays usable at every one."""
    connection = await aio_pika.connect(AMQP_URL, timeout=10)
    closed = kept = 0
    try:
        for delay_s in [0, 0.0005, 0.001, 0.002, 0.005] * 4:
            for guarded in (False, True):
                channel = await connection.channel()
                underlay = await channel.get_underlay_channel()
                declare = underlay.queue_declare("", exclusive=True, auto_delete=True)
                rpc = asyncio.ensure_future(uncancelled(declare) if guarded else declare)
                await asyncio.sleep(delay_s)
                rpc.cancel()
                await asyncio.gather(rpc, return_exceptions=True)
                try:
                    await underlay.queue_declare("", exclusive=True, auto_delete=True)
                    kept += guarded
                except ChannelInvalidStateError:
                    closed += not guarded
                await close_channel(channel)
    finally:
        await connection.close()
    assert closed > 0, "aiormq no longer closes the channel: uncancelled may go"
    assert kept == 20


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="fixed in Python 3.12")
async def test_wait_for_on_python_3_11_swallows_a_cancel_that_arrives_as_the_call_ends():
    """python/cpython#86296: ``asyncio.wait_for`` returns the result instead of raising
    when the cancel and the result come together. Why no wait here uses it (a stream client
    dropped as slow at that moment waited for the hub's events for good)."""

    async def answer() -> str:
        return "done"

    swallowed = 0
    for _ in range(200):
        inner = asyncio.ensure_future(answer())
        waiting = asyncio.ensure_future(asyncio.wait_for(inner, 10))
        await asyncio.sleep(0)  # inner is done now; wait_for not woken yet
        waiting.cancel()
        try:
            await waiting
            swallowed += 1
        except asyncio.CancelledError:
            pass
    assert swallowed > 0, "wait_for no longer swallows the cancel"


async def test_a_closed_connection_says_so_with_a_bare_runtime_error():
    """aiormq says "closed" with a bare RuntimeError; ``open_channel`` and
    ``open_bare_channel`` turn it into BrokerUnavailable, so that nothing else catches
    RuntimeError and hides a bug as broker trouble."""
    connection = await aio_pika.connect(AMQP_URL, timeout=10)
    underlay = connection.transport.connection  # type: ignore[union-attr]
    await connection.close()
    with pytest.raises((RuntimeError, ChannelInvalidStateError)):
        await underlay.channel()


async def test_a_call_on_a_connection_found_stuck_is_cancelled_and_reported_as_broker_loss():
    """When the heartbeat finds a connection stuck (a hung node), aiormq cancels its calls
    in flight: their callers get a CancelledError they were never sent. A role's task
    ending "cancelled" stopped `run` with exit code 0 when a cluster node hung, so
    ``uncancelled`` raises BrokerUnavailable instead."""
    node = NodeProxy(AMQP_URL)
    await node.start()
    url = with_heartbeat(node.url(AMQP_URL), 1)  # found stuck after 6 s without a frame
    try:
        raw = await aio_pika.connect(url, timeout=10)
        ours = await aio_pika.connect(url, timeout=10)
        node.hang()  # the channel opens below are sent and never answered
        underlay = raw.transport.connection  # type: ignore[union-attr]
        pending = asyncio.ensure_future(underlay.channel(publisher_confirms=False))
        opening = asyncio.ensure_future(open_bare_channel(ours))
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(pending, 30)  # the library's behaviour
        with pytest.raises(BrokerUnavailable, match="connection closed during the call"):
            await asyncio.wait_for(opening, 30)
    finally:
        await node.kill()


async def test_aiormq_gives_a_channel_close_the_heartbeat_to_be_answered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """aiormq 7.2's Channel.Close waits for its answer as long as the connection's
    heartbeat, then gives up and sends a second Channel.Close, which a broker that was
    only slow answers by closing the connection ("CHANNEL_ERROR - expected
    'channel.open'"). Why a RecycledConnection, which closes a channel per read, asks for
    a heartbeat of SHORT_LIVED_HEARTBEAT_S and not 2 s. Here the node hangs: the close
    gives up long before the heartbeat would find the connection stuck."""
    node = NodeProxy(AMQP_URL)
    await node.start()
    try:
        connection = await aio_pika.connect(with_heartbeat(node.url(AMQP_URL), 2), timeout=10)
        channel = await connection.channel()
        node.hang()
        with caplog.at_level(logging.WARNING, logger="aiormq.channel"):
            await asyncio.wait_for(channel.close(), 30)
        given_up = [r.getMessage() for r in caplog.records if r.name == "aiormq.channel"]
        assert any("because RPC call <Channel.Close" in said for said in given_up), given_up
        assert not connection.is_closed  # not found stuck: the close gave up by itself
    finally:
        await node.kill()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(connection.close(), 10)
