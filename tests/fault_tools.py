"""Tools of the fault tests: bridge processes to kill, receivers that misbehave, queue watching.

Processes log to a file, never to a pipe: a killed process's pipe is never read, and
a chatty one would block on a full pipe. The receiver is the tests' one (tests/receiver.py);
here is how a fault test tells it to answer.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import aio_pika
from aiohttp import web

from bridge.delivery.queues import QueueControl
from tests.broker import AMQP_URL, rabbitmqctl
from tests.receiver import Handler, Receiver

# How a receiver answers one request: a status, after an optional stall in seconds.
Answer = Callable[[str], tuple[int, float]]


def answering_by_id(receiver: Receiver, answer: Answer) -> Handler:
    """A handler for ``receiver`` that asks ``answer(webhook_id)`` how to reply. A stall
    longer than the subscription's timeout is answered 500 once over: the bridge has
    given up by then, so a success must never be counted for it."""

    async def handler(request: web.Request) -> web.Response:
        status, stall_s = answer(request.headers.get("webhook-id", ""))
        if stall_s > 0:
            await receiver.hold(stall_s)
            return web.Response(status=500, text="too late\n")
        return web.Response(status=status)

    return handler


def write_subscription(path: Path, name: str, url: str, **fields: object) -> Path:
    """A subscriptions file with one webhook to a loopback receiver."""
    lines = ["[[webhook]]", f'name = "{name}"', f'url = "{url}"', "allow_private_network = true"]
    for key, value in fields.items():
        lines.append(f"{key} = {_toml(value)}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


def bridge_env(**settings: str) -> dict[str, str]:
    """The environment of a bridge process: ours without BRIDGE_*, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("BRIDGE_")}
    env.update({f"BRIDGE_{k.upper()}": v for k, v in settings.items()})
    env.setdefault("BRIDGE_HTTP_PORT", "0")
    env.setdefault("BRIDGE_AMQP_URL", AMQP_URL)
    return env


async def start_bridge(command: str, env: dict[str, str], log: Path) -> asyncio.subprocess.Process:
    """``python -m bridge <command>``, its output appended to ``log``."""
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge", command, env=env, stdout=out, stderr=out
        )


async def stop_bridge(process: asyncio.subprocess.Process, timeout: float = 30) -> int:
    """SIGTERM, as an init system stops it; returns the exit code."""
    if process.returncode is None:
        process.terminate()
    return await asyncio.wait_for(process.wait(), timeout)


async def kill_bridge(process: asyncio.subprocess.Process) -> None:
    """kill -9: no shutdown code runs, nothing is flushed or saved."""
    process.kill()
    await asyncio.wait_for(process.wait(), 10)


_UNACKED_COLUMNS = ("name", "messages_unacknowledged")


class QueueWatch:
    """Ready-message and consumer counts of queues, through one connection of its own."""

    def __init__(self) -> None:
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._control: QueueControl | None = None

    async def __aenter__(self) -> QueueWatch:
        self._connection = await aio_pika.connect(AMQP_URL, timeout=10)
        self._control = QueueControl(self._connection)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._control is not None:
            await self._control.close()
        if self._connection is not None:
            await self._connection.close()

    async def depth(self, queue: str) -> int:
        """Ready messages; 0 for a queue that does not exist (yet)."""
        assert self._control is not None
        result = await self._control.inspect(queue)
        return 0 if result is None else result.message_count

    async def consumers(self, queue: str) -> int:
        assert self._control is not None
        result = await self._control.inspect(queue)
        return 0 if result is None else result.consumer_count

    @staticmethod
    async def unacked(queue: str) -> int | None:
        """Messages delivered from ``queue`` and not yet acked, as the broker counts them
        (a passive declare only tells ready messages; rabbitmqctl tells this); None while
        the broker lists it without counts."""

        def read() -> int | None:
            result = rabbitmqctl("list_queues", "-q", "--formatter", "json", *_UNACKED_COLUMNS)
            result.check_returncode()
            # Only ours: the broker is shared, and a queue another program is declaring
            # or deleting just now is listed with empty counts. So may ours be, briefly:
            # unknown (None) equals no count, and the caller's wait asks again.
            for listed in json.loads(result.stdout):
                if listed["name"] == queue:
                    count = listed["messages_unacknowledged"]
                    return int(count) if str(count).isdigit() else None
            return 0

        return await asyncio.to_thread(read)

    async def settled_depth(self, queue: str, quiet_s: float = 0.3, timeout: float = 10) -> int:
        """The depth once it stopped changing for ``quiet_s``: what a dead publisher left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last = await self.depth(queue)
        while loop.time() < deadline:
            await asyncio.sleep(quiet_s)
            now = await self.depth(queue)
            if now == last:
                return now
            last = now
        raise AssertionError(f"{queue} kept changing for {timeout}s")


def tail(log: Path, lines: int = 30) -> str:
    """The end of a process log, for an assertion message."""
    if not log.exists():
        return "(no log)"
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
