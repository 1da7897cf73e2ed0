"""Test tools around the real broker: read what arrived, cut connections like a network fault."""

from __future__ import annotations

import asyncio
import json
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


def _connections() -> list[dict]:
    out = subprocess.run(
        ["rabbitmqctl", "list_connections", "pid", "client_properties", "--formatter", "json", "-q"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return json.loads(out or "[]")


async def close_connections_named(prefix: str) -> int:
    """Close every broker connection whose connection_name starts with ``prefix``."""

    def close() -> int:
        count = 0
        for conn in _connections():
            props = {k: v for k, _, v in conn["client_properties"]}
            if str(props.get("connection_name", "")).startswith(prefix):
                subprocess.run(
                    ["rabbitmqctl", "close_connection", conn["pid"], "test: cut connection"],
                    capture_output=True,
                    check=True,
                    timeout=60,
                )
                count += 1
        return count

    return await asyncio.to_thread(close)
