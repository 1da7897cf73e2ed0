"""``patchwork-bridge dlq list|replay|purge NAME``: an operator's view of the dead letters.

``list`` takes messages without acking them and hands them all back when its
channel closes, so looking never removes anything. ``replay`` moves each message
to the main queue with a fresh attempt count: confirmed copy first, then ack.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass
from typing import TextIO

from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage, AbstractQueue
from aiormq.exceptions import ChannelNotFoundEntity

from bridge.broker.calls import BROKER_TIMEOUT_S, close_channel
from bridge.broker.errors import BROKER_ERRORS
from bridge.broker.topology import publish_confirmed, replay_exchange
from bridge.cli.bind import DEAD_SUFFIX
from bridge.cli.common import (
    CliError,
    Commands,
    command,
    confirm,
    connected,
    exists,
    pick,
    queue_depths,
    settings_and_subscriptions,
    usage,
)
from bridge.delivery.messages import (
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
from bridge.delivery.queues import QueueSet, checks_queues, subscription_queues
from bridge.settings import Settings
from bridge.webhook.subscriptions import RESERVED


def describe(message: AbstractIncomingMessage) -> str:
    """One line per dead letter: what it was, how often it was tried, why it failed."""
    headers = message.headers or {}

    def field(key: str) -> str:
        return header_text(headers.get(key)) or "-"

    key = field(ROUTING_KEY) if ROUTING_KEY in headers else message.routing_key
    reason = field(LAST_REASON)
    attempts = field(ATTEMPTS)
    if LAST_REASON not in headers and "x-first-death-reason" in headers:
        # Moved by the broker, not by us: a CI's reject, or past the delivery limit.
        reason = field("x-first-death-reason").replace("_", "-")
        if "x-delivery-count" in headers:
            attempts = f"{field('x-delivery-count')} deliveries"
        key = _original_key(headers.get("x-death")) or key
    return (
        f"{message.message_id or '-'}  {key or '-'}  attempts={attempts}  "
        f"status={field(LAST_STATUS)}  reason={reason}  "
        f"dead_at={field(DEAD_AT)}  error={field(LAST_ERROR)}"
    )


@dataclass(frozen=True, slots=True)
class Target:
    """A queue and its dead-letter queue: a subscription's, or one made by ``bind``."""

    main: str
    dead: str
    missing_hint: str
    route: str | None = None
    """A bind queue's replay route, which must exist: the queue is this deployment's."""

    @classmethod
    def of_lane(cls, queues: QueueSet, role: str) -> Target:
        return cls(queues.main, queues.dead, f"has the {role} role run yet?")

    @classmethod
    def of_subscription(cls, exchange: str, name: str) -> Target:
        """A subscription's queues, or the checks role's for ``checks``: this deployment's."""
        if name in RESERVED:
            return cls.of_lane(checks_queues(exchange), "checks")
        return cls.of_lane(subscription_queues(exchange, name), "webhook")

    @classmethod
    def of_bound_queue(cls, exchange: str, queue: str) -> Target:
        hint = f"was it made by `patchwork-bridge bind {queue}`?"
        return cls(queue, queue + DEAD_SUFFIX, hint, replay_exchange(exchange, queue))


def _original_key(deaths: object) -> str | None:
    """The routing key the event had before the broker dead-lettered it (x-death)."""
    if isinstance(deaths, list) and deaths and isinstance(deaths[-1], dict):
        keys = deaths[-1].get("routing-keys")
        if isinstance(keys, list) and keys:
            return header_text(keys[0])
    return None


async def _dead_queue(channel: AbstractChannel, target: Target) -> AbstractQueue:
    try:
        async with asyncio.timeout(BROKER_TIMEOUT_S):
            return await channel.get_queue(target.dead, ensure=True)
    except ChannelNotFoundEntity:
        raise CliError(f"{target.dead} does not exist ({target.missing_hint})") from None


async def list_dead(connection: AbstractConnection, target: Target, limit: int, out: TextIO) -> int:
    """Print up to ``limit`` dead letters, oldest first, leaving them in the queue.

    Each message shown is returned when the channel closes, which a quorum queue counts
    as a delivery: dead queues allow a million (see ``bridge.broker.topology.DEAD_DELIVERY_LIMIT``).
    """
    channel = await connection.channel(publisher_confirms=False)
    try:
        queue = await _dead_queue(channel, target)
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
        await close_channel(channel)


