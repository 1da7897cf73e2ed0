"""Faults a deployment meets: kill -9, cut broker connections, dead consumers, flaky receivers.

Everything runs against the real RabbitMQ (unique names, deleted afterwards; the broker
itself is never stopped), the Patchwork double and real aiohttp receivers on loopback.
Each test asserts the outcome that matters to a CI system: every event arrives, and
repeats only where at-least-once delivery allows them.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import aio_pika
import pytest

from bridge.broker.connect import connection_name
from bridge.demo.patchwork_double import FakePatchwork
from bridge.logs import quiet_libraries
from bridge.metrics import Metrics
from bridge.runtime import InProcess, build_roles
from bridge.settings import Settings
from bridge.webhook.subscriptions import Subscription, load_subscriptions
from tests.amqp_helpers import (
    cut_connection,
    delete_subscription_queues,
    drain,
    lane,
    publish_events,
    wait_for,
)
from tests.fault_tools import (
    QueueWatch,
    answering_by_id,
    bridge_env,
    kill_bridge,
    start_bridge,
    stop_bridge,
    tail,
    write_subscription,
)
from tests.receiver import Receiver

TZ = "Australia/Canberra"
StartBridge = Callable[[str, dict[str, str]], Awaitable[asyncio.subprocess.Process]]
PAGE = 250
# The producer publishes one page at a time and writes its cursor in the background after
# every confirmed page (a write takes milliseconds, a page far longer), so a kill can lose
# the confirmations of at most the page in flight and the one whose write was under way.
IN_FLIGHT_MAX = 2 * PAGE


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with Receiver() as hook:
        yield hook


@pytest.fixture
async def bridges(tmp_path: Path) -> AsyncIterator[StartBridge]:
    """Starts ``python -m bridge <command>`` logging to tmp_path; kills what a failed test left."""
    started: list[asyncio.subprocess.Process] = []

    async def start(command: str, env: dict[str, str]) -> asyncio.subprocess.Process:
        started.append(await start_bridge(command, env, tmp_path / f"{command}.log"))
        return started[-1]

    yield start
    for process in started:
        if process.returncode is None:
            await kill_bridge(process)


@pytest.fixture
async def cleanup(
    amqp: aio_pika.abc.AbstractConnection, exchange_name: str
) -> AsyncIterator[list[Subscription]]:
    """Subscriptions appended here have all their queues deleted after the test."""
    made: list[Subscription] = []
    yield made
    await delete_subscription_queues(amqp, exchange_name, made)


# 1. kill -9 of the producer during a catch-up ------------------------------------------------


@pytest.mark.timeout(150)
async def test_producer_killed_five_times_mid_catch_up_loses_nothing(
    patchwork: FakePatchwork,
    exchange_name: str,
    bound_queue: str,
    tmp_path: Path,
    bridges: StartBridge,
) -> None:
    events = patchwork.add_events(6000)
    every_id = {e["id"] for e in events}
    env = bridge_env(
        patchwork_url=patchwork.url,
        patchwork_timezone=TZ,
        exchange=exchange_name,
        state_dir=str(tmp_path / "state"),
        start="beginning",
        poll_interval="0.2",
        poll_late_wait="60",
        patchwork_timeout="5",
    )
    log = tmp_path / "producer.log"  # where bridges() sends its output
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    # Each process's messages, in queue order; after a kill, what the dead process left.
    segments: list[list[int]] = []
    async with QueueWatch() as watch:
        for kill in range(5):
            producer = await bridges("producer", env)
            # A random moment once publishing is under way: after 1 to 700 new messages.
            threshold = rng.randint(1, 700)

            async def published_enough(
                producer: asyncio.subprocess.Process = producer, threshold: int = threshold
            ) -> bool:
                if producer.returncode is not None:
                    raise AssertionError(f"producer exited early:\n{tail(log)}")
                return await watch.depth(bound_queue) >= threshold

            await wait_for(published_enough, 30, f"{threshold} messages before kill {kill + 1}")
            await kill_bridge(producer)
            left = await watch.settled_depth(bound_queue)
            messages = await drain(bound_queue, expected=left)
            segments.append([int(m.message_id) for m in messages])
            seen = {i for segment in segments for i in segment}
            assert len(seen) < len(every_id), f"kill {kill + 1} came after the catch-up ended"

        # The sixth start finishes the catch-up; a few more polls must add nothing.
        producer = await bridges("producer", env)
        last: list[int] = []
        missing = every_id - {i for segment in segments for i in segment}

        def complete(got: list[aio_pika.abc.AbstractIncomingMessage]) -> bool:
            if len(got) > len(last):  # called once before the first message, then per message
                last.append(int(got[-1].message_id))
                missing.discard(last[-1])
            return not missing

        await drain(bound_queue, expected=len(missing), until=complete, timeout=60)
        polls = patchwork.events_requests
        await wait_for(lambda: patchwork.events_requests >= polls + 3, 10, "three more polls")
        assert await stop_bridge(producer) == 0, tail(log)
        last += [int(m.message_id) for m in await drain(bound_queue, expected=0, timeout=0.5)]
        segments.append(last)

    arrived = Counter(i for segment in segments for i in segment)
    assert set(arrived) == every_id, "every event arrived"
    duplicates_per_kill = []
    for kill in range(5):
        before = {i for segment in segments[: kill + 1] for i in segment}
        again = [i for i in segments[kill + 1] if i in before]
        duplicates_per_kill.append(len(again))
        # Only what was in flight comes again: the newest events the dead process sent.
        newest = max(before)
        assert all(newest - IN_FLIGHT_MAX < i <= newest for i in again), (kill, again[:10])
    print(
        f"\nkill -9 x5 (seed {seed}): {len(every_id)} events, {arrived.total()} messages, "
        f"duplicates per kill {duplicates_per_kill}, left by each killed process "
        f"{[len(s) for s in segments[:-1]]}"
    )
    assert all(d <= IN_FLIGHT_MAX for d in duplicates_per_kill), duplicates_per_kill
    # Each process repeats nothing on its own: repeats only cross a kill.
    assert all(max(Counter(s).values()) == 1 for s in segments if s)


# 2. broker connections cut under `run` ---------------------------------------------------------


@pytest.fixture
def quiet_libraries_installed() -> Iterator[None]:
    """bridge.logs.quiet_libraries as the CLI installs it, undone after the test."""
    names = ("aio_pika", "aiormq", "aiohttp.access", "aiormq.connection", "aio_pika.tools")
    saved = {
        name: (logging.getLogger(name).level, logging.getLogger(name).filters[:]) for name in names
    }
    quiet_libraries()
    yield
    for name, (level, filters) in saved.items():
        logging.getLogger(name).setLevel(level)
        logging.getLogger(name).filters[:] = filters


@pytest.mark.timeout(120)
async def test_run_recovers_from_cut_broker_connections_and_loses_nothing(
    patchwork: FakePatchwork,
    receiver: Receiver,
    exchange_name: str,
    unique: str,
    tmp_path: Path,
    cleanup: list[Subscription],
    caplog: pytest.LogCaptureFixture,
    quiet_libraries_installed: None,
) -> None:
    path = write_subscription(
        tmp_path / "subscriptions.toml",
        f"cut-{unique}",
        receiver.url(),
        retry_schedule=[0.2, 0.5, 1, 1, 1],
        timeout=5.0,
    )
    cleanup.extend(load_subscriptions(path))
    settings = Settings(
        exchange=exchange_name,
        patchwork_url=patchwork.url,
        patchwork_timezone=TZ,
        state_dir=tmp_path / "state",
        start="beginning",
        poll_interval=0.1,
        poll_late_wait=60.0,
        patchwork_timeout=2.0,
        subscriptions=path,
    )
    added = {e["id"] for e in patchwork.add_events(1000)}
    # At most 16 x 50 deliveries/s: a backlog waits in the queue and 16 deliveries are in
    # flight when the connections go.
    receiver.latency_s = 0.02
    caplog.set_level(logging.INFO)
    roles = build_roles("run", settings, Metrics())
    assert [role.name for role in roles] == ["producer", "webhook"]
    bridge = InProcess(roles)
    bridge.start()

    async def feed(batches: int) -> None:
        """Mail keeps arriving, so both roles have work before and after the cut."""
        for _ in range(batches):
            added.update(e["id"] for e in patchwork.add_events(20))
            await asyncio.sleep(0.05)

    def delivered_ids() -> set[int]:
        return {int(i) for i in receiver.delivered()}

    try:
        await feed(20)
        await wait_for(lambda: len(delivered_ids()) >= 400, 30, "400 deliveries before the cut")
        bridge.check()
        # Like a network fault on both connections at once; the broker itself stays up.
        # The exact name, not a prefix: with other
        # bridges on this broker, "...:1870" would also cut process 18705's connection.
        cut = await asyncio.gather(
            cut_connection(connection_name("producer")), cut_connection(connection_name("webhook"))
        )
        assert cut == [1, 1]
        cut_at = asyncio.get_running_loop().time()
        await feed(20)
        remaining = 30 - (asyncio.get_running_loop().time() - cut_at)
        await wait_for(
            lambda: delivered_ids() >= added, remaining, "every event delivered after the cut"
        )
        recovered_s = asyncio.get_running_loop().time() - cut_at
        await bridge.wait_ready(10)  # both roles recovered; raises if one gave up instead
    finally:
        await bridge.close()  # raises what a role failed with
    assert delivered_ids() == added
    assert len(added) == 1800
    # What the operator reads: one line per role each way, no library errors or tracebacks.
    ours = [r.getMessage() for r in caplog.records if r.name == "bridge.broker.connect"]
    for role in ("producer", "webhook"):
        lost = [m for m in ours if m.startswith(f"{role}: lost its RabbitMQ connection")]
        assert len(lost) == 1 and "CONNECTION_FORCED - test: connection cut" in lost[0]
        assert sum(m.startswith(f"{role}: connected to RabbitMQ again") for m in ours) == 1
    library = [r for r in caplog.records if r.name.startswith(("aio_pika", "aiormq"))]
    assert [(r.name, r.levelname, r.msg) for r in library if r.levelno >= logging.WARNING] == []
    print(
        f"\nconnection cut: {len(added)} events all delivered {recovered_s:.1f}s after the cut, "
        f"{len(receiver.requests)} POSTs, "
        f"{sum(receiver.successes.values()) - len(added)} repeated deliveries"
    )


# 3. webhook process killed while events wait in retry queues ---------------------------------


@pytest.mark.timeout(90)
async def test_events_in_retry_queues_are_delivered_after_the_consumer_is_killed(
    receiver: Receiver,
    exchange_name: str,
    unique: str,
    tmp_path: Path,
    cleanup: list[Subscription],
    bridges: StartBridge,
) -> None:
    healthy = False
    receiver.handler = answering_by_id(receiver, lambda _id: (204 if healthy else 500, 0.0))
    path = write_subscription(
        tmp_path / "subscriptions.toml",
        f"killed-{unique}",
        receiver.url(),
        # The first wait outlasts the kill: no event comes back to the dying consumer, whose
        # kill between a retry copy's confirm and the original's ack would (rightly) leave
        # a duplicate and spoil the exact count below.
        retry_schedule=[4, 1, 1],
        breaker_failures=0,  # all 30 fail at first: the breaker would hold them back
        timeout=5.0,
    )
    (subscription,) = load_subscriptions(path)
    cleanup.append(subscription)
    main = lane(exchange_name, subscription.name).main
    retry = lane(exchange_name, subscription.name).retry(4.0)  # one level: no hop between
    env = bridge_env(exchange=exchange_name, subscriptions=str(path))
    log = tmp_path / "webhook.log"  # where bridges() sends its output
    ids = {str(i) for i in range(1000, 1030)}
    async with QueueWatch() as watch:

        async def parked(where: list[str]) -> bool:
            return sum([await watch.depth(q) for q in where]) == len(ids)

        async def consuming() -> bool:
            return await watch.consumers(main) > 0

        async def all_acked() -> bool:
            return await watch.unacked(main) == 0

        webhook = await bridges("webhook", env)
        await wait_for(consuming, 30, f"a consumer on {main}")
        await publish_events(exchange_name, [("patch-created", int(i)) for i in sorted(ids)])
        # Every first attempt got a 500: all 30 events wait out their 4 s in the retry queue.
        await wait_for(lambda: parked([retry]), 10, "all 30 in the retry queue")
        # A copy is confirmed before its original is acked; killed in between, the original
        # would come back as well (a duplicate, rightly), and spoil the exact counts below.
        await wait_for(all_acked, 20, f"every original acked in {main}")
        await kill_bridge(webhook)
        assert {hit.webhook_id for hit in receiver.requests} == ids
        assert not receiver.delivered()
        # Nothing went down with the process: with no consumer left, each event waits out
        # its 4 s and is back in the main queue. (Summing the retry and main depths in two
        # reads would race with that move and could count an event twice.)
        await wait_for(lambda: parked([main]), 10, "all 30 back in the main queue")
        assert await watch.depth(retry) == 0

        healthy = True
        webhook = await bridges("webhook", env)
        await wait_for(lambda: receiver.delivered() == ids, 30, "all 30 after the restart")
        assert await stop_bridge(webhook) == 0, tail(log)
        assert await watch.depth(lane(exchange_name, subscription.name).dead) == 0
        assert await watch.depth(main) == 0 and await watch.depth(retry) == 0

    assert all(count == 1 for count in receiver.successes.values())
    assert {i for i, status in receiver.answers if status == 500} == ids


# 3b. webhook process killed over and over with deliveries in flight (RabbitMQ 4) ------------


@pytest.mark.timeout(240)
async def test_events_in_flight_survive_25_kills_of_the_webhook_on_quorum_queues(
    receiver: Receiver,
    exchange_name: str,
    unique: str,
    tmp_path: Path,
    cleanup: list[Subscription],
    bridges: StartBridge,
) -> None:
    """Each kill returns the 5 unacked events to their quorum queue, which counts a
    delivery; RabbitMQ 4.0 drops a message after 20 when the queue does not say otherwise."""
    receiver.handler = answering_by_id(receiver, lambda _id: (204, 3600.0))  # never in time
    path = write_subscription(
        tmp_path / "subscriptions.toml", f"kills-{unique}", receiver.url(), timeout=600.0
    )
    (subscription,) = load_subscriptions(path)
    cleanup.append(subscription)
    main, dead = (
        lane(exchange_name, subscription.name).main,
        lane(exchange_name, subscription.name).dead,
    )
    env = bridge_env(exchange=exchange_name, subscriptions=str(path), queue_type="quorum")
    ids = {str(i) for i in range(2000, 2005)}
    async with QueueWatch() as watch:

        async def all_in_flight() -> bool:
            return await watch.unacked(main) == len(ids)

        for kill in range(25):
            webhook = await bridges("webhook", env)
            if kill == 0:
                await wait_for(lambda: watch.consumers(main), 30, f"a consumer on {main}")
                await publish_events(exchange_name, [("patch-created", int(i)) for i in ids])
            await wait_for(all_in_flight, 30, f"5 deliveries in flight before kill {kill + 1}")
            await kill_bridge(webhook)
        assert await watch.settled_depth(main) + await watch.depth(dead) == len(ids)
    # The broker counted all 5 unacked at every kill; whether each POST had left the
    # process by then is a race, so the receiver's count is no measure of the kills.
    assert {hit.webhook_id for hit in receiver.requests} == ids


# 4. a receiver that fails 30% of the time ------------------------------------------------------

FLAKY_TIMEOUT_S = 1.0
"""The subscription's timeout. Not smaller: a 2xx answered at once must reach the bridge
before it, even on a loaded machine, or the retry is a legitimate repeat."""


@pytest.mark.timeout(120)
async def test_flaky_receiver_gets_every_event_and_answers_2xx_once_per_webhook_id(
    receiver: Receiver,
    exchange_name: str,
    unique: str,
    tmp_path: Path,
    cleanup: list[Subscription],
) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    failures: Counter[str] = Counter()
    attempts = 1 + 8  # the schedule below

    def flaky(webhook_id: str) -> tuple[int, float]:
        """30% fail: half with a 5xx, half by stalling past the timeout. An event that
        failed on all but its last attempt gets through, so no event can be dead-lettered
        by chance (0.3^9 per event): what is tested is the retrying, not the dice."""
        roll = rng.random()
        if roll >= 0.3 or failures[webhook_id] >= attempts - 1:
            return rng.choice([200, 202, 204]), 0.0
        failures[webhook_id] += 1
        if roll < 0.15:
            return rng.choice([500, 502, 503, 504]), 0.0
        return 500, 2 * FLAKY_TIMEOUT_S

    receiver.handler = answering_by_id(receiver, flaky)
    path = write_subscription(
        tmp_path / "subscriptions.toml",
        f"flaky-{unique}",
        receiver.url(),
        retry_schedule=[0.2, 0.5, 1, 1, 1, 1, 1, 1],
        timeout=FLAKY_TIMEOUT_S,
        concurrency=16,
    )
    (subscription,) = load_subscriptions(path)
    cleanup.append(subscription)
    metrics = Metrics()
    settings = Settings(exchange=exchange_name, subscriptions=path, queue_depth_interval=0.5)
    (consumer,) = build_roles("webhook", settings, metrics)
    bridge = InProcess([consumer])
    bridge.start()
    ids = {str(i) for i in range(2000, 2200)}
    try:
        await bridge.wait_ready(20)
        await publish_events(exchange_name, [("patch-created", int(i)) for i in sorted(ids)])
        await wait_for(lambda: receiver.delivered() == ids, 60, "every event delivered")

        def delivered_count() -> float:
            value = metrics.registry.get_sample_value(
                "patchwork_bridge_webhook_deliveries_total",
                {"subscription": subscription.name, "outcome": "delivered"},
            )
            return value or 0.0

        # The bridge has settled every event: no attempt is left that could still succeed.
        await wait_for(lambda: delivered_count() == len(ids), 10, "every delivery settled")
    finally:
        await bridge.close()

    timeouts = metrics.registry.get_sample_value(
        "patchwork_bridge_webhook_failures_total",
        {"subscription": subscription.name, "reason": "timeout"},
    )
    print(
        f"\nflaky receiver (seed {seed}): {len(ids)} events, {len(receiver.requests)} POSTs, "
        f"{sum(failures.values())} failed ({receiver.held} stalled past the timeout), "
        f"most failures of one event {max(failures.values(), default=0)}"
    )
    repeated = {i: n for i, n in receiver.successes.items() if n != 1}
    assert not repeated, f"2xx more than once: {repeated}; bridge timeouts {timeouts}"
    assert (timeouts or 0) == receiver.held, "only stalled requests timed out"
    assert sum(failures.values()) > 0.2 * len(ids)  # the receiver did fail a lot
