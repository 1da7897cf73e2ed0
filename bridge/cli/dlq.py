"""``patchwork-bridge dlq list|replay|purge NAME``: an operator's view of the dead letters.

``list`` takes messages without acking them and hands them all back when its
channel closes, so looking never removes anything. ``replay`` moves each message
to the main queue with a fresh attempt count: confirmed copy first, then ack.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from typing import TextIO

from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage, AbstractQueue
from aiormq.exceptions import ChannelNotFoundEntity

from bridge.amqp import BROKER_ERRORS, BROKER_TIMEOUT_S, publish_confirmed
from bridge.cli.common import CliError, connected, pick, run_operator_command
from bridge.settings import Settings
from bridge.webhook.messages import (
    ATTEMPTS,
    DEAD_AT,
    LAST_ERROR,
    LAST_REASON,
    LAST_STATUS,
    ROUTING_KEY,
    copy_message,
    header_text,
    replay_headers,
)
from bridge.webhook.queues import dead_queue, main_queue
from bridge.webhook.subscriptions import Subscription


def describe(message: AbstractIncomingMessage) -> str:
    """One line per dead letter: what it was, how often it was tried, why it failed."""
    headers = message.headers or {}

    def field(key: str) -> str:
        return header_text(headers.get(key)) or "-"

    key = field(ROUTING_KEY) if ROUTING_KEY in headers else message.routing_key
    reason = field(LAST_REASON)
    attempts = field(ATTEMPTS)
    if LAST_REASON not in headers and "x-first-death-reason" in headers:
        # Moved by the broker, not by us: past the main queue's delivery limit.
        reason = field("x-first-death-reason").replace("_", "-")
        attempts = f"{field('x-delivery-count')} deliveries"
    return (
        f"{message.message_id or '-'}  {key or '-'}  attempts={attempts}  "
        f"status={field(LAST_STATUS)}  reason={reason}  "
        f"dead_at={field(DEAD_AT)}  error={field(LAST_ERROR)}"
    )


async def _dead_queue(channel: AbstractChannel, name: str) -> AbstractQueue:
    queue_name = dead_queue(name)
    try:
        async with asyncio.timeout(BROKER_TIMEOUT_S):
            return await channel.get_queue(queue_name, ensure=True)
    except ChannelNotFoundEntity:
        raise CliError(f"{queue_name} does not exist (has the webhook consumer run yet?)") from None


async def list_dead(connection: AbstractConnection, name: str, limit: int, out: TextIO) -> int:
    """Print up to ``limit`` dead letters, oldest first, leaving them in the queue."""
    channel = await connection.channel(publisher_confirms=False)
    try:
        queue = await _dead_queue(channel, name)
        shown = 0
        while shown < limit:
            message = await queue.get(no_ack=False, fail=False, timeout=BROKER_TIMEOUT_S)
            if message is None:
                break
            print(describe(message), file=out)
            shown += 1
        return shown
    finally:
        # Closing without acks hands every message back, in its place.
        await _close(channel)


async def replay_dead(
    connection: AbstractConnection, name: str, limit: int | None, out: TextIO
) -> int:
    """Move up to ``limit`` dead letters (default: those there now) to the main queue.

    Counting first means a receiver that fails again while we replay cannot keep
    this loop going forever.
    """
    channel = await connection.channel()
    try:
        queue = await _dead_queue(channel, name)
        waiting = queue.declaration_result.message_count or 0
        budget = waiting if limit is None else min(limit, waiting)
        main = main_queue(name)
        moved = 0
        while moved < budget:
            message = await queue.get(no_ack=False, fail=False, timeout=BROKER_TIMEOUT_S)
            if message is None:
                break
            headers = replay_headers(message)
            await publish_confirmed(channel, main, copy_message(message, headers))
            await message.ack()
            print(f"replayed {describe(message)}", file=out)
            moved += 1
        return moved
    finally:
        await _close(channel)


async def purge_dead(connection: AbstractConnection, name: str) -> int:
    channel = await connection.channel(publisher_confirms=False)
    try:
        queue = await _dead_queue(channel, name)
        result = await queue.purge(timeout=BROKER_TIMEOUT_S)
        return result.message_count or 0
    finally:
        await _close(channel)


async def _close(channel: AbstractChannel) -> None:
    """Close, unless the broker already did (it closes a channel that asked for a missing queue)."""
    if not channel.is_closed:
        with contextlib.suppress(*BROKER_ERRORS):
            await channel.close()


async def run_dlq(
    settings: Settings,
    subscriptions: list[Subscription],
    action: str,
    name: str,
    limit: int | None,
    out: TextIO = sys.stdout,
) -> None:
    """The command itself, with settings and subscriptions already loaded (tests call this)."""
    subscription = pick(subscriptions, name)
    queue_name = dead_queue(subscription.name)
    async with connected(settings, f"dlq {action}") as connection:
        try:
            if action == "list":
                shown = await list_dead(connection, subscription.name, limit or 50, out)
                print(f"{shown} dead letters shown from {queue_name}", file=sys.stderr)
            elif action == "replay":
                moved = await replay_dead(connection, subscription.name, limit, out)
                print(f"replayed {moved} dead letters to {main_queue(name)}", file=out)
            elif action == "purge":
                purged = await purge_dead(connection, subscription.name)
                print(f"purged {purged} dead letters from {queue_name}", file=out)
            else:
                raise CliError(f"unknown dlq action {action!r}")
        except BROKER_ERRORS as exc:
            raise CliError(f"dlq {action} {name}: {type(exc).__name__}: {exc}") from None


async def cli(args: argparse.Namespace) -> int:
    return await run_operator_command(
        lambda settings, subscriptions: run_dlq(
            settings, subscriptions, args.dlq_command, args.name, getattr(args, "limit", None)
        )
    )
