"""The producer process as a CI runs it, read back by an independent AMQP client (pika)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pika
import pytest
from cloudevents.core.bindings.rabbitmq import RabbitMQMessage, from_binary
from cloudevents.core.formats.json import JSONFormat

from bridge.demo.patchwork_double import FakePatchwork
from bridge.eventlog import log_queue
from tests.amqp_helpers import wait_for
from tests.broker import AMQP_URL
from tests.fault_tools import tail
from tests.patchwork_cost import MEASURED, CostedPatchwork

pytestmark = pytest.mark.broker

TZ = "Australia/Canberra"


class PikaReader(threading.Thread):
    """Consumes a queue bound with ``#`` the way a CI system written with pika would."""

    def __init__(self, exchange: str, queue: str) -> None:
        super().__init__(daemon=True)
        self.exchange, self.queue = exchange, queue
        self.messages: list[tuple[pika.spec.Basic.Deliver, pika.BasicProperties, bytes]] = []
        self.arrived_at: list[float] = []
        """``time.monotonic()`` when each message was taken off the queue."""
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
            self.arrived_at.append(time.monotonic())
        channel.queue_delete(self.queue)
        channel.exchange_delete(self.exchange)
        channel.queue_delete(log_queue(self.exchange))
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


async def start_producer(env: dict[str, str], log: Path) -> asyncio.subprocess.Process:
    """The producer with its log in ``log``: a file, not a pipe, which fills when not read
    and then blocks the producer's every log line."""
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge", "producer", env=env, stderr=out
        )


async def stop_producer(process: asyncio.subprocess.Process, log: Path) -> str:
    """SIGTERM, then the whole log once it has exited."""
    process.send_signal(signal.SIGTERM)
    await asyncio.wait_for(process.wait(), 30)
    return log.read_text()


async def feed(
    patchwork: FakePatchwork,
    added: list[dict],
    hidden: set[int],
    stop: asyncio.Event,
    *,
    faults: bool = True,
) -> None:
    """New mail keeps arriving; one event in ten commits late with an older date;
    now and then (``faults``) Patchwork answers a request with an error."""
    rng = random.Random(7)
    last_fault = -5
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
        # At most one request in five fails: a fault per request, not per second, or a
        # producer backing off would meet one at every try.
        if faults and rng.random() < 0.1 and patchwork.events_requests >= last_fault + 5:
            last_fault = patchwork.events_requests
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
    # The feed dates late events up to 5 s before their id's neighbours: beyond a gap's
    # range, so the sweep finds them; every 5 s here instead of 60.
    env = producer_env(
        patchwork, reader.exchange, tmp_path,
        START="beginning", POLL_INTERVAL="0.2", POLL_LATE_WAIT="30", PATCHWORK_TIMEOUT="2",
        POLL_SWEEP_INTERVAL="5",
    )  # fmt: skip
    stop_feeding = asyncio.Event()
    hidden: set[int] = set()
    feeder = asyncio.create_task(feed(patchwork, added, hidden, stop_feeding))
    try:
        first = await start_producer(env, tmp_path / "first.log")
        try:
            await wait_for(lambda: len(reader.messages) >= 100, 30, "the first publishing")
        finally:
            first_log = await stop_producer(first, tmp_path / "first.log")
        assert first.returncode == 0, first_log
        second = await start_producer(env, tmp_path / "second.log")
        await asyncio.sleep(2.0)
        stop_feeding.set()
        await feeder
        patchwork.make_visible(*hidden)
        hidden.clear()
        try:
            await wait_for(lambda: len(reader.messages) >= len(added), 30)
            await asyncio.sleep(1.0)  # a few more polls: nothing may come twice
        finally:
            second_log = await stop_producer(second, tmp_path / "second.log")
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
    patchwork = CostedPatchwork(tz=TZ, cost=MEASURED)
    old = patchwork.add_events(3000)
    await patchwork.start()
    reader = tap(unique)
    env = producer_env(patchwork, reader.exchange, tmp_path, START="now", POLL_INTERVAL="0.5")
    rng = random.Random(11)
    new: list[dict] = []
    hidden: set[int] = set()
    log_file = tmp_path / "producer.log"
    producer = await start_producer(env, log_file)
    try:
        # The start-up read is in flight once Patchwork has its first request.
        await wait_for(lambda: patchwork.events_requests >= 1, 30, "the start-up read")
        while len(new) < 200:
            # Dated a moment before its id (the row is built, then inserted), committed late.
            # Mail goes on arriving after it: a late event with no newer id above it is a
            # gap nobody knows of yet, found by the sweep (a minute) rather than a check.
            when = patchwork.now() - timedelta(seconds=rng.uniform(0, 0.04))
            late = patchwork.add_event("patch-created", "dpdk", when, visible=False)
            new.append(late)
            hidden.add(late["id"])
            asyncio.get_running_loop().call_later(
                rng.uniform(0.5, 3), reveal, patchwork, hidden, late["id"]
            )
            new.extend(patchwork.add_events(9))
            await asyncio.sleep(0.02)
        await wait_for(lambda: not hidden, 10, "every late event committed")
        try:
            await wait_for(lambda: len(reader.messages) >= len(new), 30, "200 events on the bus")
        except AssertionError as error:
            missing = sorted(
                {e["id"] for e in new} - {int(p.message_id) for _, p, _ in reader.messages}
            )
            raise AssertionError(
                f"{error}; {len(missing)} missing, first {missing[:10]}; the producer's log:\n"
                + tail(log_file, 40)
            ) from None
        await asyncio.sleep(2.0)  # a few more polls: nothing may come twice
        log = await stop_producer(producer, log_file)
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


