"""The webhook consumer's queues, and how its messages are read and copied between them.

Per subscription ``<name>``: ``bridge.webhook.<name>`` (main, bound to the exchange
with the subscription's patterns), one ``.retry.<delay>s`` queue per step of the
retry ladder (queue-wide TTL, dead-lettered back to the main queue, so a long delay
never blocks a short one), ``.dead`` (dead letters) and, while the subscription is
disabled, an empty ``.disabled`` marker queue. Everything lives on the broker, so
it survives restarts and is shared by competing consumers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)
from aiormq import spec
from aiormq.abc import AbstractChannel as AbstractChannelUnderlay
from aiormq.exceptions import AMQPError, ChannelInvalidStateError, ChannelNotFoundEntity

from bridge.amqp import QueueType, declare_queue, queue_arguments
from bridge.retry import delay_ladder
from bridge.sinks.base import Delivery, GiveUp, RetryLater
from bridge.subscriptions import Subscription

PREFIX = "bridge.webhook"
BROKER_TIMEOUT_S = 10.0
"""For each declare, publish and delete: a broker that does not answer is an error, not a hang."""


class NotConfirmed(Exception):
    """The broker returned a publish (no such queue) instead of confirming it."""


# Errors of a broker call: the broker refused it, the channel or connection went away, or
# it took longer than BROKER_TIMEOUT_S.
BROKER_ERRORS: tuple[type[BaseException], ...] = (
    AMQPError,
    ChannelInvalidStateError,
    NotConfirmed,
    OSError,
    TimeoutError,
    # aiormq's "<Connection ...> closed" when a channel is opened while reconnecting.
    RuntimeError,
)

# Headers the bridge adds to copies it moves between its queues.
ATTEMPT = "x-bridge-attempt"
"""The attempt the copy is for: 2 for the first retry. Absent means 1."""
ROUTING_KEY = "x-bridge-routing-key"
"""The event's ``<project>.<category>``; a copy travels with the queue name as its key."""
LAST_STATUS = "x-bridge-last-status"
LAST_REASON = "x-bridge-last-reason"
LAST_ERROR = "x-bridge-last-error"
ATTEMPTS = "x-bridge-attempts"
DEAD_AT = "x-bridge-dead-at"
BRIDGE_HEADERS = (ATTEMPT, LAST_STATUS, LAST_REASON, LAST_ERROR, ATTEMPTS, DEAD_AT)

# Added by the broker on dead-lettering and by quorum queues on redelivery; a copy
# starts clean so they do not pile up across retries.
_BROKER_HEADER_PREFIXES = ("x-death", "x-first-death-", "x-last-death-", "x-delivery-count")
MAX_ERROR_CHARS = 300
_EVENT_HEADER_PREFIXES = ("ce-", "x-patchwork-")


def raise_if_cancelled() -> None:
    """Re-raise a cancellation that a broker call turned into an error.

    aiormq may surface a cancelled RPC as a channel error, and a timeout racing a
    cancel may surface as TimeoutError; a loop catching BROKER_ERRORS calls this
    first so that it still stops when its owner cancels it.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class TopologyError(Exception):
    """A queue cannot be declared as configured (most often: it exists with another type)."""


def main_queue(name: str) -> str:
    return f"{PREFIX}.{name}"


def dead_queue(name: str) -> str:
    return f"{PREFIX}.{name}.dead"


def marker_queue(name: str) -> str:
    return f"{PREFIX}.{name}.disabled"


def retry_queue(name: str, delay_s: float) -> str:
    """Named by the delay in seconds, to the millisecond (``retry.0.2s``, ``retry.300s``).

    The name fixes the TTL, so every process declares the same queue the same way.
    """
    text = f"{ttl_ms(delay_s) / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{PREFIX}.{name}.retry.{text}s"


def ttl_ms(delay_s: float) -> int:
    return max(0, round(delay_s * 1000))


def retry_queues(subscription: Subscription) -> dict[float, str]:
    """Each delay of the subscription's ladder and the queue that waits that long."""
    return {d: retry_queue(subscription.name, d) for d in delay_ladder(subscription.retry_schedule)}


