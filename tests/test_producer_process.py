"""The producer process as a CI runs it, read back by an independent AMQP client (pika)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import threading
from datetime import timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pika
import pytest
from cloudevents.core.bindings.rabbitmq import RabbitMQMessage, from_binary
from cloudevents.core.formats.json import JSONFormat

from bridge.demo.patchwork_double import MEASURED, FakePatchwork
from tests.amqp_helpers import wait_for
from tests.broker import AMQP_URL

pytestmark = pytest.mark.broker

TZ = "Australia/Canberra"


class PikaReader(threading.Thread):
    """Consumes a queue bound with ``#`` the way a CI system written with pika would."""

    def __init__(self, exchange: str, queue: str) -> None:
        super().__init__(daemon=True)
        self.exchange, self.queue = exchange, queue
        self.messages: list[tuple[pika.spec.Basic.Deliver, pika.BasicProperties, bytes]] = []
        self.ready = threading.Event()
        self._halt = threading.Event()

    def run(self) -> None:
        connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        channel = connection.channel()
        channel.exchange_declare(self.exchange, "topic", durable=True)
        channel.queue_declare(self.queue, durable=True)
        channel.queue_bind(self.queue, self.exchange, "#")
        self.ready.set()
        while not self._halt.is_set():
            method, properties, body = channel.basic_get(self.queue, auto_ack=True)
            if method is None:
                connection.sleep(0.05)
                continue
            self.messages.append((method, properties, body))
        channel.queue_delete(self.queue)
        channel.exchange_delete(self.exchange)
        connection.close()

    def stop(self) -> None:
        self._halt.set()
        self.join(30)


def tap(unique: str) -> PikaReader:
    """An independent CI queue bound ``#`` to a fresh exchange, consuming already."""
    reader = PikaReader(f"test-{unique}", f"test-{unique}-ci")
    reader.start()
    assert reader.ready.wait(10)
    return reader


def producer_env(
    patchwork: FakePatchwork, exchange: str, state_dir: Path, **settings: str
) -> dict[str, str]:
    """The environment of a producer process on ``patchwork``; ``settings`` without BRIDGE_."""
    return {
        **os.environ,
        "BRIDGE_PATCHWORK_URL": patchwork.url,
        "BRIDGE_PATCHWORK_TIMEZONE": TZ,
        "BRIDGE_EXCHANGE": exchange,
        "BRIDGE_STATE_DIR": str(state_dir),
        "BRIDGE_HTTP_PORT": "0",
        **{f"BRIDGE_{key}": value for key, value in settings.items()},
    }


async def start_producer(env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "producer", env=env, stderr=asyncio.subprocess.PIPE
    )


async def feed(
    patchwork: FakePatchwork, added: list[dict], hidden: set[int], stop: asyncio.Event
) -> None:
    """New mail keeps arriving; one event in ten commits late with an older date;
    now and then Patchwork answers a request with an error."""
    rng = random.Random(7)
    while not stop.is_set():
        added.extend(patchwork.add_events(rng.randint(1, 20)))
        if rng.random() < 0.3:
            when = patchwork.now() - timedelta(seconds=rng.uniform(0.5, 5))
            late = patchwork.add_event("patch-created", "dpdk", when, visible=False)
            added.append(late)
            hidden.add(late["id"])
            asyncio.get_running_loop().call_later(
                rng.uniform(0.2, 1.5), reveal, patchwork, hidden, late["id"]
            )
        if rng.random() < 0.1:
            patchwork.fail_next(rng.choice(["500", "html", "truncated", "404", "object"]))
        await asyncio.sleep(0.05)


def reveal(patchwork: FakePatchwork, hidden: set[int], event_id: int) -> None:
    if event_id in hidden:
        hidden.discard(event_id)
        patchwork.make_visible(event_id)


