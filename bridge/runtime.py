"""Wiring: build the roles a command asks for; run them as a process, or in-process."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

from aio_pika.abc import AbstractChannel, AbstractConnection

from bridge.http import PortInUse, start_server
from bridge.metrics import Metrics
from bridge.settings import Settings, SettingsError
from bridge.waiting import Ticker

if TYPE_CHECKING:
    from bridge.stream.consumers import StreamConsumers
    from bridge.webhook.subscriptions import Subscription

log = logging.getLogger(__name__)


class Role(Protocol):
    """A long-running part of the bridge (producer, webhook, stream, checks)."""

    name: str

    async def run(self, stop: asyncio.Event) -> None:
        """Work until ``stop`` is set, then finish in-flight work and return."""

    def readiness(self) -> tuple[bool, str]:
        """(ready, why not) for /readyz."""

    def connected(self) -> bool:
        """Whether the role's broker connection is up right now."""

    def node(self) -> str | None:
        """The RabbitMQ node (host:port) its connection is on, if any."""


def build_roles(command: str, settings: Settings, metrics: Metrics) -> list[Role]:
    """Raises SettingsError for configuration a role cannot start with.

    ``run`` without subscriptions is a producer alone: a site that only feeds CI
    systems binding their own queues; with BRIDGE_STREAM_CONSUMERS it serves the stream too.
    """
    roles: list[Role] = []
    subscriptions = subscriptions_for(command, settings)
    if command in ("producer", "run"):
        from bridge.producer.role import Producer
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
        from bridge.webhook.role import build_webhook_role

        roles.append(build_webhook_role(settings, metrics, subscriptions))
    elif command == "run":
        log.info("no subscriptions: no webhook role")
    consumers = consumers_for(command, settings)
    if consumers is not None:
        from bridge.stream.role import StreamRole

        roles.append(StreamRole(settings, metrics, consumers))
    if runs_checks(command, settings):
        from bridge.checks.role import build_checks_role

        roles.append(build_checks_role(settings, metrics))
    return roles


def runs_checks(command: str, settings: Settings) -> bool:
    return command == "checks" or (command == "run" and settings.checks)


def consumers_for(command: str, settings: Settings) -> StreamConsumers | None:
    """The stream's consumers where the command serves the stream, read once."""
    from bridge.stream.consumers import load_consumers

    if command not in ("stream", "run"):
        return None
    if settings.stream_consumers is None:
        if command == "stream":
            raise SettingsError("BRIDGE_STREAM_CONSUMERS: required for the stream role")
        return None
    return load_consumers(settings.stream_consumers)


def subscriptions_for(command: str, settings: Settings) -> list[Subscription]:
    """The subscriptions a command delivers to, read once; SettingsError where the webhook
    role would have nothing to do."""
    from pydantic import SecretStr

    from bridge.signing import read_key_file
    from bridge.webhook.subscriptions import load_subscriptions, with_deployment_key

    if settings.subscriptions is None or command == "stream":
        if command == "webhook":
            raise SettingsError("BRIDGE_SUBSCRIPTIONS: required for the webhook role")
        return []
    subscriptions = with_deployment_key(
        load_subscriptions(settings.subscriptions),
        SecretStr(read_key_file(settings.signing_key_file)) if settings.signing_key_file else None,
    )
    if not subscriptions and command == "webhook":
        raise SettingsError(
            f"BRIDGE_SUBSCRIPTIONS: {settings.subscriptions} has no [[webhook]] tables; "
            "the webhook role would deliver nothing"
        )
    return subscriptions


def _declare_queues_of(
    subscriptions: list[Subscription], settings: Settings
) -> Callable[[AbstractConnection], Awaitable[None]]:
    """The producer declares the subscriptions' queues before its first publish, so the
    events of a first start are queued even if the webhook role is not up yet."""

    async def declare(connection: AbstractConnection) -> None:
        from bridge.broker.calls import close_channel
        from bridge.delivery.queues import until_declared
        from bridge.webhook.role import declare_subscription

        for subscription in subscriptions:

            async def one(channel: AbstractChannel, s: Subscription = subscription) -> object:
                return await declare_subscription(
                    channel, settings.exchange, s, settings.queue_type
                )

            channel, _ = await until_declared(connection, one, f"producer: {subscription.name}")
            await close_channel(channel)

    return declare


