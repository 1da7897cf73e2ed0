"""The producer beside a NIPA-style poller, against a Patchwork that charges for every read.

Two Patchwork doubles with the serving cost measured on a real Patchwork (60 ms a
request, 1.9 ms an event served, a COUNT per page, 4 workers) receive the same events at
the same moments: a steady rate, one in ten committed late (its id taken at insert, its
commit 0.5-3 s later), 1 % of ids burned by rolled-back mails, and a burst of series
half-way (100 events/s). The real producer polls one and publishes to the bus; the naive
poller polls the other with ``since = newest date seen + 1 us`` (what NIPA does) and
publishes the same way, with confirms. A tap on each exchange stamps arrivals. Printed
per poll interval: events lost, p50/p99 from commit to the bus (and p99 of the late
events alone), events, requests and seconds of serving Patchwork spent per event
published, and the bridge's ratios to the naive poller.

With ``--day``, what the bridge costs Patchwork against the CI pollers it replaces, over a
busy day's shape shortened: a quiet rate (maintainers, checks) and the burst. The bridge at
its defaults (10 s poll, 60 s sweep, 300 s overlap) polls one double; N NIPA-style pollers
at 120 s, out of phase with each other, poll another, for N = 1, 5 and 20 side by side.

    python bench/poll_cost.py [--intervals 0.2,1,10] [--rate 10] [--seconds 60] [--burst 300]
    python bench/poll_cost.py --day [--seconds 600] [--rate 0.5] [--pollers 1,5,20]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import aio_pika
import aiohttp
from common import AMQP_URL, TZ, fill_backlog, run_id
from figures import percentile

from bridge.demo.patchwork_double import CATEGORIES
from bridge.eventlog import log_queue
from bridge.metrics import Metrics
from bridge.producer.role import Producer
from bridge.runtime import InProcess
from bridge.settings import Settings
from tests.patchwork_cost import MEASURED, CostedPatchwork

SEED_EVENTS = 2000
LATE_FRACTION = 0.1
BURNED_FRACTION = 0.01

Per = Literal["published", "committed"]


@dataclass(frozen=True, slots=True)
class Side:
    """What one side (the bridge, or N pollers together) got and cost Patchwork."""

    name: str
    committed: int
    published: int
    lost: int
    """Summed over a side's pollers: each CI system misses its own."""
    duplicates: int
    p50_s: float
    p99_s: float
    late_p99_s: float
    served: int
    requests: int
    busy_s: float
    """Seconds of serving cost Patchwork was charged."""
    per: Per
    """What the costs are divided by: events published (one poller against another) or
    committed (a day's cost of several pollers together)."""

    @property
    def events(self) -> int:
        return max(1, self.published if self.per == "published" else self.committed)

    @property
    def served_per_event(self) -> float:
        return self.served / self.events

    @property
    def busy_ms_per_event(self) -> float:
        return 1000 * self.busy_s / self.events

    @property
    def requests_per_event(self) -> float:
        return self.requests / self.events


class Feed:
    """Adds the same events to both doubles at the same moments; records commit times."""

    def __init__(self, doubles: list[CostedPatchwork], seed: int = 5) -> None:
        self.doubles = doubles
        self.rng = random.Random(seed)
        self.committed: dict[int, float] = {}
        self.pending: set[int] = set()
        self.late: set[int] = set()

    def add(self, n: int) -> None:
        for _ in range(n):
            if self.rng.random() < BURNED_FRACTION:
                for fake in self.doubles:
                    fake.burn_ids(1)
                continue
            late = self.rng.random() < LATE_FRACTION
            category = self.rng.choice(CATEGORIES)
            ids = {fake.add_event(category, visible=not late)["id"] for fake in self.doubles}
            [event_id] = ids  # the doubles stay in step
            if late:
                self.pending.add(event_id)
                self.late.add(event_id)
                asyncio.get_running_loop().call_later(
                    self.rng.uniform(0.5, 3.0), self.commit, event_id
                )
            else:
                self.committed[event_id] = time.monotonic()

    def commit(self, event_id: int) -> None:
        for fake in self.doubles:
            fake.make_visible(event_id)
        self.pending.discard(event_id)
        self.committed[event_id] = time.monotonic()

    async def run(self, rate: float, seconds: float, burst: int) -> None:
        started = time.monotonic()
        total = round(rate * seconds)
        for i in range(total):
            delay_s = started + i / rate - time.monotonic()
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            self.add(1)
            if i == total // 2:
                # A burst of series: six parsers at full speed, about 100 events a second.
                for _ in range(burst // 10):
                    self.add(10)
                    await asyncio.sleep(0.1)
        while self.pending:
            await asyncio.sleep(0.1)


class Tap:
    """Records when each message_id first reaches a queue bound ``#`` to ``exchange``."""

    def __init__(self) -> None:
        self.arrived: dict[int, float] = {}
        self.duplicates = 0

    async def start(self, channel: aio_pika.abc.AbstractChannel, exchange: str) -> str:
        ex = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(ex, "#")

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            event_id = int(message.message_id or 0)
            if event_id in self.arrived:
                self.duplicates += 1
            else:
                self.arrived[event_id] = time.monotonic()

        return await queue.consume(on_message, no_ack=True)


async def until_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), max(0.0, seconds))