def queue_names(subscription: Subscription) -> list[str]:
    """Main, retry and dead queues: the ones whose depth an operator watches."""
    name = subscription.name
    return [main_queue(name), *retry_queues(subscription).values(), dead_queue(name)]


async def declare_subscription(
    channel: AbstractChannel, exchange: str, subscription: Subscription, queue_type: QueueType
) -> AbstractQueue:
    """Declare and bind all queues of one subscription; returns the main queue to consume.

    Idempotent, so any number of processes may run it. Raises TopologyError naming
    the queue when the broker refuses (e.g. it exists as a classic queue and
    BRIDGE_QUEUE_TYPE says quorum).
    """
    name = subscription.name
    main = main_queue(name)
    current = main
    try:
        async with asyncio.timeout(BROKER_TIMEOUT_S):
            queue = await declare_queue(channel, main, queue_arguments(queue_type))
            for pattern in subscription.events:
                await queue.bind(exchange, pattern)
            for delay_s, retry_name in retry_queues(subscription).items():
                current = retry_name
                arguments = queue_arguments(
                    queue_type,
                    dead_letter_exchange="",
                    dead_letter_routing_key=main,
                    message_ttl_ms=ttl_ms(delay_s),
                )
                await declare_queue(channel, retry_name, arguments)
            current = dead_queue(name)
            await declare_queue(channel, current, queue_arguments(queue_type))
    except BROKER_ERRORS as exc:
        raise TopologyError(
            f"cannot declare queue {current} ({type(exc).__name__}: {exc}); "
            f"if it exists with another type, check BRIDGE_QUEUE_TYPE"
        ) from None
    return queue


