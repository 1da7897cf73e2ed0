"""Fan-out: 20 subscriptions bound to every event, delivered by the webhook role, against 20
plain consume + POST + ack loops in one process.

The same backlog is pre-loaded into every subscription's queue (one publish to the
exchange, 20 bound queues), delivered to one receiver process (answers 204; each
subscription posts to its own path). Each plain loop drains one of the queues with
prefetch = in-flight POSTs = the subscription's concurrency. The rate is every delivery
at the receiver over the time from the first to the last. Rounds alternate which side
goes first.

    python bench/fanout.py [--subscriptions 20] [--events 2000] [--concurrency 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time

import aio_pika
import aiohttp
from aio_pika.abc import AbstractIncomingMessage
from bus import declare, delete_topology, preload, queue_depth
from common import AMQP_URL, Hook, InProcessBridge, backlog_events, bridge_settings, run_id, workdir
from delivery_throughput import bare_headers
from figures import best_line, round_ratios
from receiver import Receiver

from bridge.delivery.queues import subscription_queues

DRAIN_TIMEOUT_S = 600.0


async def fanout_rate(receiver: Receiver, segments: list[str], n: int) -> float:
    """Deliveries/s over all ``segments``, once each has ``n``: first arrival to last."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    for segment in segments:
        await receiver.wait_for(segment, n, max(1.0, deadline - time.monotonic()))
    lanes = [await receiver.stats(segment) for segment in segments]
    first = min(lane.first_s for lane in lanes if lane.first_s is not None)
    last = max(lane.last_new_s for lane in lanes if lane.last_new_s is not None)
    return (n * len(segments) - 1) / max(last - first, 1e-9)


async def plain_loops(
    queues: list[str],
    urls: list[str],
    prefetch: int,
    receiver: Receiver,
    segments: list[str],
    n: int,
) -> tuple[float, float]:
    """One aio-pika consumer per queue, one connection, one aiohttp session per loop."""
    cpu_started = time.process_time()
    connection = await aio_pika.connect(AMQP_URL)
    sessions: list[aiohttp.ClientSession] = []
    try:
        for queue_name, url in zip(queues, urls, strict=True):
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=prefetch)
            queue = await channel.get_queue(queue_name)
            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=prefetch),
                timeout=aiohttp.ClientTimeout(total=15.0),
            )
            sessions.append(session)

            async def handle(
                message: AbstractIncomingMessage,
                session: aiohttp.ClientSession = session,
                url: str = url,
            ) -> None:
                headers = bare_headers(message)
                async with session.post(url, data=message.body, headers=headers) as response:
                    await response.read()
                if 200 <= response.status < 300:
                    await message.ack()
                else:
                    await message.nack(requeue=True)

            await queue.consume(handle)
        rate = await fanout_rate(receiver, segments, n)
        cpu_s = time.process_time() - cpu_started
    finally:
        for session in sessions:
            await session.close()
        await connection.close()
    return rate, cpu_s


async def webhook_role(
    settings_kw: dict[str, object], receiver: Receiver, segments: list[str], n: int
) -> tuple[float, float]:
    """The webhook role alone. Not ``run``: its producer, started without a cursor, would
    read back every event the rounds before published into the event log (the log's
    tail is what a new producer starts from) while the webhook role drains, costing
    more CPU each round (0.314 to 0.377 ms a delivery over four rounds)."""
    bridge = InProcessBridge(bridge_settings(**settings_kw), command="webhook")
    cpu_started = time.process_time()
    bridge.start()
    try:
        rate = await fanout_rate(receiver, segments, n)
        cpu_s = time.process_time() - cpu_started
    finally:
        await bridge.close()
    return rate, cpu_s


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscriptions", type=int, default=20)
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rid = run_id()
    exchange = f"bench-fanout-{rid}"
    names = [f"bench-fan{i}-{rid}" for i in range(args.subscriptions)]
    segments = [f"fan{i}" for i in range(args.subscriptions)]
    events = backlog_events(args.events)
    gc.freeze()
    rates: dict[str, list[float]] = {"webhook": [], "plain": []}
    cpu: dict[str, list[float]] = {"webhook": [], "plain": []}
    total = args.events * args.subscriptions
    try:
        async with Receiver.start() as receiver:
            urls = [receiver.url(segment) for segment in segments]
            hooks = [
                Hook(name, url, concurrency=args.concurrency)
                for name, url in zip(names, urls, strict=True)
            ]
            with workdir() as tmp:
                subscriptions = tmp / "subscriptions.toml"
                subscriptions.write_text("\n".join(hook.toml() for hook in hooks))
                await declare(exchange, subscriptions)
                for round_no in range(args.rounds):
                    order = ["webhook", "plain"] if round_no % 2 == 0 else ["plain", "webhook"]
                    for which in order:
                        await receiver.reset()
                        await preload(exchange, events)
                        if which == "plain":
                            queues = [subscription_queues(exchange, name).main for name in names]
                            rate, cpu_s = await plain_loops(
                                queues, urls, args.concurrency, receiver, segments, args.events
                            )
                        else:
                            settings_kw = {
                                "exchange": exchange,
                                "subscriptions": subscriptions,
                            }
                            rate, cpu_s = await webhook_role(
                                settings_kw, receiver, segments, args.events
                            )
                        for name in names:
                            main = subscription_queues(exchange, name).main
                            if left := await queue_depth(main):
                                raise RuntimeError(f"{main} still holds {left}")
                        rates[which].append(rate)
                        cpu[which].append(1000 * cpu_s / total)
                        print(
                            f"  round {round_no + 1} {which:8s} {rate:8,.0f} deliveries/s"
                            f"  {1000 * cpu_s / total:.3f} ms CPU/delivery",
                            flush=True,
                        )
    finally:
        await delete_topology(exchange, names)
    print(
        f"\n{args.subscriptions} subscriptions bound '#', {args.events} events each "
        f"({total:,} deliveries), concurrency = prefetch = {args.concurrency}, "
        f"{args.rounds} rounds"
    )
    print(best_line("webhook role", rates["webhook"]))
    print(best_line(f"{args.subscriptions} plain consume + POST + ack loops", rates["plain"]))
    print(
        f"  ratio webhook / plain: {max(rates['webhook']) / max(rates['plain']):.2f} best-of"
        f"   (goal >= 0.80); {round_ratios(rates['webhook'], rates['plain'])}"
    )
    print(
        f"  CPU per delivery, best: webhook {min(cpu['webhook']):.3f} ms,"
        f" plain {min(cpu['plain']):.3f} ms"
    )


if __name__ == "__main__":
    asyncio.run(main())
