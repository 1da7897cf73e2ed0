"""Each subscription at run time, its lane: its own channel and queue, consuming or not.

``Lanes`` opens them, starts and stops their consumers, disables one on a 410, and
watches for what changes elsewhere: an enable/disable made by the CLI or by another
process, and a consumer the broker cancelled (queue deleted, quorum leader moved).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial

from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from prometheus_client import Counter, Histogram

from bridge.amqp import BROKER_ERRORS, BROKER_TIMEOUT_S, TopologyError, raise_if_cancelled
from bridge.logs import one_line
from bridge.metrics import Metrics
from bridge.settings import Settings
from bridge.sinks.base import Delivered, Delivery, Disable, GiveUp, Outcome, RetryLater, Sink
from bridge.topics import TopicMatcher
from bridge.waiting import Ticker
from bridge.webhook.queues import QueueControl, QueueSet, declare_lane
from bridge.webhook.subscriptions import Subscription

log = logging.getLogger(__name__)

SINK_GRACE_S = 5.0
"""A sink gets its subscription's timeout plus this before the consumer gives up on it."""


@dataclass(eq=False)
class Lane:
    """One subscription at run time: its sink, its channel and whether it consumes."""

    subscription: Subscription
    sink: Sink
    ladder: list[float]
    queues: QueueSet
    """Its main, retry, dead and marker queues, named for the deployment."""
    legacy: QueueSet | None = None
    """Its queues as versions before 0.2 named them, shared by every deployment."""
    queue: AbstractQueue | None = None
    consumer_tag: str | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Held while consuming starts or stops, so a 410 and the marker watcher cannot interleave."""
    logged_errors: set[str] = field(default_factory=set)
    in_flight: set[asyncio.Task[None]] = field(default_factory=set)
    """The deliveries running now, so shutdown can wait for them."""
    unmatched_keys: set[str] = field(default_factory=set)
    """Routing keys seen that no pattern matches: each is logged once."""
    cancelled: bool = False
    """The broker cancelled our consumer (queue deleted, quorum leader moved) and it is
    not consuming again yet."""
    seen_missing: bool = False
    """The watcher found the main queue missing at its last look (at the next, it
    declares the queue itself)."""
    sink_times_out: bool = field(init=False)
    wants: TopicMatcher = field(init=False)
    # The metric children of the hot path, looked up once instead of per delivery.
    duration: Histogram = field(init=False)
    delivered: Counter = field(init=False)

    def __post_init__(self) -> None:
        self.sink_times_out = bool(getattr(self.sink, "enforces_timeout", False))
        self.wants = TopicMatcher(self.subscription.events)

    def bind_metrics(self, metrics: Metrics) -> None:
        # Read when scraped: cheaper than an inc and a dec per delivery.
        metrics.in_flight.labels(self.name).set_function(lambda: len(self.in_flight))
        self.duration = metrics.delivery_duration.labels(self.name)
        self.delivered = metrics.deliveries.labels(self.name, "delivered")

    @property
    def name(self) -> str:
        return self.subscription.name

    def mark_cancelled(self, what: str) -> None:
        """Not consuming its main queue: one warning, and /readyz says so until it is."""
        if self.cancelled or self.queue is None:
            return
        self.cancelled = True
        log.warning(
            "webhook %s: %s %s (deleted by an operator, or its quorum leader moved); "
            "consuming again as soon as it is back",
            self.name,
            self.queue.name,
            what,
        )

    async def deliver(self, delivery: Delivery) -> Outcome:
        """The sink's outcome; a sink that raises, hangs or answers nonsense is retried."""
        limit_s = self.subscription.timeout + SINK_GRACE_S
        deadline: asyncio.Timeout | None = None
        try:
            if self.sink_times_out:  # it needs no second deadline
                outcome = await self.sink.deliver(delivery)
            else:
                async with (deadline := asyncio.timeout(limit_s)):
                    outcome = await self.sink.deliver(delivery)
        except Exception as exc:
            if isinstance(exc, TimeoutError) and deadline is not None and deadline.expired():
                return RetryLater("timeout", f"sink gave no outcome within {limit_s:g}s")
            kind = type(exc).__name__
            if kind not in self.logged_errors:  # a traceback once per kind, not per event
                self.logged_errors.add(kind)
                log.exception("webhook %s: sink raised %s", self.name, kind)
            else:
                log.warning("webhook %s: sink raised %s again", self.name, kind)
            return RetryLater("sink_error", kind)
        if not isinstance(outcome, Delivered | RetryLater | GiveUp | Disable):
            return RetryLater("sink_error", f"sink returned {type(outcome).__name__}")
        return outcome


OnMessage = Callable[[Lane, AbstractIncomingMessage], Awaitable[None]]