async def replay_dead(
    connection: AbstractConnection, target: Target, limit: int | None, out: TextIO
) -> int:
    """Move up to ``limit`` dead letters (default: those there now) to the main queue.

    Counting first means a receiver that fails again while we replay cannot keep
    this loop going forever.
    """
    channel = await connection.channel()
    try:
        queue = await _dead_queue(channel, target)
        waiting = queue.declaration_result.message_count or 0
        budget = waiting if limit is None else min(limit, waiting)
        moved = 0
        while moved < budget:
            message = await queue.get(no_ack=False, fail=False, timeout=BROKER_TIMEOUT_S)
            if message is None:
                break
            headers = replay_headers(message)
            await publish_confirmed(channel, target.main, copy_message(message, headers))
            await message.ack()
            print(f"replayed {describe(message)}", file=out)
            moved += 1
        return moved
    finally:
        await close_channel(channel)


async def purge_dead(connection: AbstractConnection, target: Target) -> int:
    channel = await connection.channel(publisher_confirms=False)
    try:
        queue = await _dead_queue(channel, target)
        result = await queue.purge(timeout=BROKER_TIMEOUT_S)
        return result.message_count or 0
    finally:
        await close_channel(channel)


async def run_dlq(
    settings: Settings,
    target: Target,
    action: str,
    limit: int | None,
    out: TextIO | None = None,
    *,
    yes: bool = False,
) -> None:
    """The command itself, with settings loaded and the queues chosen (tests call this)."""
    out = out or sys.stdout
    async with connected(settings, f"dlq {action}") as connection:
        if target.route is not None and not await exists(connection, exchange=target.route):
            raise CliError(
                f"queue {target.main} was not made by this deployment's bind (exchange "
                f"{settings.exchange}); `patchwork-bridge bind {target.main} PATTERN... "
                "--adopt` makes it so"
            )
        try:
            if action == "list":
                shown = await list_dead(connection, target, limit or 50, out)
                print(f"{shown} dead letters shown from {target.dead}", file=sys.stderr)
            elif action == "replay":
                moved = await replay_dead(connection, target, limit, out)
                print(f"replayed {moved} dead letters to {target.main}", file=out)
            elif action == "purge":
                waiting = (await queue_depths(connection, [target.dead]))[target.dead]
                if waiting is None:
                    raise CliError(f"{target.dead} does not exist ({target.missing_hint})")
                await confirm(f"delete the {waiting} dead letters in {target.dead}?", yes)
                purged = await purge_dead(connection, target)
                print(f"purged {purged} dead letters from {target.dead}", file=out)
            else:
                raise CliError(f"unknown dlq action {action!r}")
        except BROKER_ERRORS as exc:
            raise CliError(f"dlq {action} {target.main}: {type(exc).__name__}: {exc}") from None


def register(commands: Commands) -> None:
    dlq = commands.add_parser(
        "dlq",
        help="list, replay or purge dead letters",
        description="Dead letters of a subscription (NAME), of the checks role (checks), or "
        "of a queue made by `bind` (--queue QUEUE: its QUEUE.dead).",
    )
    actions = dlq.add_subparsers(dest="dlq_command", metavar="ACTION", required=True)
    for action, help_text in {
        "list": "show dead letters without removing them",
        "replay": "send dead letters back for delivery, with a fresh attempt count",
        "purge": "delete all dead letters (asks first)",
    }.items():
        p = actions.add_parser(action, help=help_text)
        p.add_argument("name", nargs="?", help="subscription name, or checks")
        p.add_argument("--queue", help="a queue made by `bind` instead of a subscription")
        if action == "list":
            p.add_argument("--limit", type=int, default=50, help="show at most N (default 50)")
        if action == "replay":
            p.add_argument("--limit", type=int, default=None, help="at most N (default all)")
        if action == "purge":
            p.add_argument("--yes", action="store_true", help="do not ask")
        p.set_defaults(run=run)


@command
async def run(args: argparse.Namespace) -> None:
    if args.queue is not None and args.name is not None:
        raise usage("dlq: give a subscription NAME or --queue QUEUE, not both")
    if args.queue is None and args.name is None:
        raise usage("dlq: give a subscription NAME, or --queue QUEUE for a bind queue")
    # A bind queue and the checks role's lane need no subscriptions file.
    settings, subscriptions = settings_and_subscriptions(
        needed=args.queue is None and args.name not in RESERVED
    )
    if args.queue is not None:
        target = Target.of_bound_queue(settings.exchange, args.queue)
    elif args.name in RESERVED:
        target = Target.of_subscription(settings.exchange, args.name)
    else:
        target = Target.of_subscription(settings.exchange, pick(subscriptions, args.name).name)
    limit = getattr(args, "limit", None)
    await run_dlq(settings, target, args.dlq_command, limit, yes=getattr(args, "yes", False))
