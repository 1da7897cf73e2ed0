"""QueueControl: the marker checks and depth samples the webhook role makes every few
seconds, for as long as it runs, on one robust connection. Real RabbitMQ."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc

import aio_pika
import pytest

from bridge.broker.connect import connection_name
from bridge.broker.errors import BROKER_ERRORS
from bridge.delivery.queues import QueueControl, QueueSet
from tests.amqp_helpers import cut_connection, wait_for
from tests.broker import AMQP_URL

pytestmark = pytest.mark.broker


async def test_checking_a_missing_marker_all_day_leaves_nothing_on_the_connection(unique):
    """A missing marker is the enabled state, and each check of it closes its channel.
    aio-pika kept about 3.2 kB for each such channel until the connection closed: 57 MB a
    day per subscription at one check every 5 s. A check must leave nothing behind."""
    connection = await aio_pika.connect_robust(AMQP_URL, timeout=10)
    control = QueueControl(connection)
    name = QueueSet(f"test-missing-{unique}")
    try:
        for _ in range(50):  # warm up: interpreter caches fill on the first calls
            assert not await control.is_disabled(name)
        checks = 400
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()
            events_before = sum(isinstance(o, asyncio.Event) for o in gc.get_objects())
            for _ in range(checks):
                assert not await control.is_disabled(name)
            gc.collect()
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        events_after = sum(isinstance(o, asyncio.Event) for o in gc.get_objects())
        retained = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    finally:
        await control.close()
        await connection.close()
    # The leak was one asyncio.Event and 3.2 kB per check: 400 Events, 1.25 MB here.
    assert events_after - events_before < 10
    assert retained < checks * 600, f"{retained} bytes kept by {checks} checks"


async def test_marker_checks_follow_the_state_and_go_on_after_a_connection_cut(unique, amqp):
    role = f"test-control {unique}"
    connection = await aio_pika.connect_robust(
        AMQP_URL,
        timeout=10,
        client_properties={"connection_name": connection_name(role)},
        reconnect_interval=0.2,
    )
    control = QueueControl(connection)
    name = QueueSet(f"test-marker-{unique}")
    try:
        assert not await control.is_disabled(name)
        await control.set_disabled(name, True, "classic")
        assert await control.is_disabled(name)

        assert await cut_connection(connection_name(role)) == 1

        async def answers() -> bool:
            try:
                return await control.is_disabled(name)
            except BROKER_ERRORS:
                return False  # still reconnecting

        await wait_for(answers, what="a marker check after the cut")
        await control.set_disabled(name, False, "classic")
        assert not await control.is_disabled(name)
    finally:
        channel = await amqp.channel()
        await channel.queue_delete(name.marker)
        await channel.close()
        await control.close()
        await connection.close()
