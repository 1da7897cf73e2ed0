"""Woken by PostgreSQL against polling: how soon a committed event is on the bus, and what
each costs Patchwork.

The Patchwork double's events live in PostgreSQL (``TEST_PG_DSN``'s server, a database of
this run's own; ``tests/pg_patchwork.py``), with the wake-up trigger, and it charges the
measured serving cost. Events are written as Patchwork writes them, ``--rate`` a second:
dated when built, inserted a moment later (its id from the sequence), and committed; one
transaction in ten stays open 0.5-3 s (committing after newer ones), one in a hundred rolls
back; half-way, six feeders write a burst as fast as they can (their dates and ids cross,
as on a real Patchwork). Settings, in turn, the same feed each: the producer woken by the
database (safety poll 60 s, BRIDGE_POLL_INTERVAL 1 s as its fallback), the producer polling
every 0.2, 1 and 10 s without it, the 0.2 s and 1 s ones each beside a NIPA-style poller
at the same interval on the same feed (``since`` = newest date seen + 1 us; an API double
of its own over the same table).
For each: events lost, p50/p99 from commit to the bus, Patchwork ``/events`` requests per
committing transaction while mail flows and while idle; and how far dates and ids crossed.

    python bench/wakeup.py [--rate 10] [--seconds 60] [--burst 300] [--idle 120]
                           [--only woken,0.2s,1s,10s] [--verbose]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import aio_pika
from common import TZ, run_id
from figures import percentile
from poll_cost import naive_poller
from pydantic import SecretStr

from bridge.cli.wakeup import act
from bridge.demo.patchwork_double import CATEGORIES
from bridge.metrics import Metrics
from bridge.producer.role import Producer
from bridge.runtime import InProcess
from bridge.settings import Settings
from tests.broker import AMQP_URL
from tests.patchwork_cost import MEASURED
from tests.pg_patchwork import CostedPgPatchwork, crossings
from tests.postgres import patchwork_database

SETTINGS = {
    "woken": "woken by PostgreSQL (safety poll 60 s)",
    "poll-0.2s": "polling every 0.2 s",
    "nipa-0.2s": "NIPA-style poller every 0.2 s",
    "poll-1s": "polling every 1 s",
    "nipa-1s": "NIPA-style poller every 1 s",
    "poll-10s": "polling every 10 s",
}
RUNS = {"woken": ["woken"], "0.2s": ["poll-0.2s", "nipa-0.2s"], "1s": ["poll-1s", "nipa-1s"],
        "10s": ["poll-10s"]}  # fmt: skip
"""What runs side by side on one feed: each poll interval beside a NIPA-style poller."""
FEEDERS = 6
"""Mail feeders at full speed during the burst, as on the real Patchwork measured."""


async def feed(
    fake: CostedPgPatchwork, rate: float, seconds: float, burst: int
) -> tuple[dict, list, set]:
    """Commit times by event id, the committed events (for their dates and ids), and the
    ids of those committed late.
    Half-way, ``burst`` events from six feeders writing as fast as they can."""
    rng = random.Random(7)
    committed: dict[str, float] = {}
    events: list[dict] = []
    late: set[str] = set()
    writers: list[asyncio.Task[None]] = []

    async def write(i: int) -> None:
        slow = rng.random() < 0.1
        event = await fake.write(
            CATEGORIES[i % len(CATEGORIES)],
            build_s=min(rng.expovariate(1 / 0.002), 0.02),
            hold_s=rng.uniform(0.5, 3.0) if slow else 0.0,
            commit=rng.random() >= 0.01,
        )
        if event is not None:
            committed[str(event["id"])] = time.monotonic()
            events.append(event)
            if slow:
                late.add(str(event["id"]))

    async def feeder(first: int) -> None:
        for i in range(first, burst, FEEDERS):
            await write(i)

    started = time.monotonic()
    total = round(rate * seconds)
    for i in range(total):
        delay_s = started + i / rate - time.monotonic()
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        writers.append(asyncio.create_task(write(i)))
        if i == total // 2 and burst:
            began = time.monotonic()
            await asyncio.gather(*(feeder(f) for f in range(FEEDERS)))
            started += time.monotonic() - began
    await asyncio.gather(*writers)
    return committed, events, late


@dataclass
class Side:
    """One reader of Patchwork (the producer in one setting, or a NIPA-style poller), on an
    API double of its own over the shared table, publishing to an exchange of its own."""

    key: str
    db: str
    fake: CostedPgPatchwork = field(init=False)
    exchange: str = field(default_factory=lambda: f"bench-wakeup-{run_id()}")
    arrived: dict[str, float] = field(default_factory=dict)
    busy: int = 0
    idle: int = 0
    kinds: str = ""
    """The busy requests by kind: counts (one-event pages), open-ended reads, ranges."""

    @property
    def interval_s(self) -> float:
        return 1.0 if self.key == "woken" else float(self.key.split("-")[1].removesuffix("s"))

    @asynccontextmanager
    async def running(self, channel: aio_pika.abc.AbstractChannel) -> AsyncIterator[None]:
        self.fake = CostedPgPatchwork(dsn=self.db, cost=MEASURED, tz=TZ)
        await self.fake.start()
        ex = await channel.declare_exchange(
            self.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(f"{self.exchange}.all", durable=True)
        await queue.bind(ex, "#")

        async def got(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            self.arrived.setdefault(message.message_id or "", time.monotonic())
            await message.ack()

        tag = await queue.consume(got)
        try:
            if self.key.startswith("nipa-"):
                stop = asyncio.Event()
                naive = asyncio.create_task(
                    naive_poller(self.fake, self.exchange, self.interval_s, stop)  # type: ignore[arg-type]
                )
                try:
                    yield
                finally:
                    stop.set()
                    await naive
            else:
                async with self._producer():
                    yield
        finally:
            await queue.cancel(tag)
            await channel.queue_delete(queue.name)
            await channel.exchange_delete(self.exchange)
            await channel.queue_delete(f"{self.exchange}.log")
            await self.fake.stop()

    @asynccontextmanager
    async def _producer(self) -> AsyncIterator[None]:
        with tempfile.TemporaryDirectory() as tmp:
            settings = Settings(
                amqp_url=AMQP_URL,
                exchange=self.exchange,
                patchwork_url=self.fake.url,
                patchwork_timezone=TZ,
                state_dir=Path(tmp),
                start="now",
                log_level="WARNING",
                poll_interval=self.interval_s,
                poll_safety_interval=60.0,
                patchwork_db=SecretStr(self.db) if self.key == "woken" else None,
            )
            metrics = Metrics()
            async with InProcess([Producer(settings, metrics)]) as bridge:
                await bridge.wait_ready(30)
                if self.key == "woken":
                    while metrics.registry.get_sample_value(LISTENING) != 1:
                        await asyncio.sleep(0.1)
                yield


LISTENING = "patchwork_bridge_wakeup_listening"


async def one_run(keys: list[str], args: argparse.Namespace) -> None:
    """The sides ``keys`` side by side on one feed."""
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel()
    try:
        async with patchwork_database(f"bench_wakeup_{run_id()}") as db:
            await act("install", db)
            sides = [Side(key, db) for key in keys]
            async with AsyncExitStack() as stack:
                for side in sides:
                    await stack.enter_async_context(side.running(channel))
                await asyncio.sleep(2)
                before = [side.fake.events_requests for side in sides]
                logged = [len(side.fake.requests) for side in sides]
                committed, events, late = await feed(
                    sides[0].fake, args.rate, args.seconds, args.burst
                )
                settle_s = max(side.interval_s for side in sides) + 2
                await asyncio.sleep(settle_s if "woken" not in keys else 2)
                for side, b, n in zip(sides, before, logged, strict=True):
                    side.busy = side.fake.events_requests - b
                    side.kinds = request_kinds(side.fake.requests[n:])
                idle_from = [side.fake.events_requests for side in sides]
                await asyncio.sleep(args.idle)
                for side, b in zip(sides, idle_from, strict=True):
                    side.idle = side.fake.events_requests - b
    finally:
        await connection.close()
    crossed = sorted(crossings(events))
    most = max(crossed, default=timedelta(0)).total_seconds() * 1000
    print(f"  dates crossed ids: {len(crossed)} events, by up to {most:.1f} ms")
    for side in sides:
        report(side, committed, late, args)
    if len(sides) == 2:
        ours, theirs = sides
        both = [i for i in committed if i in theirs.arrived and i in ours.arrived]

        def p99(side: Side) -> float:
            return percentile(sorted(side.arrived[i] - committed[i] for i in both), 0.99)

        print(
            f"  on the {len(both)} events both got: p99 {p99(ours) * 1000:.0f} ms against "
            f"{p99(theirs) * 1000:.0f} ms ({p99(ours) / p99(theirs):.2f}x, goal <= 1.5x); "
            f"requests {ours.busy / max(1, theirs.busy):.2f}x (goal <= 2x)",
            flush=True,
        )


def request_kinds(queries: list[dict[str, str]]) -> str:
    counts = sum(1 for q in queries if q.get("per_page") == "1")
    ranges = sum(1 for q in queries if q.get("per_page") != "1" and "before" in q)
    return f"{counts} counts, {len(queries) - counts - ranges} reads, {ranges} ranges"


def report(side: Side, committed: dict, late: set, args: argparse.Namespace) -> None:
    arrived = side.arrived
    lost = set(committed) - set(arrived)
    latencies = sorted(arrived[i] - at for i, at in committed.items() if i in arrived)
    p50_ms, p99_ms = (percentile(latencies, q) * 1000 for q in (0.5, 0.99))
    late_s = sorted(arrived[i] - committed[i] for i in late if i in arrived)
    if args.verbose:
        print("   late:", [round(x, 2) for x in late_s])
    print(
        f"  {SETTINGS[side.key]:40} lost {len(lost)}/{len(committed)}  "
        f"p50 {p50_ms:7.1f} ms  p99 {p99_ms:7.1f} ms "
        f"(late commits: p99 {percentile(late_s, 0.99) * 1000:.0f} ms, "
        f"{len(late_s)}/{len(late)} got)  "
        f"requests/transaction {side.busy / len(committed):.2f} ({side.kinds})  "
        f"idle: {side.idle} requests in {args.idle:g} s",
        flush=True,
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--idle", type=float, default=120.0)
    parser.add_argument("--verbose", action="store_true", help="every late event's latency")
    parser.add_argument("--burst", type=int, default=300, help="events from six feeders, mid-way")
    parser.add_argument("--only", help=f"comma-separated, of {', '.join(RUNS)}")
    args = parser.parse_args()
    print(
        f"{args.rate:g} events/s for {args.seconds:g} s and {args.burst} from {FEEDERS} feeders "
        "mid-way, one in ten committing 0.5-3 s late, one in a hundred rolled back; the "
        "PostgreSQL double at the measured serving cost; commit -> bus"
    )
    for run in args.only.split(",") if args.only else list(RUNS):
        await one_run(RUNS[run], args)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
