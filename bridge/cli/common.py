"""What the commands share: one error type and how a command ends, one short-lived
connection, subscription lookup, questions before deleting.

Every command module has ``register(commands)``, which adds its parser and sets its
``run``; ``run`` is wrapped by ``command``, so every command ends the same way: 0, or one
line on stderr and 1 (trouble: the broker, a missing queue) or 2 (the operator's mistake:
a setting, the command line).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import inspect
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from aio_pika.abc import AbstractConnection
from aiormq.exceptions import ChannelNotFoundEntity

from bridge.broker.calls import BROKER_TIMEOUT_S, close_channel
from bridge.broker.connect import connect_plain
from bridge.broker.errors import BROKER_ERRORS, BrokerRefused
from bridge.broker.topology import replay_exchange
from bridge.delivery.queues import QueueControl
from bridge.settings import Settings, SettingsError, load_settings
from bridge.webhook.subscriptions import Subscription, load_subscriptions

PROG = "patchwork-bridge"


class CliError(Exception):
    """Ends a command with one line on stderr and exit status ``code`` (1: trouble, 2: a
    mistake of the operator's that running it again will not mend)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def usage(message: str) -> CliError:
    """A command line that cannot be carried out as written."""
    return CliError(message, code=2)


Run = Callable[[argparse.Namespace], int]
Commands = argparse._SubParsersAction  # what each command module's ``register`` adds to


def command(body: Callable[[argparse.Namespace], Awaitable[Any] | Any]) -> Run:
    """A command's ``run``: ``body`` (sync or async) carried out, and its end one of three:
    0; CliError or SettingsError as one line and their code; Ctrl-C as one line and 130."""

    @functools.wraps(body)
    def run(args: argparse.Namespace) -> int:
        try:
            result = body(args)
            if inspect.iscoroutine(result):
                result = asyncio.run(result)
        except SettingsError as exc:
            print(f"{PROG}: {exc}", file=sys.stderr)
            return 2
        except CliError as exc:
            print(f"{PROG}: {exc}", file=sys.stderr)
            return exc.code
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:
            # The reader stopped early (`| head -1`): nothing is wrong. Python would print a
            # traceback when it flushes stdout at exit; point stdout at /dev/null first.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
        return result if isinstance(result, int) else 0

    return run


def settings_and_subscriptions(needed: bool = True) -> tuple[Settings, list[Subscription]]:
    """The settings, and the subscriptions of BRIDGE_SUBSCRIPTIONS where ``needed``."""
    settings = load_settings()
    return settings, configured(settings) if needed else []


def configured(settings: Settings) -> list[Subscription]:
    """The subscriptions of BRIDGE_SUBSCRIPTIONS; SettingsError if unset or invalid."""
    if settings.subscriptions is None:
        raise SettingsError("BRIDGE_SUBSCRIPTIONS: required to find the subscriptions")
    return load_subscriptions(settings.subscriptions)


def pick(subscriptions: list[Subscription], name: str) -> Subscription:
    for subscription in subscriptions:
        if subscription.name == name:
            return subscription
    known = ", ".join(s.name for s in subscriptions) or "none"
    raise SettingsError(f"{name}: unknown subscription (configured: {known})")


@asynccontextmanager
async def connected(settings: Settings, command: str) -> AsyncIterator[AbstractConnection]:
    """A plain, short-lived connection for one command, to the first node that answers;
    CliError if none does (2 if RabbitMQ refused the login or the vhost)."""
    try:
        connection = await connect_plain(settings, command)
    except BrokerRefused as exc:
        raise CliError(str(exc), code=2) from None
    except BROKER_ERRORS as exc:
        raise CliError(
            f"cannot reach RabbitMQ at {settings.amqp_url_redacted} ({type(exc).__name__})"
        ) from None
    try:
        yield connection
    finally:
        await connection.close()


async def confirm(question: str, yes: bool) -> None:
    """Ask on the terminal before deleting anything; CliError unless answered yes.

    ``--yes`` skips the question; without a terminal to ask on, the answer is no.
    """
    if yes:
        return
    if not sys.stdin.isatty():
        raise CliError(f"{question} Not asked without a terminal: pass --yes to go ahead")
    answer = await asyncio.to_thread(input, f"{question} [y/N] ")
    if answer.strip().lower() not in ("y", "yes"):
        raise CliError("nothing deleted")


async def queue_depths(connection: AbstractConnection, queues: list[str]) -> dict[str, int | None]:
    """Ready messages of each queue; None for a queue that does not exist."""
    control = QueueControl(connection)
    try:
        found = {queue: await control.inspect(queue) for queue in queues}
    finally:
        await control.close()
    return {q: None if r is None else r.message_count for q, r in found.items()}


async def delete_queues(
    connection: AbstractConnection, queues: list[str], *, yes: bool, what: str
) -> list[str]:
    """Show the depth of each of ``queues`` that exists, ask, delete them; returns those
    deleted. ``what`` names them in the error when none exists."""
    found = await queue_depths(connection, queues)
    depths = {queue: depth for queue, depth in found.items() if depth is not None}
    if not depths:
        raise CliError(f"{what}: none of its queues exist ({', '.join(queues[:2])}, ...)")
    for queue, depth in depths.items():
        print(f"{queue}\t{depth} messages")
    total = sum(depths.values())
    await confirm(f"delete these {len(depths)} queues and the {total} messages in them?", yes)
    channel = await connection.channel()
    try:
        for queue in depths:
            await channel.queue_delete(queue, timeout=BROKER_TIMEOUT_S)
    except BROKER_ERRORS as exc:
        raise CliError(f"RabbitMQ refused to delete {queue} ({type(exc).__name__})") from None
    finally:
        await close_channel(channel)
    return list(depths)


async def delete_replay_route(connection: AbstractConnection, exchange: str, queue: str) -> None:
    """Delete the queue's replay route (``replay_exchange``), if it has one."""
    channel = await connection.channel()
    try:
        await channel.exchange_delete(replay_exchange(exchange, queue), timeout=BROKER_TIMEOUT_S)
    except BROKER_ERRORS as exc:
        raise CliError(f"RabbitMQ refused to delete the replay route of {queue} ({exc})") from None
    finally:
        await close_channel(channel)


async def exists(
    connection: AbstractConnection, *, queue: str | None = None, exchange: str | None = None
) -> bool:
    """Whether the queue (or the exchange) exists: a passive declare on a channel of its own,
    which the broker closes when it does not."""
    channel = await connection.channel()
    try:
        async with asyncio.timeout(BROKER_TIMEOUT_S):
            if queue is not None:
                await channel.declare_queue(queue, passive=True)
            else:
                await channel.get_exchange(exchange or "", ensure=True)
        return True
    except ChannelNotFoundEntity:
        return False
    finally:
        await close_channel(channel)
