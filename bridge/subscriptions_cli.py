"""``patchwork-bridge subscriptions list|enable|disable NAME``: the switch per subscription.

The state lives on the broker (an empty ``bridge.webhook.<name>.disabled`` queue),
so it survives restarts and every running consumer follows it within a few seconds.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import aio_pika
from aio_pika.abc import AbstractConnection

from bridge.amqp import CONNECT_TIMEOUT_S
from bridge.consumer import MARKER_CHECK_INTERVAL_S
from bridge.settings import Settings, SettingsError, load_settings
from bridge.subscriptions import Subscription, load_subscriptions
from bridge.topology import BROKER_ERRORS, QueueControl, main_queue

PROG = "patchwork-bridge"


class CliError(Exception):
    """Ends a command with one line on stderr and exit status 1."""


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
    """A plain, short-lived connection for one command; CliError if the broker is unreachable."""
    try:
        connection = await aio_pika.connect(
            settings.amqp_url.get_secret_value(),
            timeout=CONNECT_TIMEOUT_S,
            client_properties={"connection_name": f"{PROG} {command}"},
        )
    except BROKER_ERRORS as exc:
        raise CliError(
            f"cannot reach RabbitMQ at {settings.amqp_url_redacted} ({type(exc).__name__})"
        ) from None
    try:
        yield connection
    finally:
        await connection.close()


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
    return await run_operator_command(
        lambda settings, subscriptions: run_subscriptions(
            settings, subscriptions, args.subscriptions_command, getattr(args, "name", None)
        )
    )


async def run_operator_command(
    command: Callable[[Settings, list[Subscription]], Awaitable[None]],
) -> int:
    """Exit 0 on success, 2 for bad settings or an unknown subscription, 1 for broker trouble."""
    try:
        settings = load_settings()
        await command(settings, configured(settings))
    except SettingsError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except CliError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    return 0