async def naive_poller(
    fake: CostedPatchwork,
    exchange: str,
    interval_s: float,
    stop: asyncio.Event,
    first_after_s: float = 0.0,
    since: datetime | None = None,
) -> None:
    """NIPA's loop: ``since`` the newest date seen plus a microsecond, every interval.

    It starts from ``since`` (default "now") and polls first after ``first_after_s``: CI
    systems polling the same Patchwork are not in phase.
    """
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel(publisher_confirms=True)
    ex = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    newest = fake.now() if since is None else since
    seen: set[int] = set()
    url = f"{fake.url}/api/1.3/events/"
    await until_stop(stop, first_after_s)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        while not stop.is_set():
            started = time.monotonic()
            since = (newest + timedelta(microseconds=1)).isoformat()
            next_url: str | None = url
            params: dict[str, str] | None = {"since": since, "order": "date", "per_page": "250"}
            while next_url is not None:
                async with http.get(next_url, params=params) as response:
                    items = json.loads(await response.text())
                    link = response.links.get("next")
                    next_url = str(link["url"]) if link else None
                params = None
                fresh = [item for item in items if item["id"] not in seen]
                await asyncio.gather(
                    *(
                        ex.publish(
                            aio_pika.Message(json.dumps(item).encode(), message_id=str(item["id"])),
                            routing_key=f"{item['project']['link_name']}.{item['category']}",
                        )
                        for item in fresh
                    )
                )
                for item in fresh:
                    seen.add(item["id"])
                    newest = max(newest, datetime.fromisoformat(item["date"]))
            await until_stop(stop, interval_s - (time.monotonic() - started))
    await connection.close()


def summarise(
    name: str,
    feed: Feed,
    taps: Sequence[Tap],
    fake: CostedPatchwork,
    before: tuple[int, int, float],
    per: Per = "published",
) -> Side:

    def delays(ids: Iterable[int]) -> list[float]:
        return sorted(
            tap.arrived[i] - feed.committed[i] for tap in taps for i in ids if i in tap.arrived
        )

    latencies, late = delays(feed.committed), delays(feed.late)
    return Side(
        name,
        len(feed.committed),
        sum(len(tap.arrived) for tap in taps),
        sum(1 for tap in taps for i in feed.committed if i not in tap.arrived),
        sum(tap.duplicates for tap in taps),
        percentile(latencies, 0.50) if latencies else float("nan"),
        percentile(latencies, 0.99) if latencies else float("nan"),
        percentile(late, 0.99) if late else float("nan"),
        fake.events_served - before[0],
        fake.events_requests - before[1],
        fake.busy_s - before[2],
        per,
    )


@dataclass
class Pair:
    """The producer and a NIPA-style poller, each on a double of its own (the measured
    serving cost) and publishing to an exchange of its own, which a ``Tap`` watches."""

    ours: CostedPatchwork
    theirs: CostedPatchwork
    naive_ex: str
    bridge_tap: Tap = field(default_factory=Tap)
    naive_tap: Tap = field(default_factory=Tap)
    metrics: Metrics = field(default_factory=Metrics)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    naive: asyncio.Task[None] | None = None
    """The naive poller, started by the caller when it should start."""


