"""Upgrading from the queue names before 0.2 (``bridge.webhook.<name>``, shared by every
deployment on a vhost): what waits, retries and is dead under the old names reaches this
deployment's new queues, and another deployment's messages stay where they were."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator

import aio_pika
import pytest

from bridge.broker.topology import declare_exchange, queue_arguments
from bridge.cli.migrate import Move, migrate
from bridge.cli.subscriptions import run_subscriptions
from bridge.delivery.messages import ATTEMPT, LAST_REASON, ROUTING_KEY
from bridge.delivery.queues import QueueSet, legacy_subscription_queues, subscription_queues
from bridge.settings import Settings
from tests.amqp_helpers import (
    FakeSink,
    delete_subscription_queues,
    event_message,
    get_all,
    make_consumer,
    queue_depth,
    recorded_event,
    running,
    subscription,
    wait_for,
)

pytestmark = pytest.mark.broker

SOURCE = "http://127.0.0.1:8000/api/1.4"
"""The ce-source of tests.amqp_helpers' events: this deployment's Patchwork."""
OTHER_SOURCE = "https://patchwork.other.example/api/1.3"
SCHEDULE = [0.2, 3600.0]


def copy_of(event_id: int, source: str, **headers: object) -> aio_pika.Message:
    """A retry or dead letter as the old bridge wrote it: the event under the queue's name,
    its routing key and the ce-* headers carried in its headers."""
    message, key = event_message(recorded_event("patch-created", event_id))
    assert message.headers is not None
    message.headers.update({"ce-source": source, ROUTING_KEY: key, **headers})
    return message


@pytest.fixture
async def old_site(
    amqp: aio_pika.abc.AbstractConnection, exchange_name: str, unique: str
) -> AsyncIterator[tuple[str, str]]:
    """A subscription's queues as a bridge before 0.2 left them, bound to this deployment's
    exchange and to another deployment's (the shared-name mix-up): 3 events of ours and 1 of
    theirs waiting, 2 copies of ours waiting to be retried in an hour, and dead letters: 2
    of ours, 1 of the other Patchwork's. Yields (subscription name, other exchange)."""
    name, other = f"mig-{unique}", f"test-other-{unique}"
    old = legacy_subscription_queues(name)
    channel = await amqp.channel(publisher_confirms=True)
    ours = await declare_exchange(channel, exchange_name)
    theirs = await declare_exchange(channel, other)
    main = await channel.declare_queue(
        old.main, durable=True, arguments={"x-queue-type": "classic"}
    )
    await main.bind(ours, "#")
    await main.bind(theirs, "#")
    retry = old.retry(3600.0)
    retry_args = queue_arguments(
        "classic",
        dead_letter_exchange="",
        dead_letter_routing_key=old.main,
        message_ttl_ms=3_600_000,
    )
    await channel.declare_queue(retry, durable=True, arguments=retry_args)
    await channel.declare_queue(old.dead, durable=True, arguments={"x-queue-type": "classic"})
    for event_id in (1, 2, 3):
        message, key = event_message(recorded_event("patch-created", event_id))
        await ours.publish(message, routing_key=key)
    message, key = event_message(recorded_event("patch-created", 900))
    await theirs.publish(message, routing_key=key)
    for event_id in (4, 5):
        await channel.default_exchange.publish(copy_of(event_id, SOURCE, **{ATTEMPT: 2}), retry)
    for event_id in (6, 7):
        dead = copy_of(event_id, SOURCE, **{LAST_REASON: "http_5xx"})
        await channel.default_exchange.publish(dead, old.dead)
    await channel.default_exchange.publish(copy_of(901, OTHER_SOURCE), old.dead)
    await channel.declare_queue(old.marker, durable=True)  # it was disabled
    yield name, other
    for queue in (old.main, retry, old.dead, old.marker):
        await channel.queue_delete(queue)
    await channel.exchange_delete(other)
    await channel.close()
    made = [subscription(name), subscription(name, retry_schedule=SCHEDULE)]
    await delete_subscription_queues(amqp, exchange_name, made)


def ids(messages: list[aio_pika.abc.AbstractIncomingMessage]) -> list[int]:
    return sorted(json.loads(m.body)["id"] for m in messages)


