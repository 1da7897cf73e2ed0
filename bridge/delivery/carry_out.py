"""Settle's instructions carried out on the broker for one lane: acks, copies to the retry
and dead queues, holds, and what is left when settling itself fails. The lane decides what
to do before it gets here (a hold disables the lane first)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from bridge.broker.calls import raise_if_cancelled
from bridge.broker.errors import BROKER_ERRORS
from bridge.broker.topology import publish_confirmed
from bridge.delivery.messages import Facts, copy_message
from bridge.delivery.outcomes import SettleBug
from bridge.delivery.settle import Ack, Copy, Hold, Instruction, Plan, Wait, decide
from bridge.metrics import DELIVERY_FAILURE_REASONS, Metrics

log = logging.getLogger(__name__)

HAND_BACK_PAUSE_S = 1.0
"""Before returning a message we could not settle, so a broken queue cannot spin. Each
return counts against the queue's delivery limit, which bounds them."""


def failure_label(reason: str) -> str:
    """A third-party sink's own reasons must not grow the metric's label set."""
    return reason if reason in DELIVERY_FAILURE_REASONS else "other"


class Settler:
    def __init__(
        self,
        name: str,
        label: str,
        queue: Callable[[], AbstractQueue | None],
        plan: Plan,
        metrics: Metrics,
        patterns: tuple[str, ...],
    ) -> None:
        """``queue``: the lane's main queue now (its channel publishes the copies)."""
        self._name = name
        self._label = label
        self._queue = queue
        self._plan = plan
        self._metrics = metrics
        self._patterns = patterns
        self._delivered = metrics.deliveries.labels(name, "delivered")
        self._unmatched: set[str] = set()
        self._bugs: set[str] = set()
        """Kinds of our own bugs whose traceback was logged (once each)."""

    async def wait(self, message: AbstractIncomingMessage, wait: Wait) -> None:
        """Park a copy that is not due yet in the next delay level; no attempt, no count."""
        await publish_confirmed(self._channel(), wait.queue, copy_message(message, wait.headers))
        await ack(message)

    async def carry_out(self, message: AbstractIncomingMessage, instruction: Instruction) -> None:
        """The instruction, then its metrics. The ack (or the nack of a hold) comes last, so
        a bug raised before it leaves the message ours to settle."""
        match instruction:
            case Ack(label="delivered"):
                self._delivered.inc()
                await ack(message)
                return
            case Ack(unmatched=key):
                self._say_unmatched(key)
            case Copy(queue=queue, headers=headers, said=said, warn=warn):
                copy = copy_message(message, headers)
                await publish_confirmed(self._channel(), queue, copy)
                log.log(logging.WARNING if warn else logging.INFO, "%s: %s", self._label, said)
        self._metrics.deliveries.labels(self._name, instruction.label).inc()
        if isinstance(instruction, Copy | Hold):
            self._metrics.delivery_failures.labels(
                self._name, failure_label(instruction.reason)
            ).inc()
        if isinstance(instruction, Hold):
            await message.nack(requeue=True)  # it waits in the main queue, in its place
        else:
            await ack(message)

    async def settle_bug(
        self, message: AbstractIncomingMessage, facts: Facts, exc: Exception
    ) -> None:
        """A bug of ours while settling: a traceback once per kind, then a bounded retry.

        The message is retried a few times and then dead-lettered with the error's
        summary; if even that raises, it goes back to the broker, whose delivery
        limit (see ``bridge.broker.topology.queue_arguments``) dead-letters it in the end.
        """
        kind = type(exc).__name__
        if kind not in self._bugs:
            self._bugs.add(kind)
            log.exception("%s: bug while settling event %s", self._label, message.message_id)
        bug = SettleBug(f"{kind}: {exc}", facts.settle_bugs + 1)
        try:
            await self.carry_out(message, decide(bug, facts, self._plan, datetime.now(UTC)))
        except Exception as again:
            raise_if_cancelled()
            log.warning(
                "%s: could not set event %s aside either (%s); handing it back",
                self._label,
                message.message_id,
                type(again).__name__,
            )
            await hand_back(message)

    def _channel(self) -> AbstractChannel:
        queue = self._queue()
        assert queue is not None
        return queue.channel

    def _say_unmatched(self, key: str | None) -> None:
        if key is None or key in self._unmatched:
            return
        self._unmatched.add(key)
        queue = self._queue()
        log.warning(
            "%s: acked %s events without delivering them: no pattern of "
            "events = %s matches; %s keeps a binding from an earlier "
            "configuration (`rabbitmqctl list_bindings` shows it; remove it there)",
            self._label,
            key,
            list(self._patterns),
            queue.name if queue is not None else "its queue",
        )


async def ack(message: AbstractIncomingMessage) -> None:
    """basic.ack, queued for the connection's writer without waiting until it is written.

    aio-pika's ``message.ack()`` waits for that, which cost a future and a task switch
    per delivery in profiles, and guarantees nothing more: the broker never answers an
    ack, and a connection lost before it is sent redelivers the message either way.
    """
    assert message.delivery_tag is not None  # never consumed with no_ack
    await message.channel.basic_ack(message.delivery_tag, wait=False)


async def hand_back(message: AbstractIncomingMessage) -> None:
    """Requeue a message we could not settle; if the channel is gone, the broker does it."""
    await asyncio.sleep(HAND_BACK_PAUSE_S)
    with contextlib.suppress(*BROKER_ERRORS):
        await message.nack(requeue=True)