@contextlib.asynccontextmanager
async def side_by_side(
    name: str, fill: Callable[[CostedPatchwork], object], **settings: Any
) -> AsyncIterator[Pair]:
    """Both doubles filled by ``fill`` and serving, both taps, and the producer started
    with ``settings``; on the way out both sides are stopped and everything of the run's
    own is deleted from the broker, failed or not."""
    rid = run_id()
    bridge_ex = f"bench-{name}-{rid}"
    pair = Pair(
        CostedPatchwork(tz=TZ, cost=MEASURED),
        CostedPatchwork(tz=TZ, cost=MEASURED),
        f"bench-{name}-naive-{rid}",
    )
    for fake in (pair.ours, pair.theirs):
        fill(fake)
        await fake.start()
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel()
    try:
        await pair.bridge_tap.start(channel, bridge_ex)
        await pair.naive_tap.start(channel, pair.naive_ex)
        with tempfile.TemporaryDirectory() as tmp:
            config = Settings(
                amqp_url=AMQP_URL,  # type: ignore[arg-type]
                exchange=bridge_ex,
                patchwork_url=pair.ours.url,
                patchwork_timezone=TZ,
                state_dir=Path(tmp),
                http_port=0,
                **settings,
            )
            bridge = InProcess([Producer(config, pair.metrics)])
            bridge.start()
            try:
                yield pair
            finally:
                pair.stop.set()
                await asyncio.gather(bridge.close(), *([pair.naive] if pair.naive else []))
    finally:
        await channel.exchange_delete(bridge_ex)
        await channel.queue_delete(log_queue(bridge_ex))
        await channel.exchange_delete(pair.naive_ex)
        await connection.close()
        for fake in (pair.ours, pair.theirs):
            await fake.stop()


async def one_interval(args: argparse.Namespace, interval_s: float) -> tuple[Side, Side]:
    async with side_by_side(
        "poll", lambda fake: fake.add_events(SEED_EVENTS), poll_interval=interval_s, start="now"
    ) as pair:
        ours, theirs = pair.ours, pair.theirs
        feed = Feed([ours, theirs])
        # The naive poller starts with the bridge's first poll: at long intervals, when each
        # polls against the burst decides the p50.
        while ours.events_requests < 1:
            await asyncio.sleep(0.01)
        pair.naive = asyncio.create_task(naive_poller(theirs, pair.naive_ex, interval_s, pair.stop))
        # Both start from "now": wait until each has read once, then count from here.
        while theirs.events_requests < 1:
            await asyncio.sleep(0.05)
        await asyncio.sleep(interval_s + 0.5)
        base = {id(f): (f.events_served, f.events_requests, f.busy_s) for f in (ours, theirs)}
        await feed.run(args.rate, args.seconds, args.burst)
        deadline = time.monotonic() + 3 * interval_s + 10
        while time.monotonic() < deadline and (
            len(pair.bridge_tap.arrived) < len(feed.committed)
            or len(pair.naive_tap.arrived) < len(feed.committed)
        ):
            await asyncio.sleep(0.2)
    metrics, bridge_tap, naive_tap = pair.metrics, pair.bridge_tap, pair.naive_tap
    reads = {
        sample.labels["read"]: int(sample.value)
        for sample in metrics.patchwork_events_read.collect()[0].samples
        if sample.name.endswith("_total")
    }
    print(f"  bridge's reads by kind (events served, start-up included): {reads}")
    return (
        summarise("bridge", feed, [bridge_tap], ours, base[id(ours)]),
        summarise("naive poller", feed, [naive_tap], theirs, base[id(theirs)]),
    )


def line(side: Side) -> str:
    return (
        f"  {side.name:<13} lost {side.lost:>4} of {side.committed:<5} dup {side.duplicates:<3} "
        f"p50 {side.p50_s:5.2f}s  p99 {side.p99_s:5.2f}s (late {side.late_p99_s:5.2f}s)  "
        f"served/event {side.served_per_event:5.2f}  "
        f"requests/event {side.requests_per_event:5.3f}  "
        f"server ms/event {side.busy_ms_per_event:6.1f}"
    )


NIPA_INTERVAL_S = 120.0
CATCH_UP_INTERVAL_S = 10.0
"""Both sides' poll interval in ``--catch-up``: the first poll starts at once either way."""


