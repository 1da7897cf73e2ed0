"""``patchwork-bridge deliveries NAME``: every attempt to deliver to a subscription, from the
attempt history (``bridge.delivery.history``), oldest first.

One line per attempt: when it started (UTC), the event, the attempt number, what became
of it (delivered, retried, dead_lettered, disabled, probe_failed), the receiver's status
(``-`` when none came), the failure's class, how long it took, and the error.
"""

from __future__ import annotations

import argparse
import re
import sys
from datetime import UTC, datetime, timedelta
from typing import TextIO

from bridge.broker.errors import BROKER_ERRORS
from bridge.cli.common import CliError, Commands, command, connected, usage
from bridge.delivery.history import Attempt, history_queue
from bridge.eventlog import SINCE_SKEW, LogMissing, Offset, read_stream
from bridge.settings import Settings, load_settings

_AGO = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def register(commands: Commands) -> None:
    parser = commands.add_parser(
        "deliveries", help="every delivery attempt to a subscription, with its answer"
    )
    parser.add_argument("name", help="subscription name")
    parser.add_argument("--event", metavar="ID", help="only this event (its webhook-id)")
    parser.add_argument(
        "--since", metavar="WHEN", help="ISO 8601 (UTC unless it says), or an age: 30m, 2h, 7d"
    )
    parser.add_argument("--failed", action="store_true", help="only attempts that failed")
    parser.set_defaults(run=run)


@command
async def run(args: argparse.Namespace) -> int:
    since = parse_since(args.since, datetime.now(UTC)) if args.since else None
    shown = await show(
        load_settings(), args.name, sys.stdout, event=args.event, since=since, failed=args.failed
    )
    if not shown:
        print(f"deliveries: no attempts of {args.name} match", file=sys.stderr)
    return 0


def parse_since(text: str, now: datetime) -> datetime:
    ago = _AGO.match(text)
    if ago:
        return now - timedelta(**{_UNITS[ago.group(2)]: int(ago.group(1))})
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise usage(
            f"deliveries: --since {text!r}: give ISO 8601 or an age (30m, 2h, 7d)"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


async def show(
    settings: Settings,
    name: str,
    out: TextIO,
    *,
    event: str | None = None,
    since: datetime | None = None,
    failed: bool = False,
) -> int:
    """Print the matching attempts; returns how many."""
    start: Offset = "first" if since is None else since - SINCE_SKEW
    shown = 0
    async with connected(settings, "deliveries") as connection:
        try:
            async for message in read_stream(connection, history_queue(settings.exchange), start):
                try:
                    attempts = Attempt.all_from_json(message.body)
                except (ValueError, TypeError):
                    continue  # not a record of ours
                for attempt in attempts:
                    if attempt.subscription != name or (event and attempt.event != event):
                        continue
                    if failed and not attempt.failed:
                        continue
                    if since is not None and datetime.fromisoformat(attempt.at) < since:
                        continue
                    print(line(attempt), file=out)
                    shown += 1
        except LogMissing:
            raise CliError(
                f"deliveries: no attempt history {history_queue(settings.exchange)} yet "
                "(a webhook role of this version declares it)"
            ) from None
        except BROKER_ERRORS as exc:
            raise CliError(
                f"deliveries: reading the history failed ({type(exc).__name__})"
            ) from None
    return shown


def line(attempt: Attempt) -> str:
    status = "-" if attempt.status is None else str(attempt.status)
    return "\t".join(
        [
            attempt.at,
            attempt.event,
            f"attempt {attempt.attempt}",
            attempt.outcome,
            status,
            attempt.reason or "-",
            f"{attempt.duration_ms:g}ms",
            attempt.detail,
        ]
    )
