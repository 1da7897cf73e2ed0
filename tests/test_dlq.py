"""``dlq list|replay|purge`` against real dead letters left by the consumer."""

from __future__ import annotations

import asyncio
import io
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import pytest

from bridge.__main__ import main
from bridge.cli.bind import bind, unbind
from bridge.cli.common import CliError
from bridge.cli.dlq import Target, run_dlq
from bridge.cli.subscriptions import remove_subscription
from bridge.delivery.messages import BRIDGE_HEADERS
from bridge.metrics import Metrics
from bridge.settings import Settings
from bridge.sinks.base import GiveUp
from bridge.webhook.subscriptions import Subscription
from tests.amqp_helpers import (
    FakeSink,
    delete_subscription_queues,
    get_all,
    lane,
    make_consumer,
    publish_events,
    queue_depth,
    running,
    subscription,
    wait_for,
)

EVENTS = [("patch-created", 1), ("series-completed", 2), ("patch-relation-changed", 3)]


@pytest.fixture
async def dead(
    amqp: aio_pika.abc.AbstractConnection, exchange_name: str, unique: str
) -> AsyncIterator[Subscription]:
    """A subscription whose receiver refused three events: they wait in its dead-letter queue."""
    sub = subscription(f"dlq-{unique}")
    sink = FakeSink(lambda d: GiveUp("http_4xx", "HTTP 400 Bad Request", status=400))
    metrics = Metrics()
    async with running(make_consumer(exchange_name, [(sub, sink)], metrics=metrics)):
        await publish_events(exchange_name, EVENTS)

        async def all_dead() -> bool:
            return await queue_depth(amqp, lane(exchange_name, sub.name).dead) == 3

        await wait_for(all_dead, what="3 dead letters")
    yield sub
    await delete_subscription_queues(amqp, exchange_name, [sub])


async def dlq(exchange: str, sub: Subscription, action: str, limit: int | None = None) -> str:
    out = io.StringIO()
    await run_dlq(
        Settings(exchange=exchange),
        Target.of_subscription(exchange, sub.name),
        action,
        limit,
        out,
        yes=True,
    )
    return out.getvalue()


async def test_list_shows_dead_letters_without_removing_them(
    dead: Subscription, exchange_name: str, amqp: aio_pika.abc.AbstractConnection
) -> None:
    lines = (await dlq(exchange_name, dead, "list", 2)).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(
        "1  netdevbpf.patch-created  attempts=1  status=400  reason=http_4xx"
    )
    assert lines[0].endswith("error=HTTP 400 Bad Request")
    assert "dead_at=20" in lines[0]
    assert lines[1].startswith("2  netdevbpf.series-completed  ")
    assert await queue_depth(amqp, lane(exchange_name, dead.name).dead) == 3

    # Looking twice shows the same letters in the same order.
    again = (await dlq(exchange_name, dead, "list", 50)).splitlines()
    assert [line.split()[0] for line in again] == ["1", "2", "3"]
    assert again[2].split()[1] == "dpdk.patch-relation-changed"


async def test_replay_sends_dead_letters_back_for_a_fresh_set_of_attempts(
    dead: Subscription, exchange_name: str, amqp: aio_pika.abc.AbstractConnection
) -> None:
    out = await dlq(exchange_name, dead, "replay", 2)
    assert (
        out.splitlines()[-1] == f"replayed 2 dead letters to {lane(exchange_name, dead.name).main}"
    )
    assert await queue_depth(amqp, lane(exchange_name, dead.name).dead) == 1
    replayed = await get_all(amqp, lane(exchange_name, dead.name).main)
    assert [m.message_id for m in replayed] == ["1", "2"]
    for message in replayed:
        assert not set(message.headers) & set(BRIDGE_HEADERS)
        assert message.headers["ce-id"] == message.message_id

    # The rest (no limit); a receiver that works now gets them with attempt 1.
    await dlq(exchange_name, dead, "replay")
    sink = FakeSink()
    async with running(make_consumer(exchange_name, [(dead, sink)])):
        await wait_for(lambda: sink.ids == ["3"], what="the replayed event")
    [delivery] = sink.deliveries
    assert delivery.attempt == 1
    assert delivery.routing_key == "dpdk.patch-relation-changed"
    assert await queue_depth(amqp, lane(exchange_name, dead.name).dead) == 0


async def test_purge_deletes_all_dead_letters_and_says_how_many(
    dead: Subscription, exchange_name: str, amqp: aio_pika.abc.AbstractConnection
) -> None:
    out = await dlq(exchange_name, dead, "purge")
    assert out == f"purged 3 dead letters from {lane(exchange_name, dead.name).dead}\n"
    assert await queue_depth(amqp, lane(exchange_name, dead.name).dead) == 0


async def test_missing_dead_letter_queue_is_one_clear_error(
    exchange_name: str, unique: str
) -> None:
    never_ran = subscription(f"never-{unique}")
    with pytest.raises(CliError, match="does not exist"):
        target = Target.of_subscription(exchange_name, never_ran.name)
        await run_dlq(Settings(exchange=exchange_name), target, "list", 5)


def write_subscriptions(tmp_path: Path, name: str) -> Path:
    path = tmp_path / "subscriptions.toml"
    path.write_text(f'[[webhook]]\nname = "{name}"\nurl = "https://ci.example.org/hook"\n')
    return path