async def catch_up(args: argparse.Namespace) -> None:
    """``--catch-up N``: back after a day away. Patchwork holds N events of the last day
    that neither side has seen; the producer (no cursor, BRIDGE_START=beginning: the double
    holds only that day) and a NIPA-style poller (``since`` a day ago) each read them all
    from a double of its own with the measured serving cost, side by side. Printed: the
    time until every event is on each side's exchange, and what it cost Patchwork."""
    n = args.catch_up
    async with side_by_side(
        "catchup",
        lambda fake: fill_backlog(fake, n, days=1.0),
        poll_interval=CATCH_UP_INTERVAL_S,
        start="beginning",
    ) as pair:
        started = time.monotonic()  # the producer's tasks have not run yet
        ours, theirs = pair.ours, pair.theirs
        first = datetime.fromisoformat(json.loads(ours.item_bytes(1))["date"])
        pair.naive = asyncio.create_task(
            naive_poller(
                theirs,
                pair.naive_ex,
                CATCH_UP_INTERVAL_S,
                pair.stop,
                since=first - timedelta(microseconds=1),
            )
        )
        done: dict[str, float] = {}
        deadline = started + 600
        while time.monotonic() < deadline and len(done) < 2:
            for name, tap in (("bridge", pair.bridge_tap), ("naive", pair.naive_tap)):
                if name not in done and len(tap.arrived) >= n:
                    done[name] = max(tap.arrived.values()) - started
            await asyncio.sleep(0.05)
    bridge_tap, naive_tap = pair.bridge_tap, pair.naive_tap
    print(
        f"{n} events of the last day unseen, both polling every {CATCH_UP_INTERVAL_S:g} s, "
        "Patchwork doubles at the measured serving cost, side by side"
    )
    for name, fake, tap in (("bridge", ours, bridge_tap), ("NIPA poller", theirs, naive_tap)):
        took = done.get("bridge" if fake is ours else "naive")
        said = "(not within 600 s)" if took is None else f"{took:6.1f} s"
        print(
            f"  {name:<12} caught up in {said}"
            f"  got {len(tap.arrived)}/{n}  dup {tap.duplicates}  requests {fake.events_requests}"
            f"  served {fake.events_served}  serving time {fake.busy_s:6.1f} s"
        )
    if len(done) == 2:
        ratio = done["bridge"] / done["naive"]
        print(f"  ratio bridge / NIPA poller, time to caught up: {ratio:.2f}")