class Lanes:
    """The lanes of one webhook process, over its connection."""

    def __init__(
        self,
        lanes: list[Lane],
        connection: AbstractRobustConnection,
        control: QueueControl,
        settings: Settings,
        metrics: Metrics,
        on_message: OnMessage,
        *,
        bind_exchange: str,
        replay_from: str | None,
    ) -> None:
        """``bind_exchange``: what the lanes' main queues are bound to; ``replay_from``: the
        event exchange whose replay routes mirror those bindings (None: no replay routes)."""
        self.lanes = lanes
        self._bind_exchange = bind_exchange
        self._replay_from = replay_from
        self._connection = connection
        self._control = control
        self.settings = settings
        self.metrics = metrics
        self._on_message = on_message

    async def start(self) -> None:
        """Open every lane; consume those not disabled (their marker queue says so)."""
        for lane in self.lanes:
            await self._open(lane)
            if await self._control.is_disabled(lane.queues):
                self.metrics.subscription_enabled.labels(lane.name).set(0)
                log.warning(
                    "webhook %s: disabled (marker queue %s exists); events wait in %s",
                    lane.name,
                    lane.queues.marker,
                    lane.queues.main,
                )
            else:
                await self._consume(lane)

    async def stop_all(self) -> None:
        for lane in self.lanes:
            if lane.consumer_tag is not None:
                await self._stop_consuming(lane)

    async def _open(self, lane: Lane) -> None:
        """A channel of the lane's own (prefetch = concurrency) and its declared main queue."""
        async with asyncio.timeout(BROKER_TIMEOUT_S):
            channel = await self._connection.channel()
            await channel.set_qos(prefetch_count=lane.subscription.concurrency)
        lane.queue = await declare_lane(
            channel,
            self._bind_exchange,
            lane.queues,
            lane.subscription.events,
            lane.subscription.retry_schedule,
            self.settings.queue_type,
            replay_from=self._replay_from,
        )
        self._hear_broker_cancel(lane, channel)
        await self._leave_legacy(lane, channel)
        await self._check_head(lane)

    def foreign_exchange(self, message: AbstractIncomingMessage) -> str | None:
        """The exchange a message was routed from when that is another deployment's: a
        queue of this deployment's name bound to it would mix their events."""
        exchange = message.exchange
        if not exchange or exchange == self._bind_exchange:
            return None  # moved between our queues, or routed from our exchange
        if self._replay_from is not None and exchange.startswith(f"{self._replay_from}.replay."):
            return None  # a replay's copy, through the queue's replay route
        return exchange

    def refusal(self, lane: Lane, exchange: str) -> TopologyError:
        return TopologyError(
            f"{lane.queues.main} is bound to exchange {exchange}, not only to this "
            f"deployment's {self._bind_exchange}: its queues must be its own; unbind it "
            "(rabbitmqctl list_bindings shows it), or give this deployment another "
            "BRIDGE_EXCHANGE"
        )

    async def _check_head(self, lane: Lane) -> None:
        """The message at the head of the main queue, looked at and handed back: one routed
        from another deployment's exchange stops the start (TopologyError)."""
        assert lane.queue is not None
        head = await lane.queue.get(no_ack=False, fail=False, timeout=BROKER_TIMEOUT_S)
        if head is None:
            return
        await head.nack(requeue=True)  # back in its place
        foreign = self.foreign_exchange(head)
        if foreign is not None:
            raise self.refusal(lane, foreign)

    async def _leave_legacy(self, lane: Lane, channel: AbstractChannel) -> None:
        """An old main queue of this lane stops getting this deployment's events (the new
        one is bound now), and one line says what still waits in it."""
        if lane.legacy is None:
            return
        found = await self._control.inspect(lane.legacy.main)
        if found is None:
            return
        async with asyncio.timeout(BROKER_TIMEOUT_S):
            old = await channel.get_queue(lane.legacy.main, ensure=False)
            for pattern in lane.subscription.events:
                await old.unbind(self._bind_exchange, pattern)
        log.warning(
            "%s: %s, as versions before 0.2 named this lane's queue, still exists (%d "
            "messages); no longer bound to %s. `patchwork-bridge migrate` moves this "
            "deployment's messages (and those of its retry and dead queues) into %s",
            lane.name,
            lane.legacy.main,
            found.message_count or 0,
            self._bind_exchange,
            lane.queues.main,
        )

    def _hear_broker_cancel(self, lane: Lane, channel: AbstractChannel) -> None:
        """Say so the moment the broker cancels the lane's consumer (queue deleted, quorum
        leader moved). aio-pika recovers by reconnecting, often before the watcher's next
        look at the queue; the watcher then says when it consumes again."""

        def cancelled(_: object) -> None:
            if lane.consumer_tag is not None:  # not our own cancel of a disabled lane
                lane.mark_cancelled("is gone or lost its consumer")

        def listen(robust: object, *_: object) -> None:
            # A callback cannot await get_underlay_channel(); the property it replaces
            # still gives the same aiormq channel. Closed in between: the next reopen.
            with warnings.catch_warnings(), contextlib.suppress(Exception):
                warnings.simplefilter("ignore", DeprecationWarning)
                robust.channel.on_consumer_cancel_callbacks.add(cancelled)  # type: ignore[attr-defined]

        listen(channel)
        reopen = getattr(channel, "reopen_callbacks", None)
        if reopen is not None:
            reopen.add(listen)

    async def _consume(self, lane: Lane) -> None:
        assert lane.queue is not None
        # Enabled from before the first delivery can arrive (it may, before consume returns).
        enabled = self.metrics.subscription_enabled.labels(lane.name)
        enabled.set(1)
        try:
            lane.consumer_tag = await lane.queue.consume(
                partial(self._on_message, lane), timeout=BROKER_TIMEOUT_S
            )
        except BaseException:
            enabled.set(0)
            raise

    async def _stop_consuming(self, lane: Lane) -> None:
        """Cancel the consumer; its unacked messages stay ours to settle."""
        tag, lane.consumer_tag = lane.consumer_tag, None
        if tag is None or lane.queue is None:
            return
        try:
            await lane.queue.cancel(tag, timeout=BROKER_TIMEOUT_S)
        except BROKER_ERRORS as exc:
            # The robust queue has already forgotten the consumer: it is not restored.
            log.warning("webhook %s: cancelling its consumer failed (%s)", lane.name, exc)

    async def disable(self, lane: Lane, outcome: Disable) -> None:
        """Stop consuming and persist the state; the first 410 does it, later ones find it done."""
        async with lane.lock:
            if lane.consumer_tag is None:
                return
            await self._stop_consuming(lane)
            self.metrics.subscription_enabled.labels(lane.name).set(0)
            try:
                await self._control.set_disabled(lane.queues, True, self.settings.queue_type)
            except BROKER_ERRORS as exc:
                log.error(
                    "webhook %s: could not persist the disabled state (%s); "
                    "it resumes at the next marker check",
                    lane.name,
                    type(exc).__name__,
                )
            log.warning(
                "webhook %s: disabled (%s, status %s: %s); events wait in %s until "
                "`patchwork-bridge subscriptions enable %s`",
                lane.name,
                outcome.reason,
                outcome.status,
                one_line(outcome.detail),
                lane.queues.main,
                lane.name,
            )

    async def watch(self, stopping: asyncio.Event, interval_s: float) -> None:
        """Follow enable/disable made elsewhere: the CLI, or a 410 seen by another process."""
        failing = False
        async for _ in Ticker(stopping, interval_s, at_once=False):
            try:
                for lane in self.lanes:
                    await self._watch_cancel(lane)
                    await self._sync_marker(lane)
            except BROKER_ERRORS as exc:
                raise_if_cancelled()
                if not failing:
                    log.warning("webhook: cannot check disabled markers (%s); will retry", exc)
                failing = True
            else:
                if failing:
                    log.info("webhook: checking disabled markers again")
                failing = False

    async def _watch_cancel(self, lane: Lane) -> None:
        """Notice a main queue that lost its consumer, and see it consume again.

        The broker cancels a consumer when an operator deletes its queue or a quorum
        leader moves; aio-pika answers by reconnecting, which declares the queue and
        consumes again. This says so in the log and in /readyz, and declares the queue
        itself should it still be missing at the next check.
        """
        assert lane.queue is not None
        if lane.consumer_tag is None:
            return  # disabled: nobody should consume
        found = await self._control.inspect(lane.queue.name)
        if found is not None and (found.consumer_count or 0) > 0:
            lane.seen_missing = False
            if lane.cancelled:
                lane.cancelled = False
                log.info("webhook %s: consuming %s again", lane.name, lane.queue.name)
            return
        lane.mark_cancelled("is gone" if found is None else "has no consumer")
        if found is None and lane.seen_missing:
            # Missing at two looks in a row: aio-pika's own recovery did not bring it back.
            log.warning("webhook %s: %s is still missing; declaring it", lane.name, lane.queue.name)
            async with lane.lock:
                await self._open(lane)
                await self._consume(lane)
            lane.seen_missing = False
        else:
            lane.seen_missing = found is None

    async def _sync_marker(self, lane: Lane) -> None:
        async with lane.lock:
            disabled = await self._control.is_disabled(lane.queues)
            if disabled and lane.consumer_tag is not None:
                await self._stop_consuming(lane)
                self.metrics.subscription_enabled.labels(lane.name).set(0)
                log.warning("webhook %s: disabled elsewhere; stopped consuming", lane.name)
            elif not disabled and lane.consumer_tag is None:
                assert lane.queue is not None
                await self._consume(lane)
                log.info("webhook %s: enabled; consuming %s", lane.name, lane.queue.name)
