"""examples/ci_consumer.py, run as a CI operator would run it, against the Patchwork double.

Messages are published by the producer's own `bridge.producer.publisher.Publisher`,
from items the double serves, so the example reads exactly what the bus carries.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from zoneinfo import ZoneInfo

import aio_pika
import pytest

from bridge.__main__ import main
from bridge.broker.topology import declare_exchange, replay_exchange
from bridge.cli.bind import bind, unbind
from bridge.delivery.history import history_queue
from bridge.demo.patchwork_double import FakePatchwork
from bridge.eventlog import declare_log, log_queue
from bridge.events import Event, parse_event
from bridge.metrics import Metrics
from bridge.producer.publisher import Publisher
from bridge.settings import load_settings
from tests.broker import AMQP_URL

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ci_consumer.py"
TZ = ZoneInfo("Australia/Canberra")


class Consumer:
    """The example as a child process; its stdout and stderr lines are collected as they come."""

    def __init__(self, exchange: str, queue: str, retry_s: float = 30.0) -> None:
        self.env = {
            **os.environ,
            "AMQP_URL": AMQP_URL,
            "EXCHANGE": exchange,
            "QUEUE": queue,
            "RETRY_S": str(retry_s),
        }
        self.out: list[str] = []
        self.err: list[str] = []
        self._proc: asyncio.subprocess.Process | None = None
        self._readers: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Consumer:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(EXAMPLE),
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert self._proc.stdout and self._proc.stderr
        self._readers = [
            asyncio.create_task(self._collect(self._proc.stdout, self.out)),
            asyncio.create_task(self._collect(self._proc.stderr, self.err)),
        ]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._proc is not None
        if self._proc.returncode is None:
            self._proc.terminate()
        await asyncio.wait_for(self._proc.wait(), 10)
        await asyncio.gather(*self._readers)

    async def interrupt(self) -> int:
        """Ctrl-C, as a terminal sends it; the exit code."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGINT)
        return await asyncio.wait_for(self._proc.wait(), 10)

    @staticmethod
    async def _collect(stream: asyncio.StreamReader, lines: list[str]) -> None:
        async for line in stream:
            lines.append(line.decode().rstrip("\n"))

    async def wait_for(self, lines: list[str], text: str, count: int = 1) -> None:
        deadline = asyncio.get_running_loop().time() + 30
        while sum(text in line for line in lines) < count:
            assert self._proc is not None
            assert self._proc.returncode is None, f"example exited: {self.err}"
            assert asyncio.get_running_loop().time() < deadline, f"no {text!r} in {lines}"
            await asyncio.sleep(0.05)


def new_event(fake: FakePatchwork, category: str, project: str) -> Event:
    """A new event of the double, as the producer reads it."""
    item = fake.add_event(category, project)
    return parse_event(item, fake.item_bytes(item["id"]).decode())


async def publish(
    channel: aio_pika.abc.AbstractChannel, exchange: str, fake: FakePatchwork, *events: Event
) -> None:
    """Through the producer's publisher, so the example reads exactly what the bus carries."""
    target = await channel.get_exchange(exchange)
    publisher = Publisher(target, f"{fake.url}/api/1.3", TZ, Metrics(), max_in_flight=10)
    assert not (await publisher.publish(events)).failed


async def leftover(channel: aio_pika.abc.AbstractChannel, queue: str) -> list[str]:
    """Message ids still in ``queue`` (taken out, so the queue is empty afterwards)."""
    q = await channel.get_queue(queue)
    ids = []
    while (message := await q.get(fail=False, timeout=5)) is not None:
        ids.append(message.message_id)
        await message.ack()
    return ids


async def test_example_tests_each_completed_series_once_and_acks_after_queueing(
    amqp: aio_pika.abc.AbstractConnection,
    exchange_name: str,
    ci_queue: str,
    patchwork: FakePatchwork,
):
    # The operator ran `patchwork-bridge bind`; the example declares the same queue again.
    settings = load_settings(amqp_url=AMQP_URL, exchange=exchange_name)
    await bind(settings, ci_queue, ["*.series-completed"])
    first = new_event(patchwork, "series-completed", "netdevbpf")
    unrelated = new_event(patchwork, "patch-created", "netdevbpf")
    last = new_event(patchwork, "series-completed", "dpdk")
    channel = await amqp.channel(publisher_confirms=True)
    # `first` twice: the producer republished it (at-least-once delivery).
    await publish(channel, exchange_name, patchwork, first, first, unrelated)
    await publish(channel, exchange_name, patchwork, last)

    async with Consumer(exchange_name, ci_queue) as consumer:
        await consumer.wait_for(consumer.out, f"event {last.message_id}:")
    # prefetch 1: `last` was delivered only after everything before it was acked.
    assert set(await leftover(channel, ci_queue)) <= {last.message_id}
    assert consumer.out[0] == (
        f"event {first.message_id}: would test series 1 v2 "
        "'improve things (series 00000.ca6a3a450)' (4 patches from the mbox)"
    )
    assert len(consumer.out) == 2, "the republished event was tested twice"
    assert consumer.err == []
    await channel.close()