def poller_pid(user_agent: str) -> int:
    """The pid in the producer's User-Agent: ``patchwork-bridge/x (host:pid)``."""
    return int(user_agent.rsplit(":", 1)[1].rstrip(")"))


@pytest.mark.timeout(240)
async def test_two_producers_one_poller_survive_five_kills_of_the_poller(unique, tmp_path):
    """Two producers on one exchange; the one polling is killed with SIGKILL five times
    during a catch-up (a fresh standby started each time). Every event reaches an
    independent tap; duplicates stay within the events in flight at each kill; and the
    double never sees two producers polling in turn: each poller's requests are one run."""
    patchwork = CostedPatchwork(tz=TZ, cost=MEASURED)
    added = patchwork.add_events(6000)
    await patchwork.start()
    reader = tap(unique)
    logs: list[Path] = []
    processes: list[asyncio.subprocess.Process] = []

    async def start(index: int) -> asyncio.subprocess.Process:
        env = producer_env(
            patchwork, reader.exchange, tmp_path / f"state-{index}",
            START="beginning", POLL_INTERVAL="0.2", POLL_LATE_WAIT="30", PATCHWORK_TIMEOUT="5",
            POLL_SWEEP_INTERVAL="5",  # late events of the feed are the sweep's to find
        )  # fmt: skip
        logs.append(tmp_path / f"producer-{index}.log")
        process = await start_producer(env, logs[-1])
        processes.append(process)
        return process

    def polling() -> asyncio.subprocess.Process | None:
        if not patchwork.pollers:
            return None
        pid = poller_pid(patchwork.pollers[-1])
        return next((p for p in processes if p.pid == pid and p.returncode is None), None)

    stop_feeding = asyncio.Event()
    hidden: set[int] = set()
    feeder: asyncio.Task[None] | None = None
    killed: list[int] = []
    killed_at: list[float] = []
    try:
        await start(0)
        await start(1)
        feeder = asyncio.create_task(feed(patchwork, added, hidden, stop_feeding, faults=False))
        for kill in range(5):
            wanted = len(reader.messages) + 250
            await wait_for(lambda n=wanted: len(reader.messages) >= n, 60, "progress")
            await wait_for(lambda: polling() is not None, 30, "a producer polling")
            victim = polling()
            assert victim is not None
            victim.kill()  # SIGKILL: no cursor saved, no lock released by the process
            killed_at.append(time.monotonic())
            await victim.wait()
            killed.append(victim.pid)
            await start(2 + kill)
        stop_feeding.set()
        await feeder
        patchwork.make_visible(*hidden)
        hidden.clear()
        await wait_for(lambda: len({p.message_id for _, p, _ in reader.messages}) >= len(added),
                       90, "every event on the bus")  # fmt: skip
        await asyncio.sleep(2.0)  # a few more polls: nothing may come again
    finally:
        stop_feeding.set()
        for process in processes:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            if process.returncode is None:
                try:
                    await asyncio.wait_for(process.wait(), 30)
                except TimeoutError:
                    process.kill()
                    await process.wait()
        reader.stop()
        await patchwork.stop()

    ids = Counter(int(props.message_id) for _, props, _ in reader.messages)
    assert set(ids) == {e["id"] for e in added}, "every event reached the tap"
    duplicates = sum(n - 1 for n in ids.values())
    # The poller publishes a page (250) at a time, confirms before its next: at most the
    # page in flight per kill can come again.
    assert duplicates <= 5 * 250, duplicates
    runs = [poller_pid(agent) for agent in patchwork.pollers]
    turns = [pid for i, pid in enumerate(runs) if i == 0 or runs[i - 1] != pid]
    assert len(turns) == len(set(turns)), f"two producers polled in turn: {turns}"
    assert set(killed) <= set(turns)
    # Takeover: from each kill to the new poller's first request, and to the first event
    # the tap got that the new poller read (arrived after that request).
    first_request = [
        next(t for t, a in zip(patchwork.poll_times, patchwork.pollers, strict=True)
             if t > kill_time and poller_pid(a) not in killed[: i + 1])
        for i, kill_time in enumerate(killed_at)
    ]  # fmt: skip
    first_event = [next(t for t in reader.arrived_at if t > request) for request in first_request]
    request_s = [r - k for r, k in zip(first_request, killed_at, strict=True)]
    event_s = [e - k for e, k in zip(first_event, killed_at, strict=True)]
    print(
        f"\n5 kills of the poller: {len(ids)} events, {duplicates} published twice, "
        f"{len(turns)} pollers in turn, {len(runs)} requests; kill -> new poller's first "
        f"request: {', '.join(f'{s:.1f}' for s in request_s)} s; -> its first event at the "
        f"tap: {', '.join(f'{s:.1f}' for s in event_s)} s"
    )
