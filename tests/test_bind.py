"""`patchwork-bridge bind`: a CI's own durable queue and dead-letter queue, on the real broker."""

from __future__ import annotations

import asyncio
import json

import aio_pika
import pytest

from bridge.__main__ import main
from bridge.broker.topology import replay_exchange
from bridge.cli.bind import BindError, bind, unbind
from bridge.cli.common import CliError
from bridge.settings import load_settings
from tests.broker import AMQP_URL, rabbitmqctl


async def bind_command(*argv: str) -> int:
    """`patchwork-bridge bind ARGV...`, in this process (in a thread: it runs its own loop)."""
    return await asyncio.to_thread(main, ["bind", *argv])


def queue_facts(*names: str) -> dict[str, dict]:
    """Type and durability as RabbitMQ reports them."""
    result = rabbitmqctl("list_queues", "name", "type", "durable", "-q", "--formatter", "json")
    result.check_returncode()
    out = result.stdout
    return {q["name"]: q for q in json.loads(out or "[]") if q["name"] in names}


async def get_one(channel: aio_pika.abc.AbstractChannel, queue: str) -> aio_pika.IncomingMessage:
    """The next message of ``queue``, waiting a little for dead-lettering to happen."""
    q = await channel.get_queue(queue)
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        message = await q.get(fail=False, timeout=5)
        if message is not None:
            return message
        assert asyncio.get_running_loop().time() < deadline, f"nothing arrived in {queue}"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_bound_queue_receives_its_patterns_and_dead_letters_rejects(
    amqp: aio_pika.abc.AbstractConnection, exchange_name: str, ci_queue: str, queue_type: str
):
    settings = load_settings(amqp_url=AMQP_URL, exchange=exchange_name, queue_type=queue_type)
    patterns = ["netdevbpf.*", "*.series-completed"]
    first = await bind(settings, ci_queue, patterns)
    again = await bind(settings, ci_queue, patterns)  # idempotent
    assert first == again
    assert first.dead_letter_queue == f"{ci_queue}.dead"

    facts = await asyncio.to_thread(queue_facts, ci_queue, f"{ci_queue}.dead")
    for name in (ci_queue, f"{ci_queue}.dead"):
        assert facts[name]["type"] == queue_type
        assert facts[name]["durable"] is True

    channel = await amqp.channel()
    exchange = await channel.get_exchange(exchange_name)
    for key in ("netdevbpf.patch-created", "dpdk.patch-created", "dpdk.series-completed"):
        await exchange.publish(aio_pika.Message(key.encode(), message_id=key), routing_key=key)

    received = [await get_one(channel, ci_queue) for _ in range(2)]
    assert {m.message_id for m in received} == {"netdevbpf.patch-created", "dpdk.series-completed"}
    await received[0].ack()
    await received[1].reject(requeue=False)
    dead = await get_one(channel, f"{ci_queue}.dead")
    assert dead.message_id == received[1].message_id
    await dead.ack()
    assert await (await channel.get_queue(ci_queue)).get(fail=False) is None
    await channel.close()


async def test_bind_refuses_to_turn_a_classic_queue_into_a_quorum_queue(
    exchange_name: str, ci_queue: str
):
    await bind(load_settings(amqp_url=AMQP_URL, exchange=exchange_name), ci_queue, ["#"])
    quorum = load_settings(amqp_url=AMQP_URL, exchange=exchange_name, queue_type="quorum")
    with pytest.raises(BindError, match="inequivalent arg 'x-queue-type'"):
        await bind(quorum, ci_queue, ["#"])


async def test_cli_prints_one_line(
    exchange_name: str,
    ci_queue: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
):
    monkeypatch.setenv("BRIDGE_AMQP_URL", AMQP_URL)
    monkeypatch.setenv("BRIDGE_EXCHANGE", exchange_name)
    assert await bind_command(ci_queue, "dpdk.*") == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        f"queue {ci_queue} (classic) bound to exchange {exchange_name} with dpdk.*; "
        f"rejected messages go to {ci_queue}.dead"
    ]
    assert err == ""


async def test_cli_reports_an_unreachable_broker_in_one_line_without_the_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    monkeypatch.setenv("BRIDGE_AMQP_URL", "amqp://ci:hunter2@127.0.0.1:1/")
    assert await bind_command("never-declared", *["#"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1 and "cannot bind" in err
    assert "hunter2" not in err


@pytest.mark.parametrize(
    ("queue", "patterns", "message"),
    [
        ("amq.mine", ["#"], "amq."),
        ("", ["#"], "non-empty"),
        ("q", [""], "pattern"),
        # What the subscriptions file refuses, bind refuses too.
        ("q", ["netdevbpf.**"], "bad topic pattern 'netdevbpf.**'"),
        ("q", ["dpdk.patch*"], "bad topic pattern"),
    ],
)
async def test_cli_rejects_names_rabbitmq_would_refuse(
    queue: str, patterns: list[str], message: str, capsys: pytest.CaptureFixture[str]
):
    assert await bind_command(queue, *patterns) == 1
    assert message in capsys.readouterr().err


async def test_cli_exits_2_on_a_bad_setting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    monkeypatch.setenv("BRIDGE_QUEUE_TYPE", "lazy")
    assert await bind_command("q", *["#"]) == 2
    assert "BRIDGE_QUEUE_TYPE" in capsys.readouterr().err


async def test_a_queue_this_deployment_did_not_make_is_not_bound_or_removed_unless_adopted(
    amqp: aio_pika.abc.AbstractConnection, exchange_name: str, ci_queue: str
):
    """Two deployments on one vhost: the second binding the first's queue would mix their
    events in it, and removing it would delete the other's work."""
    site_a = load_settings(exchange=exchange_name)
    site_b = load_settings(exchange=f"{exchange_name}-b")
    await bind(site_a, ci_queue, ["netdevbpf.*"])
    try:
        with pytest.raises(BindError, match=f"queue {ci_queue} exists but was not made by"):
            await bind(site_b, ci_queue, ["#"])
        with pytest.raises(CliError, match="was not made by this deployment's bind"):
            await unbind(site_b, ci_queue, yes=True)
        channel = await amqp.channel()
        await channel.declare_queue(ci_queue, passive=True)  # still there, untouched
        # A queue of an earlier version (no replay route) is taken over when told so.
        await channel.exchange_delete(replay_exchange(exchange_name, ci_queue))
        with pytest.raises(BindError, match="pass --adopt"):
            await bind(site_a, ci_queue, ["netdevbpf.*"])
        await bind(site_a, ci_queue, ["netdevbpf.*"], adopt=True)
        assert await unbind(site_a, ci_queue, yes=True) == [ci_queue, f"{ci_queue}.dead"]
        await channel.close()
    finally:
        channel = await amqp.channel()
        await channel.exchange_delete(site_b.exchange)
        await channel.close()