async def test_example_never_acks_a_series_it_could_not_fetch(
    amqp: aio_pika.abc.AbstractConnection,
    exchange_name: str,
    ci_queue: str,
    patchwork: FakePatchwork,
):
    await bind(load_settings(amqp_url=AMQP_URL, exchange=exchange_name), ci_queue, ["#"])
    message = new_event(patchwork, "series-completed", "netdevbpf")
    await patchwork.stop()  # Patchwork is down: the mbox cannot be fetched
    channel = await amqp.channel(publisher_confirms=True)
    await publish(channel, exchange_name, patchwork, message)
    async with Consumer(exchange_name, ci_queue, retry_s=0.05) as consumer:
        # One retry after RETRY_S, then the message is parked in the dead-letter queue.
        await consumer.wait_for(consumer.err, "no mbox", count=2)
        dead_letters: list[str] = []
        deadline = asyncio.get_running_loop().time() + 10
        while not dead_letters and asyncio.get_running_loop().time() < deadline:
            dead_letters = await leftover(channel, f"{ci_queue}.dead")
    assert dead_letters == [message.message_id]
    assert consumer.out == []
    assert await leftover(channel, ci_queue) == []
    await channel.close()


async def test_example_stops_on_ctrl_c_without_a_traceback(
    amqp: aio_pika.abc.AbstractConnection,
    exchange_name: str,
    ci_queue: str,
    patchwork: FakePatchwork,
):
    settings = load_settings(amqp_url=AMQP_URL, exchange=exchange_name)
    await bind(settings, ci_queue, ["*.series-completed"])
    event = new_event(patchwork, "series-completed", "netdevbpf")
    channel = await amqp.channel(publisher_confirms=True)
    await publish(channel, exchange_name, patchwork, event)
    async with Consumer(exchange_name, ci_queue) as consumer:
        await consumer.wait_for(consumer.out, f"event {event.message_id}:")
        code = await consumer.interrupt()
    assert code == 130
    assert not any("Traceback" in line for line in consumer.err), consumer.err
    await channel.close()


async def test_replay_gives_each_bound_queue_only_its_own_events_and_the_example_takes_them(
    amqp: aio_pika.abc.AbstractConnection,
    exchange_name: str,
    ci_queue: str,
    patchwork: FakePatchwork,
    capsys: pytest.CaptureFixture[str],
):
    """A CI that joined late: its `*.series-completed` queue and a `netdevbpf.*` queue each
    get, from the log, exactly what they would have got live, under the original routing
    key; the example consumer handles a replayed copy like a live event."""
    settings = load_settings(amqp_url=AMQP_URL, exchange=exchange_name)
    netdev_queue = f"{ci_queue}-netdev"
    mix = [
        (category, project)
        for category in ("series-completed", "patch-created", "check-created")
        for project in ("netdevbpf", "dpdk", "linux-kselftest")
    ] * 2
    events = [new_event(patchwork, category, project) for category, project in mix]
    channel = await amqp.channel(publisher_confirms=True)
    await declare_exchange(channel, exchange_name)
    await declare_log(channel, settings)  # the producer's, before its first publish
    await publish(channel, exchange_name, patchwork, *events)
    await bind(settings, ci_queue, ["*.series-completed"])  # both join late
    await bind(settings, netdev_queue, ["netdevbpf.*"])
    try:
        since = min(e.date for e in events)
        for queue in (ci_queue, netdev_queue):
            code = await asyncio.to_thread(replay_into, exchange_name, queue, since)
            assert code == 0, capsys.readouterr().err
        said = capsys.readouterr().out
        assert f"replayed 6 events from {since} into {ci_queue}" in said
        assert f"replayed 6 events from {since} into {netdev_queue}" in said

        copies = {queue: await taken(channel, queue) for queue in (netdev_queue,)}
        expected = {e.message_id: e.routing_key for e in events if e.project == "netdevbpf"}
        assert {m.message_id: m.routing_key for m in copies[netdev_queue]} == expected
        assert {m.exchange for m in copies[netdev_queue]} == {
            replay_exchange(exchange_name, netdev_queue)
        }
        series = [e for e in events if e.category == "series-completed"]
        async with Consumer(exchange_name, ci_queue) as consumer:
            for event in series:
                await consumer.wait_for(consumer.out, f"event {event.message_id}:")
        assert len(consumer.out) == len(series) == 6
        assert consumer.err == []
        assert await leftover(channel, ci_queue) == []
    finally:
        await unbind(settings, netdev_queue, yes=True)
        await channel.queue_delete(log_queue(exchange_name))
        await channel.queue_delete(
            history_queue(exchange_name)
        )  # the webhook role's attempt history
        await channel.close()


def replay_into(exchange: str, queue: str, since: str) -> int:
    saved = dict(os.environ)
    os.environ.update({"BRIDGE_EXCHANGE": exchange, "BRIDGE_PATCHWORK_TIMEZONE": str(TZ)})
    try:
        return main(["replay", "--since", since, "--queue", queue])
    finally:
        os.environ.clear()
        os.environ.update(saved)


async def taken(
    channel: aio_pika.abc.AbstractChannel, queue: str
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    q = await channel.get_queue(queue)
    got = []
    while (message := await q.get(fail=False, timeout=5)) is not None:
        got.append(message)
        await message.ack()
    return got
