"""The checks loop, result -> check in Patchwork -> `check-created` on the bus, against a
CI posting its check to Patchwork itself.

Both run in one process against the Patchwork double, its /events/ charging the measured
serving cost (``MEASURED``: 60 ms a request, 1.9 ms an event), with the producer polling at
``--poll`` s and a CI queue bound to the exchange. The bridge side publishes each result
to the results exchange and the checks role posts it; the plain side POSTs the check
straight to the double's checks API (its own token, no dedup, no rate limit). Each side
sends ``--results`` results, one every ``--gap`` s, and takes the time from sending to
the `check-created` event arriving on the CI's queue. Then a burst of ``--burst`` results
measures checks created per second under BRIDGE_CHECKS_RATE (``--rate``).

    python bench/checks.py [--results 100] [--poll 1] [--rate 5] [--burst 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aio_pika
import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import AMQP_URL, TZ, bridge_settings, run_id
from bridge.broker.topology import declare_exchange
from bridge.checks.result import results_exchange
from bridge.checks.role import build_checks_role
from bridge.delivery.queues import checks_queues
from bridge.metrics import Metrics
from bridge.producer.role import Producer
from bridge.runtime import InProcess
from bridge.webhook.subscriptions import DEFAULT_RETRY_SCHEDULE_S
from tests.patchwork_cost import MEASURED, CostedPatchwork

TOKEN = "bench-maintainer-token-0123456789"


class CheckEvents:
    """`check-created` events on the CI's queue, by context: when each arrived."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}

    async def on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        item = json.loads(message.body)
        if item["category"] == "check-created":
            self.arrived[item["payload"]["check"]["context"]] = time.monotonic()
        await message.ack()

    async def until(self, contexts: list[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not all(c in self.arrived for c in contexts):
            if time.monotonic() > deadline:
                missing = [c for c in contexts if c not in self.arrived]
                raise TimeoutError(f"{len(missing)} check-created events missing")
            await asyncio.sleep(0.02)


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=int, default=100)
    parser.add_argument("--gap", type=float, default=0.5, help="seconds between results")
    parser.add_argument("--poll", type=float, default=1.0)
    parser.add_argument("--rate", type=float, default=5.0)
    parser.add_argument("--burst", type=int, default=50)
    args = parser.parse_args()

    exchange = f"bench-checks-{run_id()}"
    # /events/ costs what a real Patchwork's did (60 ms a request, 1.9 ms an event).
    fake = CostedPatchwork(tz=TZ, maintainers={TOKEN: {"netdevbpf"}}, cost=MEASURED)
    await fake.start()
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel(publisher_confirms=True)
    await declare_exchange(channel, exchange)
    results = await declare_exchange(channel, results_exchange(exchange))
    ci_queue = await channel.declare_queue(f"{exchange}.ci", exclusive=True)
    await ci_queue.bind(exchange, "#")
    events = CheckEvents()
    await ci_queue.consume(events.on_message)
    with tempfile.TemporaryDirectory() as state:
        settings = bridge_settings(
            exchange=exchange,
            patchwork_url=fake.url,
            patchwork_token=TOKEN,
            poll_interval=args.poll,
            state_dir=Path(state),
            checks_rate=args.rate,
        )
        roles = [Producer(settings, Metrics()), build_checks_role(settings, Metrics())]
        try:
            async with InProcess(roles) as bridge, aiohttp.ClientSession() as http:
                await bridge.wait_ready()

                async def via_bridge(context: str, patch: int) -> None:
                    body = {"patch": patch, "state": "success", "context": context}
                    await results.publish(
                        aio_pika.Message(json.dumps(body).encode()), "netdevbpf.check"
                    )

                async def plain(context: str, patch: int) -> None:
                    body = {"state": "success", "context": context}
                    async with http.post(
                        f"{fake.url}/api/1.3/patches/{patch}/checks/",
                        json=body,
                        headers={"Authorization": f"Token {TOKEN}"},
                    ) as answer:
                        answer.raise_for_status()

                figures = {}
                for label, send in (("plain: CI posts itself", plain), ("bridge", via_bridge)):
                    sent: dict[str, float] = {}
                    for n in range(args.results):
                        context = f"{label[:5]}-{n}"
                        sent[context] = time.monotonic()
                        await send(context, n + 1)
                        await asyncio.sleep(args.gap)
                    await events.until(list(sent), 60)
                    loop_s = [events.arrived[c] - t for c, t in sent.items()]
                    figures[label] = (percentile(loop_s, 50), percentile(loop_s, 99))
                    print(
                        f"{label:<24} result -> check-created on the bus: "
                        f"p50 {figures[label][0]:.2f} s, p99 {figures[label][1]:.2f} s "
                        f"({args.results} results, {args.poll:g} s poll)",
                        flush=True,
                    )
                began = time.monotonic()
                before = sum(len(c) for c in fake.checks.checks.values())
                contexts = [f"burst-{n}" for n in range(args.burst)]
                for n, context in enumerate(contexts):
                    await via_bridge(context, 1000 + n)
                while sum(len(c) for c in fake.checks.checks.values()) < before + args.burst:
                    await asyncio.sleep(0.05)
                took = time.monotonic() - began
                print(
                    f"burst of {args.burst}: {args.burst / took:.2f} checks created/s at "
                    f"BRIDGE_CHECKS_RATE={args.rate:g} (each check: 2 requests, a read and a post)"
                )
                (b50, _), (p50, _) = figures["bridge"], figures["plain: CI posts itself"]
                print(f"bridge/plain p50: {b50 / p50:.2f}")
        finally:
            drop = await connection.channel()
            for queue in checks_queues(exchange).watched(DEFAULT_RETRY_SCHEDULE_S):
                await drop.queue_delete(queue)
            await drop.exchange_delete(results_exchange(exchange))
            await drop.exchange_delete(exchange)
            await drop.queue_delete(f"{exchange}.log")
            await connection.close()
            await fake.stop()


if __name__ == "__main__":
    asyncio.run(main())