@pytest.mark.timeout(120)
async def test_every_event_reaches_a_pika_consumer_once_across_a_restart(unique, tmp_path):
    patchwork = FakePatchwork(tz=TZ)
    added = patchwork.add_events(500)
    await patchwork.start()
    reader = tap(unique)
    env = producer_env(
        patchwork, reader.exchange, tmp_path,
        START="beginning", POLL_INTERVAL="0.2", POLL_OVERLAP="30", PATCHWORK_TIMEOUT="2",
    )  # fmt: skip
    stop_feeding = asyncio.Event()
    hidden: set[int] = set()
    feeder = asyncio.create_task(feed(patchwork, added, hidden, stop_feeding))
    try:
        first = await start_producer(env)
        await asyncio.sleep(2.0)
        first.send_signal(signal.SIGTERM)
        first_log = (await asyncio.wait_for(first.communicate(), 30))[1].decode()
        assert first.returncode == 0, first_log
        second = await start_producer(env)
        await asyncio.sleep(2.0)
        stop_feeding.set()
        await feeder
        patchwork.make_visible(*hidden)
        hidden.clear()
        await wait_for(lambda: len(reader.messages) >= len(added), 30)
        await asyncio.sleep(1.0)  # a few more polls: nothing may come twice
        second.send_signal(signal.SIGTERM)
        second_log = (await asyncio.wait_for(second.communicate(), 30))[1].decode()
        assert second.returncode == 0, second_log
    finally:
        stop_feeding.set()
        reader.stop()
        await patchwork.stop()

    ids = [int(props.message_id) for _, props, _ in reader.messages]
    assert sorted(ids) == sorted(e["id"] for e in added), "every event exactly once"
    assert "poll failed" in first_log + second_log  # the faults did happen
    assert "resuming from cursor" in second_log
    for method, props, body in reader.messages:
        event = next(e for e in added if e["id"] == int(props.message_id))
        assert method.routing_key == f"{event['project']['link_name']}.{event['category']}"
        assert body == patchwork.item_bytes(event["id"])
        assert props.delivery_mode == 2
        assert props.content_type == "application/json"
        assert props.type == event["category"]
        assert props.app_id == "patchwork-bridge"
        assert props.timestamp is not None
        cloud_event = from_binary(
            RabbitMQMessage(headers=props.headers, content_type=props.content_type, body=body),
            JSONFormat(),
        )
        assert cloud_event.get_id() == props.message_id
        assert cloud_event.get_type() == f"org.patchwork.{event['category']}"
        assert cloud_event.get_source() == f"{patchwork.url}/api/1.3"
        assert cloud_event.get_subject() == event["project"]["link_name"]
        when = cloud_event.get_time()
        assert when.utcoffset() is not None
        assert when.replace(tzinfo=None).isoformat() == event["date"]
        assert when.utcoffset() == ZoneInfo(TZ).utcoffset(when.replace(tzinfo=None))
        assert props.headers["x-patchwork-project"] == event["project"]["link_name"]
        assert props.headers["x-patchwork-category"] == event["category"]


@pytest.mark.timeout(120)
async def test_first_start_under_load_publishes_everything_created_during_start_up(
    unique, tmp_path
):
    """BRIDGE_START=now against a busy Patchwork that charges the measured serving cost:
    200 events created while the start-up read is in flight (one in ten committed up to 3 s
    late) all reach an independent tap once; none of the 3,000 older events does."""
    patchwork = FakePatchwork(tz=TZ, cost=MEASURED)
    old = patchwork.add_events(3000)
    await patchwork.start()
    reader = tap(unique)
    env = producer_env(patchwork, reader.exchange, tmp_path, START="now", POLL_INTERVAL="0.5")
    rng = random.Random(11)
    new: list[dict] = []
    hidden: set[int] = set()
    producer = await start_producer(env)
    try:
        # The start-up read is in flight once Patchwork has its first request.
        await wait_for(lambda: patchwork.events_requests >= 1, 30, "the start-up read")
        while len(new) < 200:
            new.extend(patchwork.add_events(9))
            # Dated a moment before its id (the row is built, then inserted), committed late.
            when = patchwork.now() - timedelta(seconds=rng.uniform(0, 0.04))
            late = patchwork.add_event("patch-created", "dpdk", when, visible=False)
            new.append(late)
            hidden.add(late["id"])
            asyncio.get_running_loop().call_later(
                rng.uniform(0.5, 3), reveal, patchwork, hidden, late["id"]
            )
            await asyncio.sleep(0.02)
        await wait_for(lambda: not hidden, 10, "every late event committed")
        await wait_for(lambda: len(reader.messages) >= len(new), 30, "200 events on the bus")
        await asyncio.sleep(2.0)  # a few more polls: nothing may come twice
        producer.send_signal(signal.SIGTERM)
        log = (await asyncio.wait_for(producer.communicate(), 30))[1].decode()
        assert producer.returncode == 0, log
    finally:
        if producer.returncode is None:
            producer.kill()
            await producer.wait()
        reader.stop()
        await patchwork.stop()
    assert len(new) == 200
    ids = [int(props.message_id) for _, props, _ in reader.messages]
    assert sorted(ids) == sorted(e["id"] for e in new), "each new event once, no old one"
    assert not set(ids) & {e["id"] for e in old}