def test_unknown_subscription_exits_2_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BRIDGE_SUBSCRIPTIONS", str(write_subscriptions(tmp_path, "ci")))
    assert main(["dlq", "purge", "nope"]) == 2
    err = capsys.readouterr().err
    assert err == "patchwork-bridge: nope: unknown subscription (configured: ci)\n"


async def test_command_line_lists_dead_letters(
    dead: Subscription, exchange_name: str, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "BRIDGE_EXCHANGE": exchange_name,
        "BRIDGE_SUBSCRIPTIONS": str(write_subscriptions(tmp_path, dead.name)),
    }
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "bridge", "dlq", "list", dead.name, "--limit", "1"),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    assert out.decode().splitlines()[0].startswith("1  netdevbpf.patch-created  attempts=1")
    assert (
        err.decode().strip() == f"1 dead letters shown from {lane(exchange_name, dead.name).dead}"
    )


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_fifty_lists_leave_every_dead_letter_in_place(
    amqp: aio_pika.abc.AbstractConnection, exchange_name: str, unique: str, queue_type: str
) -> None:
    """Each list returns what it shows, which a quorum queue counts as a delivery; RabbitMQ
    4.0 would drop a message after 20 of them if the dead queue did not say otherwise."""
    sub = subscription(f"dlq50-{unique}")
    sink = FakeSink(lambda d: GiveUp("http_4xx", "HTTP 400 Bad Request", status=400))
    events = [("patch-created", 100 + i) for i in range(10)]
    consumer = make_consumer(exchange_name, [(sub, sink)], queue_type=queue_type)
    try:
        async with running(consumer):
            await publish_events(exchange_name, events)

            async def all_dead() -> bool:
                return await queue_depth(amqp, lane(exchange_name, sub.name).dead) == 10

            await wait_for(all_dead, what="10 dead letters")
        settings = Settings(exchange=exchange_name, queue_type=queue_type)  # type: ignore[arg-type]
        for _ in range(50):
            await run_dlq(
                settings,
                Target.of_subscription(exchange_name, sub.name),
                "list",
                None,
                io.StringIO(),
            )
        # The last list's returns reach a quorum queue a moment after its channel closes.
        await wait_for(all_dead, 10, "the 10 dead letters back in place")
        assert sorted(
            m.message_id for m in await get_all(amqp, lane(exchange_name, sub.name).dead)
        ) == sorted(str(i) for _, i in events)
    finally:
        await delete_subscription_queues(amqp, exchange_name, [sub])


async def test_purge_asks_first_and_without_a_terminal_deletes_nothing(
    dead: Subscription, exchange_name: str, amqp: aio_pika.abc.AbstractConnection
) -> None:
    target = Target.of_subscription(exchange_name, dead.name)
    with pytest.raises(CliError, match=r"delete the 3 dead letters .* pass --yes"):
        await run_dlq(Settings(exchange=exchange_name), target, "purge", None, io.StringIO())
    assert await queue_depth(amqp, lane(exchange_name, dead.name).dead) == 3


async def test_dead_letters_of_a_bind_queue_are_listed_and_replayed(
    exchange_name: str, ci_queue: str, amqp: aio_pika.abc.AbstractConnection
) -> None:
    settings = Settings(exchange=exchange_name)
    await bind(settings, ci_queue, ["#"])
    await publish_events(exchange_name, [("patch-created", 41)])
    channel = await amqp.channel()
    queue = await channel.get_queue(ci_queue)
    message = await queue.get(timeout=10)
    await message.reject(requeue=False)  # the CI gives up on it: it goes to .dead
    await channel.close()
    target = Target.of_bound_queue(exchange_name, ci_queue)

    async def dead_letters() -> bool:
        return await queue_depth(amqp, f"{ci_queue}.dead") == 1

    await wait_for(dead_letters, what="the rejected event in .dead")
    out = io.StringIO()
    await run_dlq(settings, target, "list", None, out)
    assert out.getvalue().startswith("41  netdevbpf.patch-created")
    await run_dlq(settings, target, "replay", None, io.StringIO())
    assert await queue_depth(amqp, f"{ci_queue}.dead") == 0
    [back] = await get_all(amqp, ci_queue)
    assert back.message_id == "41"


async def test_removing_a_subscription_deletes_every_queue_it_had(
    dead: Subscription, exchange_name: str, amqp: aio_pika.abc.AbstractConnection
) -> None:
    deleted = await remove_subscription(Settings(exchange=exchange_name), [], dead.name, yes=True)
    assert (
        lane(exchange_name, dead.name).main in deleted
        and lane(exchange_name, dead.name).dead in deleted
    )
    for queue in deleted:
        assert await queue_depth(amqp, queue) is None


async def test_bind_remove_deletes_the_queue_and_its_dead_letters(
    exchange_name: str, ci_queue: str, amqp: aio_pika.abc.AbstractConnection
) -> None:
    settings = Settings(exchange=exchange_name)
    await bind(settings, ci_queue, ["#"])
    assert await unbind(settings, ci_queue, yes=True) == [ci_queue, f"{ci_queue}.dead"]
    assert await queue_depth(amqp, ci_queue) is None
    assert await queue_depth(amqp, f"{ci_queue}.dead") is None
