"""What the bridge costs Patchwork against the CI pollers it replaces, over a day's shape.

A busy Patchwork's day, shortened: a quiet rate of events (maintainers, checks), one in
ten committed 0.5-3 s late, 1 % of ids burned, and a burst of series half-way (six parsers
at full speed, 100 events/s). Patchwork doubles charge the serving cost measured on a real
Patchwork (60 ms a request, 1.9 ms an event served, a COUNT per page, 4 workers) and all
receive the same events at the same moments. The bridge, with its default settings
(10 s poll, 60 s sweep, 300 s overlap), polls one; N NIPA-style pollers at 120 s
(``since`` = newest date seen + 1 us, out of phase with each other) poll another, for
N = 1, 5 and 20 side by side in the same run. Printed: requests, events served and
seconds of serving per event committed, events lost, and p50/p99 from commit to the bus.

    python bench/day_cost.py [--seconds 600] [--rate 0.5] [--burst 300] [--pollers 1,5,20]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from pathlib import Path

import aio_pika
from common import AMQP_URL, TZ, run_id
from poll_cost import SEED_EVENTS, Feed, Tap, naive_poller, summarise

from bridge.eventlog import log_queue
from bridge.metrics import Metrics
from bridge.producer.role import Producer
from bridge.runtime import InProcess
from bridge.settings import Settings
from tests.patchwork_cost import MEASURED, CostedPatchwork

NIPA_INTERVAL_S = 120.0


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="how long events arrive")
    parser.add_argument("--rate", type=float, default=0.5, help="quiet events per second")
    parser.add_argument("--burst", type=int, default=300, help="events of the burst, mid-way")
    parser.add_argument("--pollers", default="1,5,20", help="numbers of NIPA-style pollers")
    args = parser.parse_args()
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


if __name__ == "__main__":
    asyncio.run(main())
