"""Several nodes in BRIDGE_AMQP_URL: a connection takes the first that answers, moves on
when its node dies or hangs, and says which node it is on. The nodes here are stand-ins
(tests/node_proxy.py) in front of the broker under test; tests/test_cluster.py does the
same on a real cluster."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aio_pika
import pytest

from bridge.broker import connect as connect_module
from bridge.broker.connect import connect, connect_plain
from bridge.broker.errors import BrokerRefused, LoginRefused
from bridge.broker.nodes import address, with_heartbeat
from bridge.demo.patchwork_double import FakePatchwork
from bridge.settings import Settings, split_urls
from tests.amqp_helpers import delete_subscription_queues, subscription, wait_for
from tests.broker import AMQP_URL
from tests.fault_tools import (
    bridge_env,
    kill_bridge,
    start_bridge,
    stop_bridge,
    tail,
    write_subscription,
)
from tests.node_proxy import NodeProxy
from tests.receiver import Receiver


def test_urls_split_on_commas_and_keep_their_own_heartbeat():
    assert split_urls(" amqp://a/ ,amqp://b:5673/v,, ") == ["amqp://a/", "amqp://b:5673/v"]
    assert with_heartbeat("amqp://a/") == "amqp://a/?heartbeat=2"
    assert with_heartbeat("amqp://a/?heartbeat=30") == "amqp://a/?heartbeat=30"
    assert address("amqp://u:p@rmq1/") == "rmq1:5672"
    assert address("amqps://rmq2/") == "rmq2:5671"


def test_every_node_is_checked_and_every_password_redacted():
    settings = Settings(
        amqp_url="amqp://u:s3cret@rmq1:5672/,amqp://u:s3cret@rmq2:5672/",  # type: ignore[arg-type]
        patchwork_url="http://127.0.0.1:9",
    )
    assert settings.amqp_url_redacted == "amqp://u:***@rmq1:5672/,amqp://u:***@rmq2:5672/"
    with pytest.raises(ValueError, match="several, comma-separated"):
        Settings(amqp_url="amqp://rmq1/,http://rmq2/", patchwork_url="http://x")  # type: ignore[arg-type]


@pytest.fixture
async def nodes() -> AsyncIterator[list[NodeProxy]]:
    proxies = [NodeProxy(AMQP_URL) for _ in range(3)]
    for proxy in proxies:
        await proxy.start()
    yield proxies
    for proxy in proxies:
        await proxy.kill()


def settings_for(nodes: list[NodeProxy], url: str = AMQP_URL) -> Settings:
    return Settings(
        amqp_url=",".join(node.url(url) for node in nodes),  # type: ignore[arg-type]
        patchwork_url="http://127.0.0.1:9",
    )


def on(node: NodeProxy) -> str:
    return f"127.0.0.1:{node.port}"


@pytest.mark.broker
async def test_the_first_node_that_answers_is_taken(nodes):
    await nodes[0].kill()
    connection = await connect_plain(settings_for(nodes), "test")
    try:
        assert connect_module.node_of(connection) == on(nodes[1])
    finally:
        await connection.close()


@pytest.mark.broker
@pytest.mark.timeout(60)
async def test_a_robust_connection_moves_to_a_live_node_when_its_node_dies_or_hangs(nodes, unique):
    connection = await connect(settings_for(nodes), "test")
    queue_name = f"test-nodes-{unique}"
    back: list[str | None] = []  # the node after each reconnection, its channels restored
    connection.reconnect_callbacks.add(lambda *_: back.append(connect_module.node_of(connection)))
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, auto_delete=False)
        assert connect_module.node_of(connection) == on(nodes[0])

        await nodes[0].kill()
        await wait_for(lambda: back == [on(nodes[1])], 20, "on the second node")

        nodes[1].hang()  # left after the heartbeat gives up: about 9 s
        await asyncio.sleep(1)
        await wait_for(lambda: back == [on(nodes[1]), on(nodes[2])], 30, "on the third node")

        # The channel and its queue came along: a publish reaches the queue.
        await channel.default_exchange.publish(aio_pika.Message(b"x"), routing_key=queue_name)
        got = await queue.get(timeout=10, fail=True)
        assert got is not None and got.body == b"x"
        await got.ack()
    finally:
        channel = await connection.channel()
        await channel.queue_delete(queue_name)
        await connection.close()


@pytest.mark.broker
async def test_a_refused_vhost_is_one_clear_error_and_no_other_node_is_tried(nodes):
    url = AMQP_URL.rstrip("/") + "/no-such-vhost-here"
    with pytest.raises(BrokerRefused) as refused:
        await connect_plain(settings_for(nodes, url), "test")
    message = str(refused.value)
    assert "no-such-vhost-here" in message and "refused to open the vhost" in message
    assert "guest:guest" not in message


@pytest.mark.broker
async def test_a_refused_login_names_the_user_never_the_password(nodes):
    url = AMQP_URL.replace("guest:guest@", "guest:wrong-pass@")
    with pytest.raises(LoginRefused) as refused:
        await connect(settings_for(nodes, url), "test")
    assert "'guest'" in str(refused.value) and "wrong-pass" not in str(refused.value)


@pytest.mark.broker
@pytest.mark.timeout(240)
async def test_run_keeps_every_event_flowing_when_its_node_hangs_then_when_the_next_dies(
    nodes, exchange_name, unique, tmp_path, amqp
):
    """`run` (producer and webhook) on three stand-in nodes, all its connections on the
    first. The first hangs: every connection moves on once its heartbeat gives up. Then
    the second dies. Every event reaches the receiver, and the process never exits."""
    patchwork = FakePatchwork(tz="Australia/Canberra")
    await patchwork.start()
    receiver = Receiver()
    await receiver.start()
    name = f"hook-{unique}"
    subscriptions = write_subscription(tmp_path / "subscriptions.toml", name, receiver.url())
    env = bridge_env(
        AMQP_URL=settings_for(nodes).amqp_url.get_secret_value(), EXCHANGE=exchange_name,
        PATCHWORK_URL=patchwork.url, PATCHWORK_TIMEZONE="Australia/Canberra",
        START="beginning", POLL_INTERVAL="0.2", STATE_DIR=str(tmp_path / "state"),
        SUBSCRIPTIONS=str(subscriptions),
    )  # fmt: skip
    log = tmp_path / "bridge.log"
    process = await start_bridge("run", env, log)
    added: set[int] = set()

    def received() -> set[int]:
        return {json.loads(hit.body)["id"] for hit in receiver.requests}

    async def feed_and_wait(what: str) -> None:
        added.update(event["id"] for event in patchwork.add_events(20))
        await wait_for(lambda: added <= received(), 60, f"every event {what}: {tail(log)}")

    try:
        await feed_and_wait("at first")
        nodes[0].hang()
        await feed_and_wait("while the first node hangs")
        await nodes[1].kill()
        await feed_and_wait("once the second node died too")
        assert process.returncode is None, tail(log)
        assert await stop_bridge(process) == 0
    finally:
        if process.returncode is None:
            await kill_bridge(process)
        await receiver.stop()
        await patchwork.stop()
        await delete_subscription_queues(amqp, exchange_name, [subscription(name)])
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    assert "on RabbitMQ node " + on(nodes[2]) in text