class QueueControl:
    """Passive declares and marker changes on a plain channel of its own.

    The broker closes a channel that passively declares a missing queue. An aio-pika
    robust channel would reopen itself in the background and fail the calls made
    meanwhile, so this uses a plain channel and opens a fresh one when it was closed.
    Calls are serialised: one RPC at a time on the channel.
    """

    def __init__(self, connection: AbstractConnection) -> None:
        self._connection = connection
        self._channel: aio_pika.Channel | None = None
        self._lock = asyncio.Lock()

    async def inspect(self, queue: str) -> spec.Queue.DeclareOk | None:
        """Ready-message and consumer counts of ``queue``, or None if it does not exist."""
        async with self._lock, asyncio.timeout(BROKER_TIMEOUT_S):
            channel = await self._underlay()
            try:
                return await channel.queue_declare(queue, passive=True)
            except ChannelNotFoundEntity:
                return None

    async def is_disabled(self, name: str) -> bool:
        """Whether the subscription's marker queue exists."""
        return await self.inspect(marker_queue(name)) is not None

    async def set_disabled(self, name: str, disabled: bool, queue_type: QueueType) -> None:
        """Persist the disabled state: the marker queue exists exactly while disabled."""
        async with self._lock, asyncio.timeout(BROKER_TIMEOUT_S):
            channel = await self._underlay()
            if disabled:
                await channel.queue_declare(
                    marker_queue(name), durable=True, arguments=queue_arguments(queue_type)
                )
            else:
                await channel.queue_delete(marker_queue(name))

    async def close(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            with contextlib.suppress(*BROKER_ERRORS):
                async with asyncio.timeout(BROKER_TIMEOUT_S):
                    await self._channel.close()
        self._channel = None

    async def _underlay(self) -> AbstractChannelUnderlay:
        if self._channel is None or self._channel.is_closed:
            channel = aio_pika.Channel(self._connection, publisher_confirms=False)
            await channel.initialize()
            self._channel = channel
        return await self._channel.get_underlay_channel()


# -- the messages on these queues ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Invalid:
    """The outcome for a message no sink can handle: dead-lettered without an attempt."""

    detail: str
    reason: str = "invalid"
    status: None = None


@dataclass(frozen=True, slots=True)
class Unmatched:
    """The outcome for an event none of the subscription's patterns match: a binding left
    from an earlier configuration routed it (AMQP cannot list bindings to remove them)."""

    routing_key: str


class InvalidMessage(ValueError):
    """The body is not a JSON object, or the message has no id or routing key."""


def delivery_from(message: AbstractIncomingMessage) -> Delivery:
    """The sink's view of a message; raises InvalidMessage for a poison message."""
    try:
        # Decoded first: json.loads would also take UTF-16 or UTF-32 bytes (and decodes
        # UTF-8 faster this way).
        body = json.loads(message.body.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError included
        raise InvalidMessage("body is not UTF-8 JSON") from None
    if not isinstance(body, dict):
        raise InvalidMessage(f"body is a JSON {type(body).__name__}, not an object")
    if not message.message_id:
        raise InvalidMessage("no message_id")
    headers = message.headers or {}
    routing_key = header_text(headers.get(ROUTING_KEY)) or message.routing_key
    if not routing_key:
        raise InvalidMessage("no routing key")
    event_headers = {
        k: header_text(v) for k, v in headers.items() if k.startswith(_EVENT_HEADER_PREFIXES)
    }
    return Delivery(
        body=message.body,
        message_id=message.message_id,
        routing_key=routing_key,
        headers=event_headers,
        attempt=attempt_of(message),
    )


def attempt_of(message: AbstractIncomingMessage) -> int:
    value = (message.headers or {}).get(ATTEMPT)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else 1


def carried_headers(message: AbstractIncomingMessage) -> dict[str, Any]:
    """The message's headers without those the broker adds, plus the event's routing key."""
    headers = {
        k: v
        for k, v in (message.headers or {}).items()
        if not k.startswith(_BROKER_HEADER_PREFIXES)
    }
    headers.setdefault(ROUTING_KEY, message.routing_key or "")
    return headers


def copy_message(message: AbstractIncomingMessage, headers: dict[str, Any]) -> aio_pika.Message:
    """Same body and properties, new headers; persistent whatever the original said."""
    return aio_pika.Message(
        message.body,
        headers=headers,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        type=message.type,
        timestamp=message.timestamp,
        app_id=message.app_id,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


def retry_headers(
    message: AbstractIncomingMessage, outcome: RetryLater, next_attempt: int
) -> dict[str, Any]:
    return _failure_headers(message, outcome) | {ATTEMPT: next_attempt}


def dead_headers(
    message: AbstractIncomingMessage, outcome: RetryLater | GiveUp | Invalid, attempts: int
) -> dict[str, Any]:
    """What an operator needs to judge a dead letter (``dlq list`` shows these)."""
    headers = _failure_headers(message, outcome)
    headers.pop(ATTEMPT, None)
    headers[ATTEMPTS] = attempts
    headers[DEAD_AT] = datetime.now(UTC).isoformat(timespec="seconds")
    return headers


def replay_headers(message: AbstractIncomingMessage) -> dict[str, Any]:
    """A dead letter sent back starts again at attempt 1, with no failure recorded."""
    headers = carried_headers(message)
    for key in BRIDGE_HEADERS:
        headers.pop(key, None)
    return headers


def _failure_headers(
    message: AbstractIncomingMessage, outcome: RetryLater | GiveUp | Invalid
) -> dict[str, Any]:
    headers = carried_headers(message)
    headers[LAST_REASON] = outcome.reason
    headers[LAST_ERROR] = one_line(outcome.detail)
    if outcome.status is None:
        headers.pop(LAST_STATUS, None)
    else:
        headers[LAST_STATUS] = outcome.status
    return headers


async def publish_confirmed(
    channel: AbstractChannel, queue: str, message: aio_pika.Message
) -> None:
    """Publish straight to ``queue`` and wait for the broker's confirm.

    ``mandatory`` makes a missing queue an error instead of a silent drop. Raises one of
    BROKER_ERRORS (a nack is aiormq's DeliveryError, a return is NotConfirmed).
    """
    result = await channel.default_exchange.publish(
        message, routing_key=queue, mandatory=True, timeout=BROKER_TIMEOUT_S
    )
    if not isinstance(result, spec.Basic.Ack):
        raise NotConfirmed(f"{queue}: returned by the broker (does the queue exist?)")


def one_line(text: str) -> str:
    """Error text fit for a header and a log line: one line, bounded."""
    line = " ".join(text.split())
    return line if len(line) <= MAX_ERROR_CHARS else line[: MAX_ERROR_CHARS - 3] + "..."


def header_text(value: Any) -> str:
    """Header values come back as str or bytes depending on the publisher's client."""
    if type(value) is str:  # the common case, first: this runs for every header of every delivery
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)
