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
from collections.abc import Sequence
from dataclasses import dataclass

import aio_pika

from bridge.broker.connect import connect
from bridge.broker.topology import (
    declare_exchange,
    declare_queue,
    declare_replay_route,
    queue_arguments,
    replay_exchange,
)
from bridge.cli.common import (
    CliError,
    Commands,
    command,
    connected,
    delete_queues,
    delete_replay_route,
    exists,
    usage,
)
from bridge.settings import Settings, load_settings
from bridge.topics import check_pattern

DEAD_SUFFIX = ".dead"
# Declarations are a few round trips; a broker that takes this long is not answering.
BIND_TIMEOUT_S = 30.0
MAX_NAME_BYTES = 255  # AMQP short strings: queue names and routing patterns


class BindError(CliError):
    """The broker refused or is unreachable, or the queue is not this deployment's; the
    message is one line fit for an operator."""

    def __init__(self, message: str) -> None:
        super().__init__(f"bind: {message}")


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


def register(commands: Commands) -> None:
    bind_ = commands.add_parser("bind", help="declare a durable queue bound to the exchange")
    bind_.add_argument("queue", help="queue name")
    bind_.add_argument("patterns", nargs="*", metavar="PATTERN", help="topic patterns, e.g. dpdk.*")
    bind_.add_argument(
        "--remove", action="store_true", help="delete QUEUE, QUEUE.dead and its replay route"
    )
    bind_.add_argument("--yes", action="store_true", help="with --remove: do not ask")
    bind_.add_argument(
        "--adopt",
        action="store_true",
        help="bind QUEUE although this deployment's bind did not make it (an earlier version's)",
    )
    bind_.set_defaults(run=run)


@command
async def run(args: argparse.Namespace) -> None:
    """One line on stdout when bound; one line on stderr and exit 2/1 when not."""
    if args.remove:
        if args.patterns:
            raise usage("bind: --remove takes no patterns")
        await unbind(load_settings(), args.queue, yes=args.yes)
        return
    if not args.patterns:
        raise usage("bind: give at least one PATTERN (or --remove)")
    # aio-pika logs a failed connect at length; the one line it ends with says enough.
    for noisy in ("aio_pika", "aiormq"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    bound = await bind(load_settings(), args.queue, args.patterns, adopt=args.adopt)
    print(bound.describe())
