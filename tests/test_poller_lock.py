"""The poller lock, both kinds: one holder at a time, handed on at once, lost with its
connection. The quorum kind is the one a cluster needs (docs/operations.md)."""

from __future__ import annotations

import asyncio

import pytest

from bridge.broker.connect import connection_name
from bridge.producer.lock import PollerLock, QuorumLock, poller_lock
from bridge.settings import Settings
from tests.amqp_helpers import cut_connection, wait_for

pytestmark = pytest.mark.broker

KINDS = pytest.mark.parametrize("queue_type", ["classic", "quorum"])


def lock_for(exchange: str, queue_type: str) -> PollerLock | QuorumLock:
    settings = Settings(
        exchange=exchange, queue_type=queue_type, patchwork_url="http://127.0.0.1:9"
    )
    return poller_lock(settings)


def test_the_kind_follows_the_queue_type():
    assert isinstance(lock_for("x", "classic"), PollerLock)
    assert isinstance(lock_for("x", "quorum"), QuorumLock)


@KINDS
@pytest.mark.timeout(60)
async def test_one_holder_and_the_lock_passes_on_release(exchange_name, queue_type):
    first, second = lock_for(exchange_name, queue_type), lock_for(exchange_name, queue_type)
    stop = asyncio.Event()
    try:
        assert await first.acquire(stop)
        taking = asyncio.create_task(second.acquire(stop))
        await wait_for(lambda: second.standby, 20, "the second lock on standby")
        await asyncio.sleep(3.0)  # a few of its tries (classic) or probe rounds (quorum)
        assert not taking.done(), "two holders at once"
        assert not first.lost.is_set()
        await first.release()
        assert await asyncio.wait_for(taking, 20)
        assert not second.standby and second.waited
    finally:
        stop.set()
        await first.release()
        await second.release()


@KINDS
@pytest.mark.timeout(60)
async def test_a_holder_cut_off_knows_at_once_and_takes_the_lock_again(exchange_name, queue_type):
    lock = lock_for(exchange_name, queue_type)
    stop = asyncio.Event()
    try:
        assert await lock.acquire(stop)
        assert await cut_connection(connection_name("producer-lock")) == 1
        await asyncio.wait_for(lock.lost.wait(), 10)
        await lock.release()
        assert await asyncio.wait_for(lock.acquire(stop), 20)
        assert not lock.lost.is_set()
    finally:
        stop.set()
        await lock.release()


@pytest.mark.timeout(30)
async def test_stop_ends_a_standby_wait(exchange_name):
    first, second = lock_for(exchange_name, "quorum"), lock_for(exchange_name, "quorum")
    stop = asyncio.Event()
    try:
        assert await first.acquire(stop)
        taking = asyncio.create_task(second.acquire(stop))
        await wait_for(lambda: second.standby, 20, "the second lock on standby")
        stop.set()
        assert await asyncio.wait_for(taking, 10) is False
    finally:
        await first.release()
        await second.release()
