"""`patchwork-bridge replay`: copy events from the event log into one queue, for a CI that
joined late or lost its own.

Only ever into one named queue (``--queue``, e.g. one made by ``bind``) or one
subscription's main queue, never to the exchange: the other CI systems get nothing
again. Copies go through the queue's replay route (``bridge.broker.topology.replay_exchange``), a
private exchange with the same bindings as the queue, each with its original routing
key: the queue gets exactly what it would have got live, and its consumer reads the
routing key where it always does. Each copy keeps its ``message_id`` and headers and
carries ``x-patchwork-replay: true``. A queue without a replay route (made by an earlier
version, or by the CI itself) needs its patterns given with ``--events``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from aiormq import spec

from bridge.broker.calls import BROKER_TIMEOUT_S, close_channel
from bridge.broker.errors import BROKER_ERRORS
from bridge.broker.topology import declare_replay_route, replay_exchange
from bridge.cli.common import (
    CliError,
    Commands,
    command,
    connected,
    exists,
    pick,
    settings_and_subscriptions,
    usage,
)
from bridge.delivery.messages import copy_message
from bridge.delivery.queues import subscription_queues
from bridge.eventlog import SINCE_SKEW, LogMissing, log_queue, logged_event, read_log
from bridge.settings import Settings, SettingsError
from bridge.topics import TopicMatcher, check_pattern
from bridge.webhook.subscriptions import Subscription

REPLAY_HEADER = "x-patchwork-replay"
PROGRESS_EVERY_S = 2.0
IN_FLIGHT = 500
"""Copies published and not yet confirmed, at most."""


def register(commands: Commands) -> None:
    replay = commands.add_parser(
        "replay",
        help="copy events from the event log into one queue (a CI that joined late)",
        description="Copy the events dated from --since (to --until) out of the event log "
        "into one queue: a queue made by `bind` (--queue) or a subscription's main queue "
        "(--subscription), through its replay route, so it gets only what its bindings "
        "take, each under its original routing key. Never to the exchange, so nobody else "
        "gets them again. Each copy keeps its message_id and carries the header "
        "x-patchwork-replay: true. Dates are Patchwork's server time unless they carry a zone.",
    )
    replay.add_argument("--since", required=True, metavar="DATE", help="ISO 8601, inclusive")
    replay.add_argument("--until", metavar="DATE", help="ISO 8601, exclusive (default: now)")
    replay.add_argument(
        "--events",
        nargs="+",
        metavar="PATTERN",
        help="topic patterns, e.g. dpdk.* (default #; required for a queue `bind` did not make)",
    )
    target = replay.add_mutually_exclusive_group()
    target.add_argument("--queue", help="the queue to copy into (it must exist)")
    target.add_argument("--subscription", metavar="NAME", help="a subscription's main queue")
    replay.add_argument("--dry-run", action="store_true", help="count, copy nothing")
    replay.set_defaults(run=run)


@command
async def run(args: argparse.Namespace) -> None:
    if (args.queue is None) == (args.subscription is None):
        raise usage("replay: give --queue QUEUE or --subscription NAME (one of them)")
    for pattern in args.events or []:
        try:
            check_pattern(pattern)
        except ValueError as exc:
            raise usage(f"replay: --events {pattern!r}: {exc}") from None
    settings, subscriptions = settings_and_subscriptions(needed=args.subscription is not None)
    since = _server_time(args.since, settings, "--since")
    until = _server_time(args.until, settings, "--until") if args.until else None
    subscription = pick(subscriptions, args.subscription) if args.subscription else None
    target = (
        subscription_queues(settings.exchange, subscription.name).main
        if subscription is not None
        else args.queue
    )
    async with (
        connected(settings, "replay") as connection,
        _route(connection, settings.exchange, target, subscription, args.events) as route,
    ):
        await _replay(connection, *route, settings, target, since, until, args)


@asynccontextmanager
async def _route(
    connection: AbstractConnection,
    exchange: str,
    target: str,
    subscription: Subscription | None,
    patterns: Sequence[str] | None,
) -> AsyncIterator[tuple[AbstractChannel, str]]:
    """A confirming channel and the exchange to publish the copies to: the queue's replay
    route (declared for a subscription from its patterns), or, for a queue without one,
    a route of this replay's own bound with ``--events``, deleted at the end."""
    if not await exists(connection, queue=target):
        raise CliError(f"{target}: no such queue (replay never creates one)")
    route = replay_exchange(exchange, target)
    channel = await connection.channel(publisher_confirms=True)
    temporary = None
    try:
        if subscription is not None:
            queue = await channel.get_queue(target, ensure=False)
            await declare_replay_route(channel, exchange, queue, subscription.events)
        elif not await exists(connection, exchange=route):
            if not patterns:
                raise CliError(
                    f"{target} has no replay route (it was not made by this deployment's "
                    "`bind`): give the patterns it is bound with, --events PATTERN..."
                )
            temporary = route = f"{route}.{uuid.uuid4().hex[:8]}"
            queue = await channel.get_queue(target, ensure=False)
            made = await channel.declare_exchange(
                temporary, aio_pika.ExchangeType.TOPIC, auto_delete=True
            )
            for pattern in patterns:
                await queue.bind(made, pattern)
        yield channel, route
    finally:
        if temporary is not None:
            # Else auto-delete: it goes with its last binding, when the queue goes.
            with contextlib.suppress(*BROKER_ERRORS):
                await channel.exchange_delete(temporary, timeout=BROKER_TIMEOUT_S)
        await close_channel(channel)


