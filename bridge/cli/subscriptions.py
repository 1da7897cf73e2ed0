"""``patchwork-bridge subscriptions list|enable|disable|remove NAME``: the switch per subscription.

The state lives on the broker (an empty ``bridge.webhook.<name>.disabled`` queue),
so it survives restarts and every running consumer follows it within a few seconds.
"""

from __future__ import annotations

import argparse
import sys

from bridge.amqp import BROKER_ERRORS
from bridge.cli.common import (
    CliError,
    connected,
    delete_queues,
    pick,
    run_operator_command,
)
from bridge.settings import Settings
from bridge.webhook.consumer import MARKER_CHECK_INTERVAL_S
from bridge.webhook.queues import QueueControl, main_queue, marker_queue, queue_names_of
from bridge.webhook.subscriptions import DEFAULT_RETRY_SCHEDULE_S, Subscription


async def run_subscriptions(
    settings: Settings, subscriptions: list[Subscription], action: str, name: str | None
) -> None:
    """The command itself, with settings and subscriptions already loaded (tests call this)."""
    chosen = subscriptions if action == "list" else [pick(subscriptions, name or "")]
    async with connected(settings, f"subscriptions {action}") as connection:
        control = QueueControl(connection)
        try:
            if action == "list":
                for s in chosen:
                    state = "disabled" if await control.is_disabled(s.name) else "enabled"
                    print(f"{s.name}\t{state}\t{s.sink}\t{' '.join(s.events)}")
                return
            disable = action == "disable"
            await control.set_disabled(chosen[0].name, disable, settings.queue_type)
        except BROKER_ERRORS as exc:
            raise CliError(f"RabbitMQ refused the {action} ({type(exc).__name__}: {exc})") from None
        finally:
            await control.close()
    if disable:
        print(
            f"{name}: disabled; running consumers stop within {MARKER_CHECK_INTERVAL_S:g}s and "
            f"events wait in {main_queue(name or '')}"
        )
    else:
        print(f"{name}: enabled; running consumers resume within {MARKER_CHECK_INTERVAL_S:g}s")


async def cli(args: argparse.Namespace) -> int:
    if args.subscriptions_command == "remove":
        return await run_operator_command(
            lambda settings, subscriptions: remove_subscription(
                settings, subscriptions, args.name, yes=args.yes
            )
        )
    return await run_operator_command(
        lambda settings, subscriptions: run_subscriptions(
            settings, subscriptions, args.subscriptions_command, getattr(args, "name", None)
        )
    )


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
    queues = [*queue_names_of(name, schedule), marker_queue(name)]
    if name in known:
        print(
            f"{name} is still in BRIDGE_SUBSCRIPTIONS: a webhook process that starts "
            "declares its queues again",
            file=sys.stderr,
        )
    async with connected(settings, "subscriptions remove") as connection:
        deleted = await delete_queues(connection, queues, yes=yes, what=f"subscription {name}")
    print(f"{name}: deleted {len(deleted)} queues")
    return deleted
