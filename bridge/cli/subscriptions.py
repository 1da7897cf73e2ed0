"""``patchwork-bridge subscriptions list|enable|disable|remove NAME``: the switch per subscription.

The state lives on the broker (an empty ``<exchange>.webhook.<name>.disabled`` queue),
so it survives restarts and every running consumer follows it within a few seconds.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from bridge.broker.errors import BROKER_ERRORS
from bridge.cli.common import (
    CliError,
    Commands,
    command,
    connected,
    delete_queues,
    delete_replay_route,
    pick,
    settings_and_subscriptions,
)
from bridge.delivery.engine import MARKER_CHECK_INTERVAL_S
from bridge.delivery.queues import QueueControl, subscription_queues
from bridge.settings import Settings
from bridge.webhook.subscriptions import DEFAULT_RETRY_SCHEDULE_S, Subscription


async def run_subscriptions(
    settings: Settings,
    subscriptions: list[Subscription],
    action: str,
    name: str | None,
    out: TextIO | None = None,
) -> None:
    """The command itself, with settings and subscriptions already loaded (tests call this)."""
    out = out or sys.stdout
    chosen = subscriptions if action == "list" else [pick(subscriptions, name or "")]
    listed: list[str] = []
    async with connected(settings, f"subscriptions {action}") as connection:
        control = QueueControl(connection)
        try:
            if action == "list":
                for s in chosen:
                    queues = subscription_queues(settings.exchange, s.name)
                    state = "disabled" if await control.is_disabled(queues) else "enabled"
                    if await control.is_breaker_open(queues):
                        state += ",breaker-open"
                    listed.append(f"{s.name}\t{state}\t{s.sink}\t{' '.join(s.events)}")
            else:
                disable = action == "disable"
                queues = subscription_queues(settings.exchange, chosen[0].name)
                await control.set_disabled(queues, disable, settings.queue_type)
        except BROKER_ERRORS as exc:
            raise CliError(f"RabbitMQ refused the {action} ({type(exc).__name__}: {exc})") from None
        finally:
            await control.close()
    if action == "list":
        # Printed once the broker is done: a reader that stops early (`| head -1`) is not
        # RabbitMQ's trouble (see bridge.cli.common.command).
        for line in listed:
            print(line, file=out)
        return
    if disable:
        print(
            f"{name}: disabled; running consumers stop within {MARKER_CHECK_INTERVAL_S:g}s and "
            f"events wait in {queues.main}",
            file=out,
        )
    else:
        print(
            f"{name}: enabled; running consumers resume within {MARKER_CHECK_INTERVAL_S:g}s",
            file=out,
        )


def register(commands: Commands) -> None:
    subs = commands.add_parser(
        "subscriptions", help="list subscriptions; enable, disable or remove one"
    )
    actions = subs.add_subparsers(dest="subscriptions_command", metavar="ACTION", required=True)
    actions.add_parser(
        "list", help="each subscription, its patterns and whether it is enabled"
    ).set_defaults(run=run)
    for action in ("enable", "disable"):
        p = actions.add_parser(action, help=f"{action} a subscription's deliveries")
        p.add_argument("name", help="subscription name")
        p.set_defaults(run=run)
    remove = actions.add_parser(
        "remove", help="delete a subscription's queues (main, retry, dead) after showing them"
    )
    remove.add_argument("name", help="subscription name")
    remove.add_argument("--yes", action="store_true", help="do not ask")
    remove.set_defaults(run=run)


@command
async def run(args: argparse.Namespace) -> None:
    settings, subscriptions = settings_and_subscriptions()
    if args.subscriptions_command == "remove":
        await remove_subscription(settings, subscriptions, args.name, yes=args.yes)
    else:
        name = getattr(args, "name", None)
        await run_subscriptions(settings, subscriptions, args.subscriptions_command, name)


async def remove_subscription(
    settings: Settings, subscriptions: list[Subscription], name: str, *, yes: bool = False
) -> list[str]:
    """Delete a subscription's queues (main, retry, dead, marker) after showing their depths.

    The subscription need not be in the file any more (that is the usual order: take it
    out, restart the webhook processes, then remove its queues); its retry queues are then
    those of the default schedule. Returns the queues deleted.
    """
    known = {s.name: s for s in subscriptions}
    schedule = known[name].retry_schedule if name in known else DEFAULT_RETRY_SCHEDULE_S
    lane = subscription_queues(settings.exchange, name)
    queues = [lane.main, *lane.every_retry(schedule), lane.dead, lane.marker, lane.breaker]
    if name in known:
        print(
            f"{name} is still in BRIDGE_SUBSCRIPTIONS: a webhook process that starts "
            "declares its queues again",
            file=sys.stderr,
        )
    async with connected(settings, "subscriptions remove") as connection:
        deleted = await delete_queues(connection, queues, yes=yes, what=f"subscription {name}")
        await delete_replay_route(connection, settings.exchange, lane.main)
    print(f"{name}: deleted {len(deleted)} queues")
    return deleted
