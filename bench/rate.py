"""Rate limit: a burst to a subscription with ``rate``, as the receiver measures it.

A backlog of ``--events`` waits in the subscription's queue; one, then two ``python -m
bridge webhook`` processes drain it to a receiver that answers at once. The receiver's
rate (first arrival to last) is printed beside the asked rate, which is the baseline: the
goal is within 10 % of it with one process and with two (each takes its share, the rate
over the consumers RabbitMQ reports on the queue).

    python bench/rate.py [--events 2000] [--rate 20]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from bus import declare, delete_topology, preload
from common import Hook, backlog_events, bridge_env, run_id, workdir, write_subscriptions
from receiver import Receiver

SETTLE_S = 8.0
"""Before the backlog is published: every process consumes, and has seen the others on
the queue at a marker check (every 5 s)."""


async def drain(processes: int, events: int, rate: float) -> tuple[float, float]:
    """The receiver's rate, and the busiest second's count."""
    exchange, name = f"bench-rate-{run_id()}", "paced"
    async with Receiver.start() as receiver:
        with workdir() as tmp:
            path = write_subscriptions(
                tmp / "subscriptions.toml", [Hook(name, receiver.url(name), rate=rate)]
            )
            await declare(exchange, path)
            env = bridge_env(
                exchange=exchange, subscriptions=str(path), log_level="WARNING", http_port="0"
            )
            webhooks = [
                await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "bridge", "webhook", env=env
                )
                for _ in range(processes)
            ]
            try:
                await asyncio.sleep(SETTLE_S)
                await preload(exchange, backlog_events(events))
                deadline = time.monotonic() + events / rate * 3 + 60
                while (await receiver.stats(name)).unique < events:
                    if time.monotonic() > deadline:
                        raise RuntimeError("the backlog did not drain")
                    await asyncio.sleep(0.5)
                times = sorted((await receiver.arrivals(name)).values())
            finally:
                for process in webhooks:
                    process.terminate()
                for process in webhooks:
                    await process.wait()
                await delete_topology(exchange, [name])
    measured = (len(times) - 1) / (times[-1] - times[0])
    busiest, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= 1.0:
            start += 1
        busiest = max(busiest, end - start + 1)
    return measured, busiest


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=20.0)
    args = parser.parse_args()
    print(f"{args.events} events, rate = {args.rate:g}/s (the baseline: what was asked)")
    for processes in (1, 2):
        measured, busiest = await drain(processes, args.events, args.rate)
        print(
            f"  {processes} webhook process{'es' if processes > 1 else ''}: "
            f"{measured:.2f}/s at the receiver, ratio {measured / args.rate:.3f} to the asked "
            f"rate; busiest second {busiest} requests"
        )


if __name__ == "__main__":
    asyncio.run(main())