async def test_an_upgraded_deployment_loses_nothing_and_takes_nothing_of_another(
    amqp, exchange_name, old_site
):
    name, _other = old_site
    settings = Settings(
        exchange=exchange_name, patchwork_url="http://127.0.0.1:8000", patchwork_api_version="1.4"
    )
    old, new = legacy_subscription_queues(name), subscription_queues(exchange_name, name)
    sub = subscription(name, retry_schedule=SCHEDULE)
    lane = Move(f"subscription {name}", old, new, exchange_name, ["#"], SCHEDULE, exchange_name)

    out = io.StringIO()
    assert await migrate(settings, [lane], out=out) == 3 + 2 + 2
    report = out.getvalue()
    assert f"{old.main} -> {new.main}: moved 3, 1 left (another deployment's exchange)" in report
    # A retry of 0.1 says no due time: it is tried again at once, from the main queue.
    assert f"{old.retry(3600.0)} -> {new.main}: moved 2" in report
    assert f"{old.dead} -> {new.dead}: moved 2, 1 left (another deployment's Patchwork)" in report
    assert f"deleted {old.retry(3600.0)}" in report

    # What was this deployment's is in its own queues, in the same roles.
    assert await queue_depth(amqp, old.retry(3600.0)) is None  # emptied, deleted
    assert await queue_depth(amqp, new.main) == 3 + 2
    dead = await get_all(amqp, new.dead)
    assert ids(dead) == [6, 7] and {m.headers[LAST_REASON] for m in dead} == {"http_5xx"}
    # It stays disabled, as it was; the other deployment's messages stay in the old queues.
    out = io.StringIO()
    await run_subscriptions(settings, [sub], "list", None, out=out)
    assert out.getvalue().split("\t")[:2] == [name, "disabled"]
    assert ids(await get_all(amqp, old.main)) == [900]
    assert ids(await get_all(amqp, old.dead)) == [901]

    # Enabled, it delivers the three that waited; a new event reaches the new queue only.
    await run_subscriptions(settings, [sub], "enable", name, out=io.StringIO())
    sink = FakeSink()
    async with running(make_consumer(exchange_name, [(sub, sink)])):
        await wait_for(lambda: len(sink.ids) >= 5)
        message, key = event_message(recorded_event("patch-created", 8))
        channel = await amqp.channel()
        exchange = await channel.get_exchange(exchange_name)
        await exchange.publish(message, routing_key=key)
        await channel.close()
        await wait_for(lambda: len(sink.ids) == 6)
    assert sorted(sink.ids) == ["1", "2", "3", "4", "5", "8"]
    # The retries kept their attempt numbers.
    assert sorted((d.message_id, d.attempt) for d in sink.deliveries)[3:5] == [("4", 2), ("5", 2)]
    assert await queue_depth(amqp, old.main) == 0  # no longer bound to this deployment


async def test_copies_that_do_not_say_whose_they_are_move_only_when_claimed(
    amqp, exchange_name, unique
):
    """The checks role's old queue, bridge.checks, was every deployment's: its dead letters
    carry no ce-source. They move only when the operator says they are this deployment's."""
    old = QueueSet(f"test-checks-{unique}")  # stands for bridge.checks: never the real one
    new = QueueSet(f"{exchange_name}.checks")
    channel = await amqp.channel(publisher_confirms=True)
    await channel.declare_queue(old.dead, durable=True, arguments={"x-queue-type": "classic"})
    result = aio_pika.Message(b'{"patch": 1, "state": "fail", "context": "b"}', headers={})
    await channel.default_exchange.publish(result, old.dead)
    settings = Settings(exchange=exchange_name)
    lane = Move("the checks role", old, new, f"{exchange_name}.results", ["*.check"], [5.0], None)
    try:
        out = io.StringIO()
        assert await migrate(settings, [lane], out=out) == 0
        assert "1 copies do not say whose they are" in out.getvalue()
        assert await queue_depth(amqp, old.dead) == 1
        assert await migrate(settings, [lane], out=io.StringIO(), claim_copies=True) == 1
        assert await queue_depth(amqp, old.dead) is None
        assert await queue_depth(amqp, new.dead) == 1
    finally:
        for queue in (old.dead, *new.watched([5.0])):
            await channel.queue_delete(queue)
        await channel.exchange_delete(f"{exchange_name}.results")
        await channel.close()


async def test_a_new_role_stops_the_flow_into_the_old_queue_and_says_what_waits_there(
    amqp, exchange_name, old_site, caplog
):
    name = old_site[0]
    old = legacy_subscription_queues(name)
    sink = FakeSink()
    async with running(make_consumer(exchange_name, [(subscription(name), sink)])):
        message, key = event_message(recorded_event("patch-created", 10))
        channel = await amqp.channel()
        await (await channel.get_exchange(exchange_name)).publish(message, routing_key=key)
        await channel.close()
        await wait_for(lambda: sink.ids == ["10"])
    assert await queue_depth(amqp, old.main) == 4  # as it was: 3 of ours, 1 of theirs
    [said] = [r.getMessage() for r in caplog.records if old.main in r.getMessage()]
    assert "(4 messages)" in said and "patchwork-bridge migrate" in said
