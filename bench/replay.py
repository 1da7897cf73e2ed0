"""`patchwork-bridge replay` of 20,000 events against a plain copy loop, and the event log's
disk use per 10,000 events.

Both sides read the same event log (a stream queue) from its start and publish every event,
confirmed, into a queue of their own; the plain loop does nothing else (no date or pattern
filter, no progress, no end-of-log detection beyond counting). They alternate, ``--rounds``
times. The disk use is the growth of the stream's directory on the broker while the events
are published (``--stream-dir``: the broker's ``mnesia/<node>/stream``, readable here).

    python bench/replay.py [--events 20000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import aio_pika

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bus import delete_topology, preload
from bench.common import AMQP_URL, backlog_events, bridge_settings, run_id
from bridge.cli.replay import _replay
from bridge.eventlog import declare_log, log_queue

DEFAULT_STREAM_DIR = Path("/var/lib/rabbitmq/mnesia/rabbit@localhost/stream")


def dir_bytes(path: Path) -> int | None:
    if not path.is_dir():
        return None
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


async def plain_copy(exchange: str, target: str, n: int) -> None:
    """What a script would do: consume the stream from its start, publish each, confirmed."""
    connection = await aio_pika.connect(AMQP_URL)
    try:
        reader = await connection.channel()
        await reader.set_qos(prefetch_count=1000)
        writer = await connection.channel(publisher_confirms=True)
        log = await reader.get_queue(log_queue(exchange))
        copied = 0
        inbox: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
        await log.consume(inbox.put, arguments={"x-stream-offset": "first"})
        while copied < n:
            message = await inbox.get()
            headers = dict(message.headers or {})
            headers.pop("x-stream-offset", None)
            headers["x-patchwork-replay"] = True
            await writer.default_exchange.publish(
                aio_pika.Message(
                    message.body,
                    headers=headers,
                    message_id=message.message_id,
                    content_type=message.content_type,
                    type=message.type,
                    timestamp=message.timestamp,
                    app_id=message.app_id,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=target,
            )
            await message.ack()
            copied += 1
    finally:
        await connection.close()


async def ours(exchange: str, target: str) -> None:
    settings = bridge_settings(exchange=exchange)
    connection = await aio_pika.connect(AMQP_URL)
    try:
        since = datetime(2000, 1, 1)
        await _replay(connection, settings, target, since, None, None, dry_run=False)
    finally:
        await connection.close()


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--stream-dir", type=Path, default=DEFAULT_STREAM_DIR)
    args = parser.parse_args()
    exchange = f"bench-replay-{run_id()}"
    targets = [f"{exchange}-ours", f"{exchange}-plain"]
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel()
    await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    await declare_log(channel, bridge_settings(exchange=exchange))
    for target in targets:
        await channel.declare_queue(target, durable=True)
    try:
        events = backlog_events(args.events)
        before = dir_bytes(args.stream_dir)
        await preload(exchange, events)
        await asyncio.sleep(1.0)  # let the broker write the last chunk
        after = dir_bytes(args.stream_dir)
        body_bytes = sum(len(e.body) for e in events)
        if before is not None and after is not None:
            per_10k = (after - before) * 10_000 / args.events
            print(
                f"event log on disk: {per_10k / 1e6:.1f} MB per 10,000 events "
                f"(bodies alone: {body_bytes * 10_000 / args.events / 1e6:.1f} MB)"
            )
        else:
            print(f"event log on disk: {args.stream_dir} is not readable here; not measured")
        rates: dict[str, list[float]] = {"replay": [], "plain": []}
        for round_ in range(args.rounds):
            sides = [("replay", ours), ("plain", plain_copy)]
            if round_ % 2:
                sides.reverse()
            for name, side in sides:
                target = targets[0] if name == "replay" else targets[1]
                await (await channel.get_queue(target)).purge()
                started = time.perf_counter()
                if name == "replay":
                    await side(exchange, target)
                else:
                    await side(exchange, target, args.events)
                elapsed = time.perf_counter() - started
                depth = (await channel.declare_queue(target, passive=True)).declaration_result
                assert depth.message_count == args.events, (name, depth.message_count)
                rates[name].append(args.events / elapsed)
        for name, values in rates.items():
            print(f"{name:>7}: best {max(values):,.0f} events/s (rounds: "
                  f"{', '.join(f'{v:,.0f}' for v in values)})")  # fmt: skip
        ratios = [o / p for o, p in zip(rates["replay"], rates["plain"], strict=True)]
        print(f"  ratio replay/plain per round: {', '.join(f'{r:.2f}' for r in ratios)}; "
              f"median {statistics.median(ratios):.2f}")  # fmt: skip
    finally:
        await delete_topology(exchange, [], targets)
        await connection.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
