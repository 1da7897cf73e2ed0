"""`patchwork-bridge bind QUEUE PATTERN...`: a CI system's own queue, without AMQP code.

Declares the exchange, a durable queue of BRIDGE_QUEUE_TYPE bound to it with the
topic patterns, the queue's dead-letter queue `<QUEUE>.dead`, which receives what the
CI rejects without requeue, and its replay route (`<exchange>.replay.<QUEUE>`, the same
bindings), through which `replay` gives it only what it would have routed. Running it
again with the same arguments changes nothing. It only adds bindings: a pattern dropped
from the command line stays bound until removed in RabbitMQ (AMQP cannot list a queue's
bindings).

The replay route also says which deployment made the queue: `bind` refuses a queue that
exists without this deployment's route (another deployment's, or made by other means)
unless told `--adopt`, and `bind --remove` deletes only this deployment's queues.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import aio_pika

from bridge.amqp import (
    connect,
    declare_exchange,
    declare_queue,
    declare_replay_route,
    queue_arguments,
    replay_exchange,
)
from bridge.cli.common import (
    CliError,
    connected,
    delete_queues,
    delete_replay_route,
    exists,
    run_operator_command,
)
from bridge.settings import Settings, SettingsError, load_settings
from bridge.topics import check_pattern

DEAD_SUFFIX = ".dead"
# Declarations are a few round trips; a broker that takes this long is not answering.
BIND_TIMEOUT_S = 30.0
MAX_NAME_BYTES = 255  # AMQP short strings: queue names and routing patterns


class BindError(Exception):
    """The broker refused or is unreachable; the message is one line fit for an operator."""


@dataclass(frozen=True, slots=True)
class Bound:
    queue: str
    dead_letter_queue: str
    exchange: str
    queue_type: str
    patterns: tuple[str, ...]

    def describe(self) -> str:
        return (
            f"queue {self.queue} ({self.queue_type}) bound to exchange {self.exchange} with "
            f"{' '.join(self.patterns)}; rejected messages go to {self.dead_letter_queue}"
        )


def check_names(queue: str, patterns: Sequence[str], exchange: str = "patchwork") -> None:
    """Refuse what RabbitMQ would refuse later with a less helpful error."""
    if not queue or queue.startswith("amq."):
        raise BindError(f"queue name {queue!r}: must be non-empty and not start with 'amq.'")
    if len((queue + DEAD_SUFFIX).encode()) > MAX_NAME_BYTES:
        raise BindError(f"queue name {queue!r}: too long (at most 250 bytes)")
    if len(replay_exchange(exchange, queue).encode()) > MAX_NAME_BYTES:
        raise BindError(f"queue name {queue!r}: too long for its replay route")
    for pattern in patterns:
        try:
            check_pattern(pattern)  # the same rule as the subscriptions file's `events`
        except ValueError as exc:
            raise BindError(str(exc)) from None


async def bind(
    settings: Settings, queue: str, patterns: Sequence[str], *, adopt: bool = False
) -> Bound:
    """Declare exchange, dead-letter queue, queue, bindings and replay route; idempotent.

    BindError for a queue that exists without this deployment's replay route, unless
    ``adopt``: binding it would mix two deployments' events in one queue.
    """
    check_names(queue, patterns, settings.exchange)
    dead = queue + DEAD_SUFFIX
    try:
        async with asyncio.timeout(BIND_TIMEOUT_S):
            connection = await connect(settings, "bind")
            async with connection:
                if not adopt and not await owned(connection, settings.exchange, queue):
                    raise BindError(
                        f"queue {queue} exists but was not made by this deployment's bind "
                        f"(exchange {settings.exchange}): another deployment's, an earlier "
                        "version's or the CI's own; choose another name, or pass --adopt "
                        "if it is this deployment's"
                    )
                channel = await connection.channel()
                exchange = await declare_exchange(channel, settings.exchange)
                await declare_queue(
                    channel, dead, queue_arguments(settings.queue_type, dead_letters=True)
                )
                main = await declare_queue(
                    channel,
                    queue,
                    queue_arguments(
                        settings.queue_type,
                        dead_letter_exchange="",  # the default exchange routes by queue name
                        dead_letter_routing_key=dead,
                    ),
                )
                for pattern in patterns:
                    await main.bind(exchange, pattern)
                await declare_replay_route(channel, settings.exchange, main, patterns)
    except TimeoutError:
        raise BindError(f"RabbitMQ at {settings.amqp_url_redacted} did not answer") from None
    except aio_pika.exceptions.ChannelClosed as exc:
        # E.g. PRECONDITION_FAILED: the queue exists as classic and quorum was asked for.
        # Never carry on with a queue that differs from what the operator asked for.
        raise BindError(f"RabbitMQ refused: {_reply_text(exc)}") from None
    except (OSError, aio_pika.exceptions.AMQPError) as exc:
        raise BindError(
            f"cannot bind on RabbitMQ at {settings.amqp_url_redacted}: {type(exc).__name__}"
        ) from None
    return Bound(queue, dead, settings.exchange, settings.queue_type, tuple(patterns))


def _reply_text(exc: BaseException) -> str:
    """The broker's reply text (e.g. "PRECONDITION_FAILED - inequivalent arg ...")."""
    args: tuple[object, ...] = tuple(getattr(exc, "args", ()))
    return str(args[1] if len(args) > 1 else exc)


async def owned(connection: aio_pika.abc.AbstractConnection, exchange: str, queue: str) -> bool:
    """Whether ``queue`` is this deployment's to bind: new, or made by its ``bind``."""
    return not await exists(connection, queue=queue) or await exists(
        connection, exchange=replay_exchange(exchange, queue)
    )


async def unbind(settings: Settings, queue: str, *, yes: bool = False) -> list[str]:
    """Delete a queue made by this deployment's ``bind``, its ``.dead`` queue and its replay
    route, after showing their depths."""
    async with connected(settings, "bind --remove") as connection:
        if not await exists(connection, exchange=replay_exchange(settings.exchange, queue)):
            raise CliError(
                f"queue {queue} was not made by this deployment's bind (exchange "
                f"{settings.exchange}): nothing deleted"
            )
        deleted = await delete_queues(
            connection, [queue, queue + DEAD_SUFFIX], yes=yes, what=f"queue {queue}"
        )
        await delete_replay_route(connection, settings.exchange, queue)
    print(f"deleted {', '.join(deleted)}")
    return deleted


async def cli(args: argparse.Namespace) -> int:
    """One line on stdout when bound; one line on stderr and exit 2/1 when not."""
    if getattr(args, "remove", False):
        if args.patterns:
            print("patchwork-bridge bind: --remove takes no patterns", file=sys.stderr)
            return 2
        return await run_operator_command(
            lambda settings, _: unbind(settings, args.queue, yes=getattr(args, "yes", False)),
            needs_subscriptions=False,
        )
    if not args.patterns:
        print("patchwork-bridge bind: give at least one PATTERN (or --remove)", file=sys.stderr)
        return 2
    # aio-pika logs a failed connect at length; the one line below says enough.
    for noisy in ("aio_pika", "aiormq"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"patchwork-bridge: {exc}", file=sys.stderr)
        return 2
    try:
        bound = await bind(settings, args.queue, args.patterns, adopt=getattr(args, "adopt", False))
    except BindError as exc:
        print(f"patchwork-bridge bind: {exc}", file=sys.stderr)
        return 1
    print(bound.describe())
    return 0
