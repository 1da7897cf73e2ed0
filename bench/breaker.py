"""A receiver down for a "weekend" beside a healthy one: what each gets, in one run.

``run`` (producer + webhook role, in this process) delivers events added to the Patchwork
double at a steady rate to two subscriptions of every event: ``healthy``, whose receiver
answers 204 at once, and ``down``, whose receiver answers 503 to everything (the weekend).
The baseline is the healthy subscription alone, in the same run. Printed: the healthy
receiver's latency (add_event -> arrival) p50 and p99 in both settings, and what the down
receiver got: attempts before its circuit breaker opened, and probes after.

    python bench/breaker.py [--rate 50] [--seconds 30] [--probe 2] [--probe-max 8]
"""

from __future__ import annotations

import argparse
import asyncio

from bus import delete_topology
from common import TZ, Hook, InProcessBridge, bridge_settings, run_id, workdir, write_subscriptions
from figures import percentile
from latency import feed
from receiver import Receiver

from bridge.demo.patchwork_double import FakePatchwork


async def one_setting(
    args: argparse.Namespace, receiver: Receiver, beside_down: bool
) -> tuple[list[float], int, float]:
    """Healthy latencies (sorted), the down receiver's requests, and its probes."""
    rid = run_id()
    exchange = f"bench-breaker-{rid}"
    healthy, down = f"healthy-{rid}", f"down-{rid}"
    fake = FakePatchwork(tz=TZ)
    await fake.start()
    await receiver.reset()
    hooks = [Hook(healthy, receiver.url("healthy"))]
    if beside_down:
        hooks.append(
            Hook(
                down,
                receiver.url("down"),
                extra=(
                    "retry_schedule = [1, 1, 1]",  # without the breaker: dead in 3 s
                    f"breaker_probe = {args.probe}",
                    f"breaker_probe_max = {args.probe_max}",
                ),
            )
        )
    try:
        with workdir() as tmp:
            settings = bridge_settings(
                exchange=exchange,
                patchwork_url=fake.url,
                subscriptions=write_subscriptions(tmp / "subscriptions.toml", hooks),
                state_dir=tmp / "state",
                poll_interval=1.0,
                start="now",
            )
            bridge = InProcessBridge(settings)
            bridge.start()
            try:
                await bridge.wait_ready()
                added = await feed(fake, args.rate, args.seconds)
                await receiver.wait_for("healthy", len(added), 60, check=bridge.check)
                arrivals = await receiver.arrivals("healthy")
                down_requests = (await receiver.stats("down")).requests
                probes = sum(
                    bridge.metrics.registry.get_sample_value(
                        "patchwork_bridge_webhook_breaker_probes_total",
                        {"subscription": down, "result": result},
                    )
                    or 0.0
                    for result in ("ok", "failed", "empty")
                )
                dead = bridge.metrics.registry.get_sample_value(
                    "patchwork_bridge_webhook_deliveries_total",
                    {"subscription": down, "outcome": "dead_lettered"},
                )
            finally:
                await bridge.close()
    finally:
        await delete_topology(exchange, [h.name for h in hooks])
        await fake.stop()
    if beside_down:
        print(f"  (down: {int(dead or 0)} dead-lettered)")
    return sorted(arrivals[i] - at for i, at in added.items()), down_requests, probes


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--probe", type=float, default=2.0)
    parser.add_argument("--probe-max", type=float, default=8.0)
    args = parser.parse_args()
    async with Receiver.start() as receiver:
        alone, _, _ = await one_setting(args, receiver, beside_down=False)
        beside, requests, probes = await one_setting(args, receiver, beside_down=True)
    events = len(alone)
    print(f"{events} events at {args.rate:g}/s to each subscription, poll interval 1 s")
    for label, lat in (("healthy alone (baseline)", alone), ("healthy beside a down one", beside)):
        print(f"  {label:27} p50 {percentile(lat, 0.5):.3f} s  p99 {percentile(lat, 0.99):.3f} s")
    print(f"  p99 ratio beside/alone: {percentile(beside, 0.99) / percentile(alone, 0.99):.2f}")
    print(
        f"  the down receiver got {requests} requests for {events} events: "
        f"{requests - int(probes)} before its breaker opened, {int(probes)} probes after"
    )


if __name__ == "__main__":
    asyncio.run(main())
