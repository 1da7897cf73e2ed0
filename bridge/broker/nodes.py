"""The broker's nodes: BRIDGE_AMQP_URL names one, or a cluster's several, comma-separated.

A connection is made to the first node that answers, in the order given, and a robust one
moves on when its node goes: from the moment it is lost it tries the next node at each
reconnect attempt, round the list, until one answers. Every connection says which node it
is on (``node_of``), for ``/readyz`` and ``patchwork_bridge_broker_node``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar
from urllib.parse import urlsplit

from aio_pika.abc import AbstractConnection, AbstractRobustConnection
from aiormq.exceptions import AMQPError, InvalidFrameError, ProbableAuthenticationError
from yarl import URL

from bridge.broker.errors import BrokerRefused, LoginRefused
from bridge.settings import redact_url

log = logging.getLogger(__name__)

C = TypeVar("C", bound=AbstractConnection)
HEARTBEAT_S = 2
"""AMQP heartbeat of every connection: aiormq gives up on a node that sent nothing for
three times (heartbeat + 1) seconds, so a hung node (SIGSTOP, a cut cable) is left in
9 s, within the 15 s a CI may wait for its next event. A node that merely restarts
closes its sockets and is left at once."""
UNREACHABLE = (OSError, TimeoutError, AMQPError)
"""What trying a node can fail with that the next node may not."""


def with_heartbeat(url: str, seconds: int = HEARTBEAT_S) -> str:
    """``url`` asking for a heartbeat of ``seconds`` unless it asks for one of its own."""
    parsed = URL(url)
    if "heartbeat" in parsed.query:
        return url
    return str(parsed.update_query(heartbeat=str(seconds)))


def address(url: str) -> str:
    """``host:port`` of a node URL: what the logs, /readyz and the metrics call it."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or (5671 if parts.scheme == 'amqps' else 5672)}"


def url_of(connection: AbstractConnection) -> str:
    """The URL aio-pika connects ``connection`` to (and reconnects a robust one to)."""
    return str(connection.url)  # type: ignore[attr-defined]  # Connection's, not the ABC's


def node_of(connection: AbstractConnection | None) -> str | None:
    """The node ``connection`` is on now (None: none)."""
    if connection is None:
        return None
    return address(url_of(connection))


async def first_answering(urls: list[str], connect: Callable[[str], Awaitable[C]]) -> C:
    """``connect`` to each node in turn until one answers. A refusal (the login, the vhost)
    is raised at once, as BrokerRefused: every node would say the same. Otherwise the last
    node's error is raised."""
    error: BaseException | None = None
    for url in urls:
        try:
            return await connect(url)
        except ProbableAuthenticationError:
            user = urlsplit(url).username or "guest"
            raise LoginRefused(
                f"RabbitMQ at {redact_url(url)} refused the login of user {user!r}: "
                "check the user and password in BRIDGE_AMQP_URL"
            ) from None
        except (InvalidFrameError, asyncio.CancelledError) as exc:
            if not _refused_at_open(exc):
                raise
            raise BrokerRefused(
                f"RabbitMQ at {redact_url(url)} refused to open the vhost: check the vhost "
                "in BRIDGE_AMQP_URL, and the user's permissions on it"
            ) from None
        except UNREACHABLE as exc:
            if len(urls) > 1:
                log.info("RabbitMQ node %s does not answer (%s)", address(url), exc)
            error = exc
    assert error is not None
    raise error


_AT_OPEN = "Expected one of ['Connection.OpenOk'], got <Connection.Close"


def _refused_at_open(exc: BaseException) -> bool:
    """The broker closed the connection when asked to open the vhost (one that does not
    exist, a user without access to it). aiormq 7.2 reports that as an unexpected frame,
    or, when the socket closes first, as a CancelledError with that error's text; the
    broker's reason is lost either way. A CancelledError of our own task is never one."""
    if isinstance(exc, asyncio.CancelledError):
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            return False
    return bool(exc.args) and _AT_OPEN in str(exc.args[0])


def follow_nodes(connection: AbstractRobustConnection, urls: list[str], role: str) -> None:
    """Point ``connection`` at the next node, round ``urls``, each time it closes: when it
    is lost and after each reconnect attempt that fails (aio-pika reports both to the
    close callbacks, and reconnects to ``connection.url``). With one node this changes
    nothing."""
    if len(urls) < 2:
        return
    nodes = [address(url) for url in urls]

    def on_close(_: object, exc: BaseException | None) -> None:
        if connection.transport is None and exc is None:
            return  # our own close()
        # By address: aio-pika adds its own options to the URL's query.
        current = address(url_of(connection))
        index = nodes.index(current) if current in nodes else -1
        connection.url = URL(urls[(index + 1) % len(urls)])  # type: ignore[attr-defined]

    def on_reconnect(_: object) -> None:
        log.info("%s: on RabbitMQ node %s", role, node_of(connection))

    connection.close_callbacks.add(on_close)
    connection.reconnect_callbacks.add(on_reconnect)