def _server_time(text: str, settings: Settings, option: str) -> datetime:
    """A date as Patchwork's naive server-local time; a zone in it is converted."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise SettingsError(f"{option} {text!r}: not an ISO 8601 date") from None
    if when.tzinfo is not None:
        when = when.astimezone(settings.tz).replace(tzinfo=None)
    return when


async def _replay(
    connection: AbstractConnection,
    channel: AbstractChannel,
    route: str,
    settings: Settings,
    target: str,
    since: datetime,
    until: datetime | None,
    args: argparse.Namespace,
) -> None:
    dry_run = args.dry_run
    wanted = TopicMatcher(args.events or ["#"])
    started = datetime.now(UTC)
    exchange = await channel.get_exchange(route, ensure=False)
    read = copied = skipped = 0
    last_said = time.monotonic()
    start = since.replace(tzinfo=settings.tz).astimezone(UTC) - SINCE_SKEW
    # Many copies in flight, each confirmed: one at a time, a confirm's round trip (and
    # the broker's disk write) would cap a replay at a few hundred events a second.
    in_flight: set[asyncio.Task[bool]] = set()

    def settled(done: set[asyncio.Task[bool]]) -> None:
        nonlocal copied, skipped
        for task in done:
            if task.result():  # raises what the broker refused
                copied += 1
            else:
                skipped += 1

    try:
        await _say_where_the_log_starts(connection, settings, since)
        async for message in read_log(connection, settings.exchange, start):
            if message.timestamp is not None and message.timestamp > started:
                break  # published after the replay began: the log's end for this replay
            read += 1
            if not _wanted(message, since, until, wanted):
                continue
            if dry_run:
                copied += 1
            else:
                if len(in_flight) >= IN_FLIGHT:
                    done, in_flight = await asyncio.wait(
                        in_flight, return_when=asyncio.FIRST_COMPLETED
                    )
                    settled(done)
                in_flight.add(asyncio.create_task(_publish(exchange, message)))
            if time.monotonic() - last_said > PROGRESS_EVERY_S:
                last_said = time.monotonic()
                print(f"... {copied} events so far ({read} read from the log)", file=sys.stderr)
        if in_flight:
            done, in_flight = await asyncio.wait(in_flight)
            settled(done)
    except LogMissing as exc:
        raise CliError(f"{exc}: start a producer first") from None
    except BROKER_ERRORS as exc:
        raise CliError(
            f"replay stopped after about {copied} events: {type(exc).__name__}: {exc}; "
            "running it again copies those again (consumers deduplicate by message_id)"
        ) from None
    except asyncio.CancelledError:
        # Ctrl-C (asyncio.run cancels us): say how far it got; the route goes in _route.
        raise CliError(
            f"replay interrupted after {copied} events copied into {target}; they stay "
            "there, and running it again copies them again (consumers deduplicate by "
            "message_id)",
            code=130,
        ) from None
    finally:
        for task in in_flight:
            task.cancel()
    what = f"from {since.isoformat()}" + (f" to {until.isoformat()}" if until else "")
    verb = "would replay" if dry_run else "replayed"
    not_bound = f", {skipped} not bound to it" if skipped else ""
    print(f"{verb} {copied} events {what} into {target} ({read} read from the log{not_bound})")


async def _publish(
    exchange: aio_pika.abc.AbstractExchange, message: AbstractIncomingMessage
) -> bool:
    """Whether the queue's bindings took the copy (a return means they did not)."""
    answer = await exchange.publish(
        _replayed(message),
        routing_key=message.routing_key or "",
        mandatory=True,
        timeout=BROKER_TIMEOUT_S,
    )
    return isinstance(answer, spec.Basic.Ack)


def _wanted(
    message: AbstractIncomingMessage,
    since: datetime,
    until: datetime | None,
    wanted: TopicMatcher,
) -> bool:
    event = logged_event(message)
    if event is None:
        return False
    if event.when < since or (until is not None and event.when >= until):
        return False
    return wanted(message.routing_key or event.routing_key)


def _replayed(message: AbstractIncomingMessage) -> aio_pika.Message:
    headers = {k: v for k, v in (message.headers or {}).items() if k != "x-stream-offset"}
    headers[REPLAY_HEADER] = True
    return copy_message(message, headers)


async def _say_where_the_log_starts(
    connection: AbstractConnection, settings: Settings, since: datetime
) -> None:
    """One line when ``--since`` is older than anything the log still keeps."""
    # Closed here, not by the loop's finaliser in a task of its own: a Ctrl-C meanwhile
    # must reach this task.
    first_read = read_log(connection, settings.exchange, "first", idle_end_s=2.0)
    try:
        async for message in first_read:
            first = logged_event(message)
            if first is None:
                continue
            if first.when > since:
                print(
                    f"the event log {log_queue(settings.exchange)} starts at {first.date} "
                    f"(event {first.id}): nothing older is kept (BRIDGE_LOG_MAX_AGE, "
                    "BRIDGE_LOG_MAX_BYTES)",
                    file=sys.stderr,
                )
            return
    except LogMissing:
        return  # said by the read that follows
    finally:
        await first_read.aclose()
