"""Wiring: build the roles a command asks for, serve HTTP, stop cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

from aio_pika.abc import AbstractChannel

from bridge.amqp import LoginRefused
from bridge.http import start_server
from bridge.logs import setup_logging
from bridge.metrics import Metrics
from bridge.producer.cursor import CursorError, StateDirError
from bridge.settings import Settings, SettingsError, load_settings

if TYPE_CHECKING:
    from bridge.webhook.subscriptions import Subscription

log = logging.getLogger(__name__)


class PortInUse(Exception):
    """BRIDGE_HTTP_PORT cannot be bound (most often: another bridge process has it)."""


OPERATOR_ERRORS = (LoginRefused, PortInUse, StateDirError, CursorError)
"""Mistakes an operator mends (one line, exit 2), unlike our bugs (a traceback, once)."""


class Role(Protocol):
    """A long-running part of the bridge (producer, webhook consumer)."""

    name: str

    async def run(self, stop: asyncio.Event) -> None:
        """Work until ``stop`` is set, then finish in-flight work and return."""

    def readiness(self) -> tuple[bool, str]:
        """(ready, why not) for /readyz."""

    def connected(self) -> bool:
        """Whether the role's broker connection is up right now."""


def build_roles(command: str, settings: Settings, metrics: Metrics) -> list[Role]:
    """Raises SettingsError for configuration a role cannot start with.

    ``run`` without BRIDGE_SUBSCRIPTIONS is a producer alone: a site that only
    feeds CI systems binding their own queues.
    """
    roles: list[Role] = []
    subscriptions = _subscriptions(settings) if settings.subscriptions is not None else []
    if command in ("producer", "run"):
        from bridge.producer.poller import Producer
        from bridge.schema import SchemaWatch

        roles.append(
            Producer(
                settings,
                metrics,
                check_event=SchemaWatch(metrics).observe,
                prepare=_declare_queues_of(subscriptions, settings) if subscriptions else None,
            )
        )
    if command == "webhook" or (command == "run" and subscriptions):
        from bridge.webhook.consumer import build_consumer

        roles.append(build_consumer(settings, metrics))
    elif command == "run":
        log.info("no BRIDGE_SUBSCRIPTIONS: running the producer only")
    return roles


def _subscriptions(settings: Settings) -> list[Subscription]:
    from bridge.webhook.subscriptions import load_subscriptions

    assert settings.subscriptions is not None
    return load_subscriptions(settings.subscriptions)


def _declare_queues_of(
    subscriptions: list[Subscription], settings: Settings
) -> Callable[[AbstractChannel], Awaitable[None]]:
    """The producer declares the subscriptions' queues before its first publish, so the
    events of a first start are queued even if the webhook role is not up yet."""

    async def declare(channel: AbstractChannel) -> None:
        from bridge.webhook.queues import declare_subscription

        for subscription in subscriptions:
            await declare_subscription(
                channel, settings.exchange, subscription, settings.queue_type
            )

    return declare


async def serve(roles: list[Role], settings: Settings, metrics: Metrics) -> int:
    """Run roles until a signal; the HTTP server lives exactly as long as they do."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        runner, port = await start_server(
            metrics, [role.readiness for role in roles], settings.http_host, settings.http_port
        )
    except OSError as exc:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        raise PortInUse(
            f"BRIDGE_HTTP_PORT: cannot serve metrics on {settings.http_host}:"
            f"{settings.http_port} ({exc.strerror}); a second process on this host needs "
            "a port of its own (0 picks a free one)"
        ) from None
    log.info(
        "serving /metrics, /healthz and /readyz on %s:%d for %s",
        settings.http_host,
        port,
        "+".join(r.name for r in roles),
    )
    watcher = asyncio.create_task(_watch_connections(roles, metrics), name="connection-gauge")
    try:
        async with asyncio.TaskGroup() as group:
            for role in roles:
                group.create_task(_run_role(role, stop), name=role.name)
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await runner.cleanup()
    log.info("stopped")
    return 0


async def _watch_connections(roles: list[Role], metrics: Metrics) -> None:
    """Keep ``broker_connected{role}`` current; cancelled when the roles stop."""
    while True:
        for role in roles:
            metrics.broker_connected.labels(role.name).set(1 if role.connected() else 0)
        await asyncio.sleep(1.0)


async def _run_role(role: Role, stop: asyncio.Event) -> None:
    try:
        await role.run(stop)
    except BaseException:
        # One role failing stops the others, so the process exits and is restarted.
        stop.set()
        raise


def _settings_or_exit() -> Settings | None:
    try:
        return load_settings()
    except SettingsError as exc:
        print(f"patchwork-bridge: {exc}", file=sys.stderr)
        return None


def cli_run(args: argparse.Namespace) -> int:
    settings = _settings_or_exit()
    if settings is None:
        return 2
    setup_logging(settings.log_format, settings.log_level)
    metrics = Metrics()
    try:
        roles = build_roles(args.command, settings, metrics)
    except SettingsError as exc:
        print(f"patchwork-bridge: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(serve(roles, settings, metrics))
    except (LoginRefused, PortInUse, StateDirError, CursorError, ExceptionGroup) as exc:
        fatal = _operator_error(exc)
        if fatal is None:
            raise  # our bug: its traceback, once
        print(f"patchwork-bridge: {fatal}", file=sys.stderr)
        return 2


def _operator_error(exc: BaseException) -> BaseException | None:
    """The operator's mistake behind a role's failure (a refused login, a port in use)."""
    if isinstance(exc, OPERATOR_ERRORS):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := _operator_error(inner)) is not None:
                return found
    return None


def cli_check_config(args: argparse.Namespace) -> int:
    settings = _settings_or_exit()
    if settings is None:
        return 2
    metrics = Metrics()
    try:
        if settings.patchwork_url is not None:
            build_roles("producer", settings, metrics)
        if settings.subscriptions is not None:
            build_roles("webhook", settings, metrics)
    except SettingsError as exc:
        print(f"patchwork-bridge: {exc}", file=sys.stderr)
        return 2
    print("configuration ok")
    return 0