async def day(args: argparse.Namespace) -> None:
    """``--day``: the bridge at its defaults against 1, 5 and 20 NIPA-style pollers at 120 s,
    out of phase, each on its own double and exchange, over a day's shape shortened: a quiet
    rate, one in ten committed late, 1 % of ids burned, a burst of series half-way."""
    counts = [int(n) for n in args.pollers.split(",")]
    rid = run_id()
    ours = CostedPatchwork(tz=TZ, cost=MEASURED)
    theirs = {n: CostedPatchwork(tz=TZ, cost=MEASURED) for n in counts}
    fakes = [ours, *theirs.values()]
    for fake in fakes:
        fake.add_events(SEED_EVENTS)
        await fake.start()
    feed = Feed(fakes)
    bridge_ex = f"bench-day-{rid}"
    naive_ex = {n: [f"bench-day-{rid}-n{n}-{i}" for i in range(n)] for n in counts}
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel()
    bridge_tap = Tap()
    await bridge_tap.start(channel, bridge_ex)
    naive_taps = {n: [Tap() for _ in range(n)] for n in counts}
    for n in counts:
        for tap, exchange in zip(naive_taps[n], naive_ex[n], strict=True):
            await tap.start(channel, exchange)
    stop = asyncio.Event()
    phases = random.Random(7)
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            amqp_url=AMQP_URL,  # type: ignore[arg-type]
            exchange=bridge_ex,
            patchwork_url=ours.url,
            patchwork_timezone=TZ,
            state_dir=Path(tmp),
            start="now",
            http_port=0,
        )
        producer = Producer(settings, Metrics())
        bridge = InProcess([producer])
        bridge.start()
        pollers = [
            asyncio.create_task(
                naive_poller(
                    theirs[n], exchange, NIPA_INTERVAL_S, stop, phases.uniform(0, NIPA_INTERVAL_S)
                )
            )
            for n in counts
            for exchange in naive_ex[n]
        ]
        # Count from the moment the bridge has read once (its start-up read is not the day).
        while ours.events_requests < 1:
            await asyncio.sleep(0.05)
        await asyncio.sleep(settings.poll_interval + 0.5)
        base = {id(f): (f.events_served, f.events_requests, f.busy_s) for f in fakes}
        print(
            f"{args.rate:g} events/s for {args.seconds:g} s with a burst of {args.burst} "
            f"half-way; bridge at its defaults (poll {settings.poll_interval:g} s, sweep "
            f"{settings.poll_sweep_interval:g} s), NIPA-style pollers every "
            f"{NIPA_INTERVAL_S:g} s",
            flush=True,
        )
        await feed.run(args.rate, args.seconds, args.burst)
        # Every side gets one more full interval to read what came last.
        deadline = time.monotonic() + NIPA_INTERVAL_S + 15
        every_tap = [bridge_tap, *(tap for n in counts for tap in naive_taps[n])]
        while time.monotonic() < deadline and any(
            len(tap.arrived) < len(feed.committed) for tap in every_tap
        ):
            await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(bridge.close(), *pollers)
    bridge_cost = summarise("bridge", feed, [bridge_tap], ours, base[id(ours)], "committed")
    naive_costs = {
        n: summarise(
            f"{n} NIPA poller{'s' if n > 1 else ''}",
            feed,
            naive_taps[n],
            theirs[n],
            base[id(theirs[n])],
            "committed",
        )
        for n in counts
    }
    await channel.exchange_delete(bridge_ex)
    await channel.queue_delete(log_queue(bridge_ex))
    for n in counts:
        for exchange in naive_ex[n]:
            await channel.exchange_delete(exchange)
    await connection.close()
    for fake in fakes:
        await fake.stop()
    print(f"  {bridge_cost.committed} events committed")
    for side in (bridge_cost, *naive_costs.values()):
        print(
            f"  {side.name:<16} requests/event {side.requests_per_event:6.3f}  "
            f"served/event {side.served_per_event:6.2f}  "
            f"server ms/event {side.busy_ms_per_event:7.1f}  "
            f"lost {side.lost:>5}  dup {side.duplicates}  "
            f"p50 {side.p50_s:6.2f} s  p99 {side.p99_s:6.2f} s"
        )
    for n, side in naive_costs.items():
        print(
            f"  bridge / {n:>2} pollers: requests {bridge_cost.requests / side.requests:5.2f}  "
            f"served {bridge_cost.served / side.served:5.2f}  "
            f"server time {bridge_cost.busy_s / side.busy_s:5.2f}  "
            f"p50 {bridge_cost.p50_s / side.p50_s:5.2f}"
        )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--intervals", default="0.2,1,10", help="poll intervals, seconds")
    parser.add_argument("--rate", type=float, help="events per second (10; --day: 0.5)")
    parser.add_argument("--seconds", type=float, help="how long events arrive (60; --day: 600)")
    parser.add_argument("--burst", type=int, default=300, help="events added at once, mid-way")
    parser.add_argument(
        "--day",
        action="store_true",
        help="the bridge at its defaults against NIPA-style pollers at 120 s, over a day's shape",
    )
    parser.add_argument("--pollers", default="1,5,20", help="--day: numbers of NIPA pollers")
    parser.add_argument(
        "--catch-up",
        type=int,
        metavar="N",
        help="back after a day away: N unseen events of the last day, bridge vs NIPA poller",
    )
    args = parser.parse_args()
    if args.rate is None:
        args.rate = 0.5 if args.day else 10.0
    if args.seconds is None:
        args.seconds = 600.0 if args.day else 60.0
    if args.catch_up:
        await catch_up(args)
        return
    if args.day:
        await day(args)
        return
    print(
        f"{args.rate:g} events/s for {args.seconds:g}s, a burst of {args.burst} at 100/s, "
        f"{LATE_FRACTION:.0%} committed 0.5-3 s late, {BURNED_FRACTION:.0%} ids burned; "
        f"Patchwork cost {MEASURED.request_s * 1000:g} ms/request + "
        f"{MEASURED.per_event_s * 1000:g} ms/event + "
        f"{MEASURED.count_per_row_s * 1e6:g} us/row counted, {MEASURED.workers} workers"
    )
    for interval_s in (float(x) for x in args.intervals.split(",")):
        ours, theirs = await one_interval(args, interval_s)
        print(f"poll every {interval_s:g}s")
        print(line(ours))
        print(line(theirs))
        print(
            f"  ratios        p50 {ours.p50_s / theirs.p50_s:.2f} (goal <= 1.3)  "
            f"served/event {ours.served_per_event / theirs.served_per_event:.2f}  "
            f"server time {ours.busy_ms_per_event / theirs.busy_ms_per_event:.2f}  "
            f"lost {ours.lost} (goal 0)"
        )


if __name__ == "__main__":
    asyncio.run(main())
