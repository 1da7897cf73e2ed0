"""The whole path, Patchwork to receiver: ``run`` against a plain script doing the same job.

Both read the same backlog from the same Patchwork double (``order=date``, 250 a page,
following ``rel="next"``), publish each page with confirms to a topic exchange, consume a
queue bound ``#`` with prefetch = in-flight POSTs = the concurrency, POST each event to the
same receiver process (answers 204) and ack. The plain script does nothing else: no
cursor, no event log, no window, no signature, no metrics. A second plain script sends the
headers docs/webhooks.md requires, to tell what the contract costs from what the bridge
costs. The rate is taken at the receiver, first delivery to last; the time to the first
delivery (connecting, declaring, a first start's wait on an empty event log) is printed
beside it, and the whole job's rate (start to last delivery). Rounds alternate which side
goes first.

    python bench/whole_path.py [--events 4000] [--concurrency 16] [--rounds 3] [--cost none]
                               [--loop asyncio]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import aiohttp
from aio_pika.abc import AbstractIncomingMessage
from bus import delete_topology
from common import (
    AMQP_URL,
    TZ,
    Hook,
    InProcessBridge,
    add_cost_option,
    add_loop_option,
    bridge_settings,
    fill_backlog,
    run_id,
    run_on,
    serving_cost,
    workdir,
    write_subscriptions,
)
from delivery_throughput import bare_headers, contract_headers
from figures import best_line, round_ratios
from receiver import Receiver
from spy import py_spy, py_spy_summary

from tests.patchwork_cost import CostedPatchwork

SEGMENT = "path"
DRAIN_TIMEOUT_S = 300.0
VARIANTS = {
    "run": "patchwork-bridge run (producer + webhook)",
    "plain": "plain script: pages, confirms, consume, POST, ack",
    "plain-signed": "plain script sending the contract's headers",
}


@dataclass(frozen=True, slots=True)
class Measure:
    rate: float
    """Deliveries/s at the receiver, first delivery to last."""
    first_s: float
    """Start to the first delivery."""
    job_rate: float
    """Events/s from the start (connecting, declaring, a first start) to the last delivery."""
    cpu_ms: float
    """CPU time of this process per delivery (the Patchwork double's share is the same for
    every variant)."""


async def plain_script(
    patchwork_url: str,
    exchange: str,
    receiver: Receiver,
    n: int,
    concurrency: int,
    headers_of: Callable[[AbstractIncomingMessage], dict[str, str]],
) -> tuple[float, float]:
    """Poll every page, publish with confirms, consume, POST, ack: (start, CPU seconds)."""
    started, cpu_started = time.monotonic(), time.process_time()
    connection = await aio_pika.connect(AMQP_URL)
    queue_name = f"{exchange}.plain"
    try:
        publishing = await connection.channel(publisher_confirms=True)
        target = await publishing.declare_exchange(
            exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        consuming = await connection.channel()
        await consuming.set_qos(prefetch_count=concurrency)
        queue = await consuming.declare_queue(queue_name, durable=True)
        await queue.bind(exchange, "#")
        url = receiver.url(SEGMENT)
        connector = aiohttp.TCPConnector(limit=concurrency)
        timeout = aiohttp.ClientTimeout(total=15.0)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

            async def deliver(message: AbstractIncomingMessage) -> None:
                async with http.post(url, data=message.body, headers=headers_of(message)) as r:
                    await r.read()
                if 200 <= r.status < 300:
                    await message.ack()
                else:
                    await message.nack(requeue=True)

            tag = await queue.consume(deliver)
            next_url: str | None = f"{patchwork_url}/api/1.3/events/"
            params: dict[str, str] | None = {"order": "date", "per_page": "250"}
            while next_url is not None:
                async with http.get(next_url, params=params) as response:
                    text = await response.text()
                    link = response.links.get("next")
                next_url, params = (str(link["url"]) if link else None), None
                items = [(item, json.dumps(item).encode()) for item in json.loads(text)]
                await asyncio.gather(
                    *(
                        target.publish(
                            aio_pika.Message(
                                body,
                                message_id=str(item["id"]),
                                content_type="application/json",
                                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                            ),
                            routing_key=f"{item['project']['link_name']}.{item['category']}",
                        )
                        for item, body in items
                    )
                )
            await receiver.wait_for(SEGMENT, n, DRAIN_TIMEOUT_S)
            cpu_s = time.process_time() - cpu_started
            await queue.cancel(tag)
        await consuming.queue_delete(queue_name)
        await consuming.exchange_delete(exchange)
    finally:
        await connection.close()
    return started, cpu_s


async def bridge_run(
    settings_kw: dict[str, object], receiver: Receiver, n: int
) -> tuple[float, float]:
    """``run`` from a first start (no cursor, no event log) to the last delivery."""
    bridge = InProcessBridge(bridge_settings(**settings_kw))
    started, cpu_started = time.monotonic(), time.process_time()
    bridge.start()
    try:
        await receiver.wait_for(SEGMENT, n, DRAIN_TIMEOUT_S, check=bridge.check)
        cpu_s = time.process_time() - cpu_started
    finally:
        await bridge.close()
    return started, cpu_s


async def one_round(
    args: argparse.Namespace,
    round_no: int,
    receiver: Receiver,
    patchwork_url: str,
    tmp: Path,
    results: dict[str, list[Measure]],
) -> None:
    order = list(VARIANTS) if round_no % 2 == 0 else list(reversed(VARIANTS))
    n = args.events
    for which in order:
        await receiver.reset()
        rid = run_id()
        exchange, name = f"bench-path-{rid}", f"bench-path-{rid}"
        try:
            if which == "run":
                hook = Hook(name, receiver.url(SEGMENT), concurrency=args.concurrency)
                subscriptions = write_subscriptions(tmp / f"subscriptions-{rid}.toml", [hook])
                settings_kw = {
                    "exchange": exchange,
                    "patchwork_url": patchwork_url,
                    "subscriptions": subscriptions,
                    "state_dir": tmp / f"state-{rid}",
                    "start": "beginning",
                    "poll_interval": 1.0,
                }
                spy = Path(f"{args.py_spy}-{round_no + 1}.txt") if args.py_spy else None
                async with py_spy(spy):
                    started, cpu_s = await bridge_run(settings_kw, receiver, n)
                if spy is not None:
                    print(py_spy_summary(spy, n, top=60))
            else:
                headers_of = bare_headers if which == "plain" else contract_headers
                started, cpu_s = await plain_script(
                    patchwork_url, exchange, receiver, n, args.concurrency, headers_of
                )
        finally:
            if which == "run":
                await delete_topology(exchange, [name])
        stats = await receiver.stats(SEGMENT)
        assert stats.first_s is not None and stats.last_new_s is not None
        measure = Measure(
            stats.rate(),
            stats.first_s - started,
            n / (stats.last_new_s - started),
            1000 * cpu_s / n,
        )
        results[which].append(measure)
        print(
            f"  round {round_no + 1} {VARIANTS[which]:50s} {measure.rate:8,.0f} deliveries/s"
            f"  first after {measure.first_s:5.2f} s  whole job {measure.job_rate:6,.0f} events/s"
            f"  {measure.cpu_ms:.3f} ms CPU/delivery",
            flush=True,
        )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    add_cost_option(parser)
    add_loop_option(parser)
    parser.add_argument(
        "--py-spy", metavar="PREFIX", help="sample run with py-spy into PREFIX-<round>.txt"
    )
    return parser.parse_args()


async def main(args: argparse.Namespace) -> None:
    fake = CostedPatchwork(tz=TZ, cost=serving_cost(args))
    fill_backlog(fake, args.events)
    gc.freeze()  # the backlog lives as long as the run: keep the collector off it
    results: dict[str, list[Measure]] = {which: [] for which in VARIANTS}
    url = await fake.start()
    try:
        async with Receiver.start() as receiver:
            with workdir() as tmp:
                for round_no in range(args.rounds):
                    await one_round(args, round_no, receiver, url, tmp, results)
    finally:
        await fake.stop()
    print(
        f"\n{args.events} events, Patchwork double -> exchange -> queue -> 204 receiver, "
        f"concurrency {args.concurrency}, {args.rounds} rounds, serving cost {args.cost}, "
        f"event loop {args.loop}"
    )
    for which, label in VARIANTS.items():
        print(best_line(label, [m.rate for m in results[which]]))
    rates = {which: [m.rate for m in measures] for which, measures in results.items()}
    best = {which: max(r) for which, r in rates.items()}
    for baseline in ("plain", "plain-signed"):
        print(
            f"  ratio run / {baseline}: {best['run'] / best[baseline]:.2f} best-of"
            f"{'   (goal >= 0.80)' if baseline == 'plain' else ''};"
            f" {round_ratios(rates['run'], rates[baseline])}"
        )
    jobs = {which: [m.job_rate for m in measures] for which, measures in results.items()}
    print(
        f"  whole job (start to last delivery), run / plain: "
        f"{max(jobs['run']) / max(jobs['plain']):.2f} best-of;"
        f" {round_ratios(jobs['run'], jobs['plain'])}"
    )
    cpu = ", ".join(f"{w} {min(m.cpu_ms for m in results[w]):.3f} ms" for w in VARIANTS)
    first = ", ".join(f"{w} {min(m.first_s for m in results[w]):.2f} s" for w in VARIANTS)
    print(f"  CPU of this process per delivery, best: {cpu}")
    print(f"  start to first delivery, best: {first}")


if __name__ == "__main__":
    arguments = parse_args()
    run_on(arguments.loop, lambda: main(arguments))
