"""A CI receiver back after a day away: its backlog drained, beside a healthy subscription.

``run`` (producer + webhook role, in this process) with two subscriptions of every event:
``healthy`` (answers 204) and ``away`` (answers 503 until it comes back, then 204; its
circuit breaker on). N events pass while ``away`` is away (pre-loaded through the
exchange as the producer publishes them): ``healthy`` gets them, ``away``'s breaker opens
and holds the rest in its queue. Then ``away`` comes back. Printed: the time from its
return until its whole backlog is delivered (the breaker's next probe included), its
deliveries/s from the first delivery to the last, and the healthy subscription's p50/p99
(Patchwork double -> receiver) for events fed at ``--rate`` during the drain.
Baseline in the same run: a plain aio-pika consume + aiohttp POST + ack loop draining the
same backlog from a queue of its own, same prefetch, same receiver process.

    python bench/day_away.py [--events 20000] [--rate 20] [--probe 2]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import time

import aio_pika
from bus import declare, delete_topology, preload
from common import (
    AMQP_URL,
    TZ,
    Hook,
    InProcessBridge,
    backlog_events,
    bridge_settings,
    run_id,
    workdir,
    write_subscriptions,
)
from figures import percentile
from plain import drain
from receiver import Receiver

from bridge.demo.patchwork_double import CATEGORIES, FakePatchwork

DRAIN_TIMEOUT_S = 600.0
CONCURRENCY = 16


async def bridge_side(args: argparse.Namespace, receiver: Receiver) -> dict[str, float]:
    rid = run_id()
    exchange = f"bench-away-{rid}"
    healthy, away = f"healthy-{rid}", f"away-{rid}"
    events = backlog_events(args.events)
    fake = FakePatchwork(tz=TZ)
    fake.burn_ids(args.events)  # what it serves during the drain is not in the backlog
    await fake.start()
    await receiver.reset()
    hooks = [
        Hook(healthy, receiver.url("healthy"), concurrency=CONCURRENCY),
        Hook(
            away,
            receiver.url("away"),
            concurrency=CONCURRENCY,
            extra=(f"breaker_probe = {args.probe}", f"breaker_probe_max = {args.probe}"),
        ),
    ]
    try:
        with workdir() as tmp:
            subscriptions = write_subscriptions(tmp / "subscriptions.toml", hooks)
            await declare(exchange, subscriptions)
            settings = bridge_settings(
                exchange=exchange,
                patchwork_url=fake.url,
                subscriptions=subscriptions,
                state_dir=tmp / "state",
                poll_interval=1.0,
                start="now",
            )
            bridge = InProcessBridge(settings)
            bridge.start()
            try:
                await bridge.wait_ready()
                started = time.monotonic()
                await preload(exchange, events)
                await receiver.wait_for("healthy", len(events), DRAIN_TIMEOUT_S, bridge.check)
                passed_s = time.monotonic() - started
                open_ = bridge.metrics.registry.get_sample_value(
                    "patchwork_bridge_webhook_breaker_open", {"subscription": away}
                )
                await receiver.release()  # away is back
                back = time.monotonic()
                added: dict[str, float] = {}
                feeding = asyncio.create_task(feed_into(fake, args.rate, added))
                try:
                    backlog = await drained(receiver, args.events, bridge)
                finally:
                    feeding.cancel()
                # Those fed during the drain: what arrives after it is not its business.
                await receiver.wait_for("healthy", len(events) + len(added), 60, bridge.check)
                arrivals = await receiver.arrivals("healthy")
                lat = sorted(arrivals[i] - at for i, at in added.items() if i in arrivals)
            finally:
                await bridge.close()
    finally:
        await delete_topology(exchange, [h.name for h in hooks])
        await fake.stop()
    first, last = min(backlog), max(backlog)
    return {
        "passed_s": passed_s,
        "breaker_open": open_ or 0.0,
        "caught_up_s": last - back,
        "first_s": first - back,
        "rate": (len(backlog) - 1) / (last - first),
        "healthy_p50": percentile(lat, 0.5),
        "healthy_p99": percentile(lat, 0.99),
        "healthy_n": len(lat),
    }


async def drained(receiver: Receiver, n: int, bridge: InProcessBridge) -> list[float]:
    """When each backlog event (ids 1..n) reached ``away``, once all have."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while True:
        arrivals = await receiver.arrivals("away")
        got = [arrivals[str(i)] for i in range(1, n + 1) if str(i) in arrivals]
        if len(got) == n:
            return got
        bridge.check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"away: {len(got)} of {n} backlog events")
        await asyncio.sleep(0.5)


async def feed_into(fake: FakePatchwork, rate: float, added: dict[str, float]) -> None:
    """``rate`` events a second into the double until cancelled; webhook-id -> time added."""
    started = time.monotonic()
    for i in itertools.count():
        delay_s = started + i / rate - time.monotonic()
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        event = fake.add_event(CATEGORIES[i % len(CATEGORIES)])
        added[str(event["id"])] = time.monotonic()


async def plain_side(args: argparse.Namespace, receiver: Receiver) -> float:
    """The plain loop draining the same backlog from a queue of its own: deliveries/s."""
    rid = run_id()
    exchange, queue = f"bench-away-plain-{rid}", f"bench-away-plain-{rid}"
    await receiver.reset()
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        declared = await channel.declare_queue(queue, durable=True)
        await declared.bind(exchange, "#")
        try:
            await preload(exchange, backlog_events(args.events))
            result = await drain(queue, receiver, "plain", args.events, CONCURRENCY)
        finally:  # a failed or interrupted run leaves nothing of its own either
            await channel.queue_delete(queue)
            await channel.exchange_delete(exchange)
    finally:
        await connection.close()
    return result.rate


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rate", type=float, default=20.0, help="healthy's events/s meanwhile")
    parser.add_argument("--probe", type=float, default=2.0, help="breaker_probe(_max), s")
    args = parser.parse_args()
    async with Receiver.start() as receiver:
        ours = await bridge_side(args, receiver)
        plain = await plain_side(args, receiver)
    print(
        f"{args.events} events while one subscription's receiver was away (healthy beside "
        f"it), then back; breaker probe every {args.probe:g} s; concurrency {CONCURRENCY}"
    )
    print(
        f"  the events passed in {ours['passed_s']:.1f} s; away's breaker open then: "
        f"{'yes' if ours['breaker_open'] else 'no'}"
    )
    print(
        f"  away, back: first delivery after {ours['first_s']:.1f} s, caught up after "
        f"{ours['caught_up_s']:.1f} s, {ours['rate']:,.0f} deliveries/s"
    )
    print(f"  plain consume + POST + ack loop, same backlog: {plain:,.0f} deliveries/s")
    print(f"  ratio: {ours['rate'] / plain:.2f}")
    print(
        f"  healthy meanwhile ({int(ours['healthy_n'])} events at {args.rate:g}/s): "
        f"p50 {ours['healthy_p50']:.3f} s  p99 {ours['healthy_p99']:.3f} s"
    )


if __name__ == "__main__":
    asyncio.run(main())
