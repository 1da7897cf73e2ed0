"""Isolation: the fast receiver's delivery rate alone, and with a hanging receiver beside it.

``run`` drains a pre-loaded backlog to a receiver that answers 204 at once. In the
second setting a second subscription, bound to the same events, points at a receiver
that never answers (its timeout is long, so it holds its concurrency slots for the
whole drain). The hanging receiver should cost the fast one nothing: goal < 10% loss.
The rate is taken at the receiver from the first delivery to the last.

With ``--parked``, a third setting: the fast subscription alone plus a queue bound to
the same events that nobody reads. The broker then holds as many messages as beside
the hanging subscription, which tells the broker's share of a loss from the bridge's.

    python bench/isolation.py [--events 10000] [--concurrency 16] [--hang-timeout 30]
                              [--rounds 2] [--parked]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass

from bus import declare, delete_topology, park, preload
from common import (
    TZ,
    Hook,
    InProcessBridge,
    backlog_events,
    bridge_settings,
    run_id,
    workdir,
    write_subscriptions,
)
from figures import best_line, round_ratios
from receiver import Receiver

from bridge.demo.patchwork_double import FakePatchwork
from bridge.events import Event

DRAIN_TIMEOUT_S = 300.0
SETTINGS = {
    "alone": "alone (baseline)",
    "parked": "alone + a parked queue (control)",
    "hang": "beside a receiver that hangs",
}


STEADY_FROM = 0.1
"""The steady rate leaves out the first 10% of the deliveries: the bridge declares the
second subscription's queues and opens its connections while the first one delivers."""


@dataclass(frozen=True, slots=True)
class Drain:
    rate: float
    """Deliveries/s of the fast subscription, first delivery to last."""
    steady_rate: float
    """The same without the first STEADY_FROM of the deliveries."""
    hung: int
    """Requests the hanging receiver was holding when the fast one was done."""
    cpu_ms: float
    """CPU time of this process (the bridge) per fast delivery: steadier than the rate
    on a shared machine."""


async def drain(
    args: argparse.Namespace,
    receiver: Receiver,
    events: list[Event],
    patchwork_url: str,
    setting: str,
) -> Drain:
    rid = run_id()
    exchange = f"bench-isolation-{rid}"
    fast = Hook(f"bench-fast-{rid}", receiver.url("fast"), concurrency=args.concurrency)
    hang = Hook(
        f"bench-hang-{rid}",
        receiver.url("hang"),
        concurrency=args.concurrency,
        timeout=args.hang_timeout,
    )
    hooks = [fast, hang] if setting == "hang" else [fast]
    parked = [f"bench-parked-{rid}"] if setting == "parked" else []
    await receiver.reset()
    try:
        with workdir() as tmp:
            subscriptions = write_subscriptions(tmp / "subscriptions.toml", hooks)
            await declare(exchange, subscriptions)
            for queue in parked:
                await park(exchange, queue)
            await preload(exchange, events)
            bridge = InProcessBridge(
                bridge_settings(
                    exchange=exchange,
                    patchwork_url=patchwork_url,
                    subscriptions=subscriptions,
                    state_dir=tmp / "state",
                    start="now",
                    poll_interval=1.0,
                )
            )
            cpu_started = time.process_time()
            bridge.start()
            try:
                stats = await receiver.wait_for(
                    "fast", len(events), DRAIN_TIMEOUT_S, check=bridge.check
                )
                cpu_s = time.process_time() - cpu_started
                hung = (await receiver.stats("hang")).requests
                arrivals = sorted((await receiver.arrivals("fast")).values())
            finally:
                bridge.request_stop()
                # Answer the hung requests (503) so the shutdown need not wait them out.
                await receiver.release()
                await bridge.close()
    finally:
        await delete_topology(exchange, [h.name for h in hooks], parked)
    skip = int(len(arrivals) * STEADY_FROM)
    steady_rate = (len(arrivals) - 1 - skip) / max(arrivals[-1] - arrivals[skip], 1e-9)
    return Drain(stats.rate(), steady_rate, hung, 1000 * cpu_s / len(events))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=16, help="of each subscription")
    parser.add_argument(
        "--hang-timeout", type=float, default=30.0, help="the hanging subscription's timeout"
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--parked", action="store_true", help="also: alone beside a parked queue (a control)"
    )
    args = parser.parse_args()

    print(f"building a {args.events}-event backlog ...", flush=True)
    events = backlog_events(args.events)
    idle = FakePatchwork(tz=TZ)  # the producer of `run` polls it and finds nothing
    settings = ["alone", "parked", "hang"] if args.parked else ["alone", "hang"]
    results: dict[str, list[Drain]] = {setting: [] for setting in settings}
    await idle.start()
    try:
        async with Receiver.start() as receiver:
            for round_no in range(args.rounds):
                order = settings if round_no % 2 == 0 else settings[::-1]
                for setting in order:
                    result = await drain(args, receiver, events, idle.url, setting)
                    results[setting].append(result)
                    print(
                        f"  round {round_no + 1} {SETTINGS[setting]:34s} "
                        f"{result.rate:8,.0f} deliveries/s (steady {result.steady_rate:,.0f})  "
                        f"{result.cpu_ms:.3f} ms CPU/delivery"
                        + (f"  ({result.hung} requests hung)" if setting == "hang" else ""),
                        flush=True,
                    )
    finally:
        await idle.stop()
    report(args, results)


def report(args: argparse.Namespace, results: dict[str, list[Drain]]) -> None:
    best = {setting: max(d.rate for d in drains) for setting, drains in results.items()}
    print(
        f"\nfast receiver's rate over a pre-loaded {args.events}-event backlog, "
        f"concurrency {args.concurrency} each, hanging timeout {args.hang_timeout:g} s, "
        f"{args.rounds} rounds, best of each"
    )
    for setting, drains in results.items():
        print(best_line(SETTINGS[setting], [d.rate for d in drains]))
    loss = 1 - best["hang"] / best["alone"]
    print(
        f"  ratio beside / alone: {1 - loss:.2f}, loss {100 * loss:.1f}%   (goal: loss < 10%)"
        f"   hung requests held: {max(d.hung for d in results['hang'])}"
    )
    rates = {setting: [d.rate for d in drains] for setting, drains in results.items()}
    print(f"  beside / alone: {round_ratios(rates['hang'], rates['alone'])}")
    steady = {setting: max(d.steady_rate for d in drains) for setting, drains in results.items()}
    steady_loss = 1 - steady["hang"] / steady["alone"]
    print(
        f"  steady rate (after the first {STEADY_FROM:.0%} of the deliveries), best: "
        + ", ".join(f"{setting} {rate:,.0f}/s" for setting, rate in steady.items())
        + f"; loss {100 * steady_loss:.1f}%"
    )
    if "parked" in results:
        print(f"  ratio beside / alone + parked queue: {best['hang'] / best['parked']:.2f}")
    cpu = ", ".join(
        f"{setting} {min(d.cpu_ms for d in drains):.3f} ms" for setting, drains in results.items()
    )
    print(f"  CPU of the bridge per fast delivery, best: {cpu}")


if __name__ == "__main__":
    asyncio.run(main())
