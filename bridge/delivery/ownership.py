"""Whether a lane's queues are this deployment's own: no route from another deployment's
exchange (checked at the head of the queue when the lane opens, and on every message), the
queues of versions before 0.2 unbound, and an earlier ladder's retry queues deleted once
empty."""

from __future__ import annotations

import asyncio
import logging

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from bridge.broker.calls import BROKER_TIMEOUT_S
from bridge.broker.errors import TopologyError
from bridge.delivery.queues import QueueControl
from bridge.delivery.spec import LaneSpec

log = logging.getLogger(__name__)


def foreign_exchange(message: AbstractIncomingMessage, spec: LaneSpec) -> str | None:
    """The exchange a message was routed from when that is another deployment's: a queue
    of this deployment's name bound to it would mix their events."""
    exchange = message.exchange
    if not exchange or exchange == spec.exchange:
        return None  # moved between our queues, or routed from our exchange
    replay = spec.replay_from
    if replay is not None and exchange.startswith(f"{replay}.replay."):
        return None  # a replay's copy, through the queue's replay route
    return exchange


def refusal(spec: LaneSpec, exchange: str) -> TopologyError:
    return TopologyError(
        f"{spec.queues.main} is bound to exchange {exchange}, not only to this "
        f"deployment's {spec.exchange}: its queues must be its own; unbind it "
        "(rabbitmqctl list_bindings shows it), or give this deployment another "
        "BRIDGE_EXCHANGE"
    )


async def check_head(queue: AbstractQueue, spec: LaneSpec) -> None:
    """The message at the head of the main queue, looked at and handed back: one routed
    from another deployment's exchange stops the start (TopologyError)."""
    head = await queue.get(no_ack=False, fail=False, timeout=BROKER_TIMEOUT_S)
    if head is None:
        return
    await head.nack(requeue=True)  # back in its place
    foreign = foreign_exchange(head, spec)
    if foreign is not None:
        raise refusal(spec, foreign)


async def leave_legacy(
    channel: AbstractChannel, spec: LaneSpec, control: QueueControl, label: str
) -> None:
    """An old main queue of this lane stops getting this deployment's events (the new one
    is bound now), and one line says what still waits in it."""
    legacy = spec.legacy
    if legacy is None:
        return
    found = await control.inspect(legacy.main)
    if found is None:
        return
    async with asyncio.timeout(BROKER_TIMEOUT_S):
        old = await channel.get_queue(legacy.main, ensure=False)
        for pattern in spec.patterns:
            await old.unbind(spec.exchange, pattern)
    log.warning(
        "%s: %s, as versions before 0.2 named this lane's queue, still exists (%d "
        "messages); no longer bound to %s. `patchwork-bridge migrate` moves this "
        "deployment's messages (and those of its retry and dead queues) into %s",
        label,
        legacy.main,
        found.message_count or 0,
        spec.exchange,
        spec.queues.main,
    )


class OldRetries:
    """The retry queues of an earlier version's ladder, deleted once they are empty: what
    waits there comes back to the main queue by itself, within that queue's TTL."""

    def __init__(self, spec: LaneSpec, control: QueueControl, label: str) -> None:
        self._control = control
        self._label = label
        self._said = dict.fromkeys(spec.queues.legacy_retries(spec.retry_schedule), False)
        """Each one still to delete, and whether the log said what it still held."""

    async def tidy(self) -> None:
        for name, said in list(self._said.items()):
            held = await self._control.delete_if_empty(name)
            if held == 0:
                del self._said[name]
                if said:
                    log.info(
                        "%s: %s, a retry queue of an earlier version, is empty: deleted",
                        self._label,
                        name,
                    )
            elif not said:
                log.info(
                    "%s: %s, a retry queue of an earlier version, holds %d events; they "
                    "come back by themselves, and it is deleted once empty",
                    self._label,
                    name,
                    held,
                )
                self._said[name] = True
