"""`patchwork-bridge replay`: copy events from the event log into one queue, for a CI that
joined late or lost its own.

Only ever into one named queue (``--queue``, e.g. one made by ``bind``) or one
subscription's main queue, never to the exchange: the other CI systems get nothing
again. Each copy keeps its ``message_id`` and headers and carries
``x-patchwork-replay: true``, so a consumer that deduplicates is not confused.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from datetime import UTC, datetime

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from bridge.amqp import BROKER_ERRORS, publish_confirmed
from bridge.cli.common import CliError, connected, pick, run_operator_command, usage_error
from bridge.eventlog import SINCE_SKEW, LogMissing, log_queue, logged_event, read_log
from bridge.settings import Settings, SettingsError
from bridge.topics import TopicMatcher, check_pattern
from bridge.webhook.messages import copy_message
from bridge.webhook.queues import main_queue
from bridge.webhook.subscriptions import Subscription

REPLAY_HEADER = "x-patchwork-replay"
PROGRESS_EVERY_S = 2.0
IN_FLIGHT = 500
"""Copies published and not yet confirmed, at most."""


def cli(args: argparse.Namespace) -> int:
    if (args.queue is None) == (args.subscription is None):
        return usage_error("replay: give --queue QUEUE or --subscription NAME (one of them)")
    for pattern in args.events or []:
        try:
            check_pattern(pattern)
        except ValueError as exc:
            return usage_error(f"replay: --events {pattern!r}: {exc}")

    async def command(settings: Settings, subscriptions: list[Subscription]) -> None:
        since = _server_time(args.since, settings, "--since")
        until = _server_time(args.until, settings, "--until") if args.until else None
        target = args.queue or main_queue(pick(subscriptions, args.subscription).name)
        async with connected(settings, "replay") as connection:
            await _replay(connection, settings, target, since, until, args.events, args.dry_run)

    needs_subscriptions = args.subscription is not None
    return asyncio.run(run_operator_command(command, needs_subscriptions=needs_subscriptions))


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
    settings: Settings,
    target: str,
    since: datetime,
    until: datetime | None,
    patterns: list[str] | None,
    dry_run: bool,
) -> None:
    wanted = TopicMatcher(patterns or ["#"])
    probe = await connection.channel()
    try:
        await probe.declare_queue(target, passive=True)
    except BROKER_ERRORS:
        raise CliError(f"{target}: no such queue (replay never creates one)") from None
    await probe.close()
    channel = await connection.channel(publisher_confirms=True)
    started = datetime.now(UTC)
    await _say_where_the_log_starts(connection, settings, since)
    read = copied = 0
    last_said = time.monotonic()
    start = since.replace(tzinfo=settings.tz).astimezone(UTC) - SINCE_SKEW
    # Many copies in flight, each confirmed: one at a time, a confirm's round trip (and
    # the broker's disk write) would cap a replay at a few hundred events a second.
    in_flight: set[asyncio.Task[None]] = set()
    try:
        async for message in read_log(connection, settings.exchange, start):
            if message.timestamp is not None and message.timestamp > started:
                break  # published after the replay began: the log's end for this replay
            read += 1
            if not _wanted(message, since, until, wanted):
                continue
            if not dry_run:
                if len(in_flight) >= IN_FLIGHT:
                    done, in_flight = await asyncio.wait(
                        in_flight, return_when=asyncio.FIRST_COMPLETED
                    )
                    for task in done:
                        task.result()  # raises what the broker refused
                in_flight.add(
                    asyncio.create_task(publish_confirmed(channel, target, _replayed(message)))
                )
            copied += 1
            if time.monotonic() - last_said > PROGRESS_EVERY_S:
                last_said = time.monotonic()
                print(f"... {copied} events so far ({read} read from the log)", file=sys.stderr)
        await asyncio.gather(*in_flight)
    except LogMissing as exc:
        raise CliError(f"{exc}: start a producer first") from None
    except BROKER_ERRORS as exc:
        raise CliError(
            f"replay stopped after about {copied} events: {type(exc).__name__}: {exc}; "
            "running it again copies those again (consumers deduplicate by message_id)"
        ) from None
    finally:
        for task in in_flight:
            task.cancel()
    what = f"from {since.isoformat()}" + (f" to {until.isoformat()}" if until else "")
    verb = "would replay" if dry_run else "replayed"
    print(f"{verb} {copied} events {what} into {target} ({read} read from the log)")


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
    try:
        async for message in read_log(connection, settings.exchange, "first", idle_end_s=2.0):
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
