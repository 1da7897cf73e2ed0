"""A CI system's consumer of patchwork-bridge: test every completed series once.

Needs only aio-pika and aiohttp. Its queue is the one `patchwork-bridge bind QUEUE
'*.series-completed'` declares (classic, rejected messages go to QUEUE.dead), so either
may create it. Settings: AMQP_URL, EXCHANGE (default patchwork), QUEUE (default ci-example).
"""

import asyncio
import json
import os
import sys
from collections import OrderedDict

import aio_pika
import aiohttp

AMQP_URL = os.environ.get("AMQP_URL", "amqp://guest:guest@localhost:5672/")
EXCHANGE = os.environ.get("EXCHANGE", "patchwork")
QUEUE = os.environ.get("QUEUE", "ci-example")
RETRY_S = float(os.environ.get("RETRY_S", "30"))  # wait before Patchwork gets a second chance
SEEN_MAX = 10_000  # delivery is at least once: remember this many message ids to drop repeats


async def main() -> None:
    seen: OrderedDict[str, None] = OrderedDict()
    connection = await aio_pika.connect_robust(AMQP_URL, timeout=10)
    async with connection, aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(60)) as http:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1)
        exchange = await channel.declare_exchange(EXCHANGE, "topic", durable=True)
        classic = {"x-queue-type": "classic"}
        await channel.declare_queue(f"{QUEUE}.dead", durable=True, arguments=classic)
        dead_letter = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": f"{QUEUE}.dead"}
        queue = await channel.declare_queue(QUEUE, durable=True, arguments=classic | dead_letter)
        await queue.bind(exchange, "*.series-completed")

        async for message in queue.iterator():
            if message.message_id in seen:  # a repeat of an event whose work is queued
                await message.ack()
                continue
            if message.type != "series-completed":  # a binding added by hand: not ours
                await message.ack()
                continue
            series = json.loads(message.body)["payload"]["series"]
            try:
                async with http.get(series["mbox"], raise_for_status=True) as response:
                    mbox = await response.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                print(f"series {series['id']}: no mbox ({exc!r})", file=sys.stderr, flush=True)
                if message.redelivered:  # failed twice: park it in QUEUE.dead for a human
                    await message.reject()
                else:
                    await asyncio.sleep(RETRY_S)
                    await message.nack(requeue=True)
                continue
            patches = sum(line.startswith(b"From ") for line in mbox.splitlines())
            # Queue the real CI job here; ack only once it is safely queued.
            print(
                f"event {message.message_id}: would test series {series['id']} "
                f"v{series['version']} {series['name']!r} ({patches} patches from the mbox)",
                flush=True,
            )
            await message.ack()
            seen[message.message_id] = None
            if len(seen) > SEEN_MAX:
                seen.popitem(last=False)


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:  # Ctrl-C: unacked events go back to the queue, nothing is lost
        sys.exit(130)
