"""Producer catch-up rate against the floor: a plain page-and-publish-with-confirms script.

Both read the same backlog from the same Patchwork double and publish to the same
RabbitMQ with publisher confirms; the plain script does nothing else (no cursor,
no window, no headers beyond the body). A second plain script also sends the
contract's properties and headers. Prints events/s and CPU/event of each, and the
ratios; the sides alternate their order from round to round.

    python bench/publish_throughput.py [--events 20000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from zoneinfo import ZoneInfo

import aio_pika
import aiohttp
from bus import forget_log
from common import AMQP_URL
from figures import round_ratios

from bridge.demo.patchwork_double import FakePatchwork
from bridge.metrics import Metrics
from bridge.producer.role import Producer
from bridge.runtime import InProcess
from bridge.settings import Settings

TZ = ZoneInfo("Australia/Canberra")
CONTRACT = "plain script, contract headers"


@dataclass(frozen=True, slots=True)
class Measure:
    rate: float
    """Events/s, from the start until the last one is confirmed."""
    cpu_us: float
    """CPU time of this process per event; it also serves the Patchwork double's pages,
    the same pages for every side."""


async def plain_script(
    base_url: str, exchange_name: str, expected: int, *, contract_headers: bool = False
) -> Measure:
    """The floor: GET pages, publish every item with confirms, one page at a time.

    ``contract_headers`` adds the properties and ce-*/x-patchwork-* headers docs/bus.md
    requires (what it costs pamqp to encode them is the contract's, not the producer's).
    """
    started = time.perf_counter()
    cpu_started = time.process_time()
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(exchange_name)
    published = 0
    async with aiohttp.ClientSession() as session:
        url: str | None = f"{base_url}/api/1.3/events/?order=date&per_page=250"
        while url:
            async with session.get(url) as response:
                items = json.loads(await response.read())
                url = response.links.get("next", {}).get("url")
                url = str(url) if url else None
            await asyncio.gather(
                *(
                    exchange.publish(
                        plain_message(item, base_url, contract_headers),
                        f"{item['project']['link_name']}.{item['category']}",
                    )
                    for item in items
                )
            )
            published += len(items)
    elapsed = time.perf_counter() - started
    cpu_s = time.process_time() - cpu_started
    await connection.close()
    assert published == expected, published
    return Measure(expected / elapsed, 1e6 * cpu_s / expected)


def plain_message(item: dict, base_url: str, contract_headers: bool) -> aio_pika.Message:
    body = json.dumps(item).encode()
    if not contract_headers:
        return aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
    link_name, category = item["project"]["link_name"], item["category"]
    when = datetime.fromisoformat(item["date"]).replace(tzinfo=TZ)
    return aio_pika.Message(
        body,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=str(item["id"]),
        type=category,
        timestamp=datetime.now(UTC),
        app_id="patchwork-bridge",
        headers={
            "ce-specversion": "1.0",
            "ce-id": str(item["id"]),
            "ce-source": f"{base_url}/api/1.3",
            "ce-type": f"org.patchwork.{category}",
            "ce-subject": link_name,
            "ce-time": when.isoformat(),
            "x-patchwork-project": link_name,
            "x-patchwork-category": category,
        },
    )


async def bridge_producer(base_url: str, exchange_name: str, expected: int) -> Measure:
    """The real producer from an empty cursor until every event is confirmed."""
    await forget_log(exchange_name)  # else it resumes after what the last round published
    metrics = Metrics()
    with tempfile.TemporaryDirectory() as state_dir:
        settings = Settings(
            exchange=exchange_name,
            patchwork_url=base_url,
            patchwork_timezone="Australia/Canberra",
            state_dir=Path(state_dir),
            start="beginning",
            poll_interval=0.05,
        )
        started = time.perf_counter()
        cpu_started = time.process_time()
        async with InProcess([Producer(settings, metrics)]) as bridge:
            while published(metrics) < expected:
                bridge.check()
                await asyncio.sleep(0.005)
            elapsed = time.perf_counter() - started
            cpu_s = time.process_time() - cpu_started
    return Measure(expected / elapsed, 1e6 * cpu_s / expected)


def published(metrics: Metrics) -> float:
    return sum(
        s.value for s in metrics.events_published.collect()[0].samples if s.name.endswith("_total")
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    fake = FakePatchwork(tz="Australia/Canberra")
    # A backlog spread over the last days, as a producer restarting after an outage sees it.
    first = datetime.now() - timedelta(days=3)
    step = timedelta(days=3) / args.events
    for i in range(args.events):
        fake.add_event(date=first + i * step)
    base_url = await fake.start()

    exchange_name = f"bench-{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel()
    exchange = await channel.declare_exchange(
        exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await channel.declare_queue(f"{exchange_name}-all", durable=True)
    await queue.bind(exchange, "#")

    results: dict[str, list[Measure]] = {
        "plain script": [],
        CONTRACT: [],
        "patchwork-bridge producer": [],
    }
    try:
        sides = [
            ("plain script", plain_script),
            (CONTRACT, partial(plain_script, contract_headers=True)),
            ("patchwork-bridge producer", bridge_producer),
        ]
        for round_no in range(args.rounds):
            # Reversed every other round, so no side always runs first on a cold machine.
            for name, run in sides if round_no % 2 == 0 else reversed(sides):
                await queue.purge()
                results[name].append(await run(base_url, exchange_name, args.events))
    finally:
        await queue.delete(if_unused=False, if_empty=False)
        await exchange.delete()
        await connection.close()
        await forget_log(exchange_name)  # the producer's last round declared it
        await fake.stop()

    print(f"catch-up of a {args.events}-event backlog, {args.rounds} rounds, best of each")
    best = {name: max(m.rate for m in measures) for name, measures in results.items()}
    for name, rate in best.items():
        rounds = ", ".join(f"{m.rate:,.0f}" for m in results[name])
        cpu_us = min(m.cpu_us for m in results[name])
        print(
            f"  {name:32s} {rate:10,.0f} events/s   {cpu_us:5.0f} us CPU/event (best)"
            f"   (rounds: {rounds})"
        )
    rates = {name: [m.rate for m in measures] for name, measures in results.items()}
    ours = rates["patchwork-bridge producer"]
    for baseline, goal in (("plain script", "   (goal >= 0.80)"), (CONTRACT, "")):
        ratio = best["patchwork-bridge producer"] / best[baseline]
        print(
            f"  ratio producer / {baseline}: {ratio:.2f} best-of{goal};"
            f" {round_ratios(ours, rates[baseline])}"
        )


if __name__ == "__main__":
    asyncio.run(main())