async def serve(roles: list[Role], settings: Settings, metrics: Metrics) -> int:
    """Run roles until a signal; the HTTP server lives exactly as long as they do.

    The first SIGTERM or SIGINT stops the roles cleanly (deliveries in flight may finish);
    a second one stops them at once, and the broker redelivers what was in flight. Exit
    status 0 after a clean stop; after one cut short, 128 + the signal (130 for Ctrl-C)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    cut_short: signal.Signals | None = None

    def on_signal(sig: signal.Signals) -> None:
        nonlocal cut_short
        if not stop.is_set():
            log.info(
                "%s: stopping; deliveries in flight may finish first (%s again to stop now)",
                sig.name,
                "Ctrl-C" if sig == signal.SIGINT else sig.name,
            )
            stop.set()
        elif cut_short is None:
            log.warning(
                "%s again: stopping now; the broker delivers again what was in flight",
                sig.name,
            )
            cut_short = sig
            main.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        runner, port = await start_server(
            metrics,
            [role.readiness for role in roles],
            settings.http_host,
            settings.http_port,
            where=[(role.name, role.node) for role in roles],
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
    watcher = asyncio.create_task(_watch_connections(roles, metrics, stop), name="connection-gauge")
    try:
        async with asyncio.TaskGroup() as group:
            for role in roles:
                group.create_task(_run_role(role, stop), name=role.name)
    except asyncio.CancelledError:
        if cut_short is None:
            raise
        main.uncancel()
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await runner.cleanup()
    if cut_short is not None:
        log.info("stopped at once")
        return 128 + cut_short  # as a shell reports a process the signal ended
    log.info("stopped")
    return 0


async def _watch_connections(roles: list[Role], metrics: Metrics, stop: asyncio.Event) -> None:
    """Keep ``broker_connected{role}`` and ``broker_node{role,node}`` current while the
    roles run."""
    nodes: dict[str, str] = {}
    async for _ in Ticker(stop, 1.0):
        for role in roles:
            metrics.broker_connected.labels(role.name).set(1 if role.connected() else 0)
            node = role.node()
            if node is not None and nodes.get(role.name) != node:
                if role.name in nodes:
                    metrics.broker_node.labels(role.name, nodes[role.name]).set(0)
                metrics.broker_node.labels(role.name, node).set(1)
                nodes[role.name] = node


class InProcess:
    """Roles as tasks of this process, stopped the way SIGTERM stops them: the one way the
    demo, the tests and the benchmarks run roles without a process of their own.

        async with InProcess(build_roles("run", settings, metrics)) as bridge:
            await bridge.wait_ready()
    """

    def __init__(self, roles: list[Role], *, stop_timeout_s: float = 30.0) -> None:
        self.roles = roles
        self.stop = asyncio.Event()
        self._stop_timeout_s = stop_timeout_s
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(_run_role(role, self.stop), name=role.name) for role in self.roles
        ]

    async def close(self) -> None:
        """Stop the roles and wait for them; raises what a role failed with, and
        TimeoutError for a role that will not stop (a bug to see, not to hide)."""
        self.stop.set()
        async with asyncio.timeout(self._stop_timeout_s):
            await asyncio.gather(*self._tasks)

    async def __aenter__(self) -> InProcess:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def check(self) -> None:
        """Raise what a role died of (RoleEnded for one that ended before it was told to)."""
        for task in self._tasks:
            if task.done():
                task.result()

    async def until(self, event: asyncio.Event, timeout_s: float) -> None:
        """Wait for ``event``; raises what a role died of meanwhile, and TimeoutError."""
        waiter = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait(
                [waiter, *self._tasks], timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            waiter.cancel()
        self.check()
        if not event.is_set():
            raise TimeoutError(f"not done within {timeout_s:g}s")

    async def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Until every role says it is ready; raises what a role died of meanwhile."""
        deadline = time.monotonic() + timeout_s
        while not all(role.readiness()[0] for role in self.roles):
            self.check()
            if time.monotonic() > deadline:
                reasons = [r for ok, r in (role.readiness() for role in self.roles) if not ok]
                raise TimeoutError("; ".join(reasons))
            await asyncio.sleep(0.05)


class RoleEnded(RuntimeError):
    """A role stopped working without being told to: our bug, never a reason to exit 0."""


async def _run_role(role: Role, stop: asyncio.Event) -> None:
    """One role failing stops the others, so the process exits (non-zero) and is restarted."""
    try:
        await role.run(stop)
    except asyncio.CancelledError as exc:
        stop.set()
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # the process is being stopped
        # A library cancelled what the role awaited (aiormq does when a connection dies):
        # without this, the role's task would end "cancelled", which a TaskGroup ignores.
        raise RoleEnded(f"the {role.name} role was cancelled: {exc}") from exc
    except BaseException:
        stop.set()
        raise
    if not stop.is_set():
        stop.set()
        raise RoleEnded(f"the {role.name} role returned before it was told to stop")
