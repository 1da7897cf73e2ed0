"""Woken by PostgreSQL against polling: how soon a committed event is on the bus, and what
each costs Patchwork.

The Patchwork double charges the measured serving cost; beside it a PostgreSQL database
(``TEST_PG_DSN``'s server, a database of this run's own) holds ``patchwork_event`` with
the wake-up trigger. Events arrive at ``--rate`` a second; one transaction in ten commits
0.5-3 s late with the date it was built with (older than events committed meanwhile). An
event's commit is the moment it becomes visible in the API and its row commits, together.
Settings, in turn, the same feed each: the producer woken by the database (safety poll
60 s, BRIDGE_POLL_INTERVAL 1 s as its fallback), and the producer polling every 1 s and
every 10 s without it (the baselines). For each: events lost, p50/p99 from commit to the
bus, Patchwork ``/events`` requests per event while mail flows and while idle.

    python bench/wakeup.py [--rate 10] [--seconds 60] [--idle 120]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

import aio_pika
import psycopg
from common import TZ, percentile, run_id
from pydantic import SecretStr

from bridge.cli.wakeup import act
from bridge.demo.patchwork_double import CATEGORIES
from bridge.metrics import Metrics
from bridge.producer.role import Producer
from bridge.runtime import InProcess
from bridge.settings import Settings
from tests.broker import AMQP_URL
from tests.patchwork_cost import MEASURED, CostedPatchwork
from tests.postgres import patchwork_database

SETTINGS = {
    "woken": "woken by PostgreSQL (safety poll 60 s)",
    "poll-1s": "polling every 1 s (baseline)",
    "poll-10s": "polling every 10 s (baseline)",
}


async def commit(db: str, fake: CostedPatchwork, event: dict, hide: bool) -> float:
    """The event's row committed and the event visible in the API, at once; returns when."""
    async with await psycopg.AsyncConnection.connect(db) as connection:
        await connection.execute(
            "INSERT INTO patchwork_event (id, category, project_id, date) "
            "VALUES (%s, %s, 1, now())",
            (event["id"], event["category"]),
        )
        if hide:
            fake.make_visible(event["id"])
        await connection.commit()
    return time.monotonic()


async def feed(db: str, fake: CostedPatchwork, rate: float, seconds: float) -> dict[str, float]:
    rng = random.Random(7)
    committed: dict[str, float] = {}
    late: list[asyncio.Task[None]] = []

    async def commit_late(event: dict, after_s: float) -> None:
        await asyncio.sleep(after_s)
        committed[str(event["id"])] = await commit(db, fake, event, hide=True)

    started = time.monotonic()
    for i in range(round(rate * seconds)):
        delay_s = started + i / rate - time.monotonic()
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        slow = rng.random() < 0.1
        event = fake.add_event(CATEGORIES[i % len(CATEGORIES)], visible=not slow)
        if slow:
            late.append(asyncio.create_task(commit_late(event, rng.uniform(0.5, 3.0))))
        else:
            committed[str(event["id"])] = await commit(db, fake, event, hide=False)
    await asyncio.gather(*late)
    return committed


async def one_setting(key: str, args: argparse.Namespace) -> None:
    rid = run_id()
    exchange = f"bench-wakeup-{rid}"
    fake = CostedPatchwork(cost=MEASURED, tz=TZ)
    await fake.start()
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel()
    ex = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await channel.declare_queue(f"{exchange}.all", durable=True)
    await queue.bind(ex, "#")
    arrived: dict[str, float] = {}

    async def got(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        arrived.setdefault(message.message_id or "", time.monotonic())
        await message.ack()

    tag = await queue.consume(got)
    try:
        async with patchwork_database(f"bench_wakeup_{rid}") as db:
            await act("install", db)
            with tempfile.TemporaryDirectory() as tmp:
                settings = Settings(
                    amqp_url=AMQP_URL,
                    exchange=exchange,
                    patchwork_url=fake.url,
                    patchwork_timezone=TZ,
                    state_dir=Path(tmp),
                    start="now",
                    log_level="WARNING",
                    poll_interval=10.0 if key == "poll-10s" else 1.0,
                    poll_safety_interval=60.0,
                    patchwork_db=SecretStr(db) if key == "woken" else None,
                )
                metrics = Metrics()
                async with InProcess([Producer(settings, metrics)]) as bridge:
                    await bridge.wait_ready(30)
                    if key == "woken":
                        while (
                            metrics.registry.get_sample_value("patchwork_bridge_wakeup_listening")
                            != 1
                        ):
                            await asyncio.sleep(0.1)
                    await asyncio.sleep(2)
                    before = len(fake.poll_times)
                    committed = await feed(db, fake, args.rate, args.seconds)
                    deadline = time.monotonic() + 30
                    while len(set(committed) - set(arrived)) and time.monotonic() < deadline:
                        await asyncio.sleep(0.1)
                    busy_requests = len(fake.poll_times) - before
                    idle_from = len(fake.poll_times)
                    await asyncio.sleep(args.idle)
                    idle_requests = len(fake.poll_times) - idle_from
    finally:
        await queue.cancel(tag)
        await channel.queue_delete(queue.name)
        await channel.exchange_delete(exchange)
        await channel.queue_delete(f"{exchange}.log")
        await connection.close()
        await fake.stop()
    lost = set(committed) - set(arrived)
    latencies = sorted(arrived[i] - at for i, at in committed.items() if i in arrived)
    p50_ms, p99_ms = (percentile(latencies, q) * 1000 for q in (0.5, 0.99))
    print(
        f"  {SETTINGS[key]:40} lost {len(lost)}/{len(committed)}  "
        f"p50 {p50_ms:7.1f} ms  p99 {p99_ms:7.1f} ms  "
        f"requests/event {busy_requests / len(committed):.2f}  "
        f"idle: {idle_requests} requests in {args.idle:g} s",
        flush=True,
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--idle", type=float, default=120.0)
    parser.add_argument("--only", choices=list(SETTINGS))
    args = parser.parse_args()
    print(
        f"{args.rate:g} events/s for {args.seconds:g} s, one in ten committing 0.5-3 s late; "
        f"Patchwork double at the measured serving cost; commit -> bus"
    )
    for key in [args.only] if args.only else list(SETTINGS):
        await one_setting(key, args)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
