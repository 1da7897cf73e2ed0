"""Test tools around the real broker: read what arrived, cut connections like a network fault."""

from __future__ import annotations

import asyncio
import re
import subprocess
from collections.abc import Callable

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


async def drain(
    queue: str,
    expected: int,
    *,
    timeout: float = 20.0,
    until: Callable[[list[AbstractIncomingMessage]], bool] | None = None,
) -> list[AbstractIncomingMessage]:
    """Consume and ack until ``expected`` messages (or ``until``) arrived; fail after ``timeout``.

    ``expected=0`` collects whatever arrives during ``timeout`` seconds, to show nothing does.
    """
    done = until or (lambda got: len(got) >= expected)
    connection = await aio_pika.connect(AMQP_URL, timeout=10)
    got: list[AbstractIncomingMessage] = []
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=500)
        q = await channel.get_queue(queue, ensure=True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with q.iterator() as messages:
            while expected == 0 or not done(got):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    if expected == 0:
                        return got
                    raise AssertionError(f"{len(got)} of {expected} messages arrived in {timeout}s")
                try:
                    message = await asyncio.wait_for(anext(messages), remaining)
                except TimeoutError:
                    continue
                await message.ack()
                got.append(message)
    finally:
        await connection.close()
    return got


async def close_connections_named(prefix: str) -> int:
    """Close every broker connection whose connection_name starts with ``prefix``.

    Like a network fault, without stopping the shared broker. rabbitmqctl 3.10 has no
    column for the name, so we find it in the client properties (Erlang terms).
    """

    def close() -> int:
        listing = subprocess.run(
            ["rabbitmqctl", "list_connections", "pid", "client_properties", "-q"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        needle = re.compile(r'"connection_name",(?:longstr,<<)?"' + re.escape(prefix))
        count = 0
        for line in listing.splitlines():
            if needle.search(line):
                closed = subprocess.run(
                    ["rabbitmqctl", "close_connection", line.split("\t")[0], "test: cut"],
                    capture_output=True,
                    timeout=60,
                )
                # A connection closing on its own meanwhile is not an error.
                count += closed.returncode == 0
        return count

    return await asyncio.to_thread(close)
