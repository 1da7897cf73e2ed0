"""The webhook role: consume each subscription's queue, hand events to its sink, settle outcomes.

Each subscription has its own lane (``bridge.webhook.lanes``: a channel with prefetch =
its ``concurrency``, and its own sink), so a receiver that hangs holds only its own
slots. ``_settle`` is the one place that turns an outcome into an AMQP action and a
metric. Retries wait in
broker queues (see ``bridge.webhook.queues``), so they survive a restart of this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from bridge.amqp import (
    BROKER_ERRORS,
    BROKER_TIMEOUT_S,
    TopologyError,
    connect_with_retry,
    declare_exchange,
    is_connected,
    publish_confirmed,
    raise_if_cancelled,
)
from bridge.metrics import DELIVERY_FAILURE_REASONS, Metrics
from bridge.settings import Settings
from bridge.sinks.base import Delivered, Disable, RetryLater, Sink
from bridge.sinks.registry import load_sink
from bridge.webhook.lanes import Lane, Lanes
from bridge.webhook.messages import (
    Invalid,
    InvalidMessage,
    SettleBug,
    Unmatched,
    attempt_of,
    copy_message,
    dead_headers,
    delivery_from,
    retry_headers,
    settle_bugs_of,
)
from bridge.webhook.queue_depth import QueueDepthSampler
from bridge.webhook.queues import (
    QueueControl,
    QueueSet,
    legacy_subscription_queues,
    subscription_queues,
)
from bridge.webhook.retry import delay_ladder
from bridge.webhook.settle import Ack, DeadLetter, DisableSubscription, Retry, Settled, decide
from bridge.webhook.subscriptions import Subscription

log = logging.getLogger(__name__)

MARKER_CHECK_INTERVAL_S = 5.0
"""How soon an enable/disable made elsewhere (CLI, another process) takes effect here."""
DRAIN_TIMEOUT_S = 10.0
"""On shutdown, how long deliveries in flight may finish before they are cancelled."""
HAND_BACK_PAUSE_S = 1.0
"""Before returning a message we could not settle, so a broken queue cannot spin. Each
return counts against the queue's delivery limit, which bounds them."""


def failure_label(reason: str) -> str:
    """A third-party sink's own reasons must not grow the metric's label set."""
    return reason if reason in DELIVERY_FAILURE_REASONS else "other"


class WebhookConsumer:
    """The ``webhook`` role (see ``bridge.runtime.Role``)."""

    name = "webhook"

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        subscriptions: Sequence[tuple[Subscription, Sink]],
        *,
        connection_role: str = "webhook",
        bind_exchange: str | None = None,
        lane_queues: Callable[[str], QueueSet] | None = None,
        legacy_queues: Callable[[str], QueueSet] = legacy_subscription_queues,
        replay_routes: bool = True,
        marker_check_interval_s: float = MARKER_CHECK_INTERVAL_S,
        drain_timeout_s: float = DRAIN_TIMEOUT_S,
    ) -> None:
        """Takes ready sinks and owns them: they are closed when ``run`` returns.

        By default the lanes are the deployment's subscriptions: bound to its exchange,
        named ``<exchange>.webhook.<name>``, each with a replay route. The checks role
        binds another exchange and names its one lane itself (``lane_queues``)."""
        self.settings = settings
        self.metrics = metrics
        self._bind_exchange = bind_exchange or settings.exchange
        self._replay_from = settings.exchange if replay_routes else None
        queues_of = lane_queues or partial(subscription_queues, settings.exchange)
        self._lanes = [
            Lane(s, sink, delay_ladder(s.retry_schedule), queues_of(s.name), legacy_queues(s.name))
            for s, sink in subscriptions
        ]
        for lane in self._lanes:
            lane.bind_metrics(metrics)
        self._role = connection_role
        self._marker_check_interval_s = marker_check_interval_s
        self._drain_timeout_s = drain_timeout_s
        self._connection: AbstractRobustConnection | None = None
        self._control_connection: AbstractRobustConnection | None = None
        self._control: QueueControl | None = None
        self._keeper: Lanes | None = None
        self._started = False
        self._closing = False
        self._stopping = asyncio.Event()
        """Set first on shutdown: background loops finish their step and return."""
        self._refused: TopologyError | None = None
        """Set when a queue of ours turned out to be bound to another deployment's exchange."""

    # -- lifecycle -----------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        self._connection = await connect_with_retry(self.settings, self._role, stop)
        if self._connection is None:
            return  # stopped before RabbitMQ answered
        # Passive declares on a connection of their own: the broker closes the channel of
        # one that finds no queue, and aiormq 7.2 drops the Close-Ok when the connection's
        # write queue is full (acks of busy lanes), then reuses the channel number; the
        # broker closes the whole connection ("second 'channel.open' seen").
        self._control_connection = await connect_with_retry(
            self.settings, f"{self._role}-control", stop
        )
        if self._control_connection is None:
            await self._close_connections()
            return
        self._control = QueueControl(self._control_connection)
        self._keeper = Lanes(
            self._lanes,
            self._connection,
            self._control,
            self.settings,
            self.metrics,
            self._on_message,
            bind_exchange=self._bind_exchange,
            replay_from=self._replay_from,
        )
        background: list[asyncio.Task[None]] = []
        try:
            try:
                await self._start()
            except TopologyError as exc:
                log.error("webhook: %s", exc)
                raise
            sampler = QueueDepthSampler(
                self._control_connection,
                [
                    q
                    for lane in self._lanes
                    for q in lane.queues.watched(lane.subscription.retry_schedule)
                ],
                self.metrics,
                self.settings.queue_depth_interval,
            )
            background = [
                asyncio.create_task(
                    self._keeper.watch(self._stopping, self._marker_check_interval_s),
                    name="webhook-markers",
                ),
                asyncio.create_task(sampler.run(self._stopping), name="webhook-queue-depth"),
            ]
            stopped = asyncio.create_task(stop.wait())
            refused = asyncio.create_task(self._stopping.wait())
            done, _ = await asyncio.wait(
                [stopped, refused, *background], return_when=asyncio.FIRST_COMPLETED
            )
            stopped.cancel()
            refused.cancel()
            for task in done - {stopped, refused}:
                task.result()  # a background loop only ends by raising: re-raise it
            if self._refused is not None:
                raise self._refused
        finally:
            await self._shutdown(background)

    def connected(self) -> bool:
        return is_connected(self._connection)

    def readiness(self) -> tuple[bool, str]:
        if self._connection is None or not self._started:
            return False, f"{self.name}: connecting to RabbitMQ and declaring queues"
        if not self.connected():
            return False, f"{self.name}: connection to RabbitMQ lost, reconnecting"
        cancelled = [lane.name for lane in self._lanes if lane.cancelled]
        if cancelled:
            return False, f"{self.name}: not consuming the main queue of {', '.join(cancelled)}"
        return True, ""

    async def _start(self) -> None:
        """Declare the topology once for this process, then consume every enabled subscription."""
        assert self._connection is not None and self._keeper is not None
        async with asyncio.timeout(BROKER_TIMEOUT_S):
            control = await self._connection.channel()
            await declare_exchange(control, self._bind_exchange)
        await self._keeper.start()
        self._started = True
        log.info("webhook: consuming for %d subscriptions", len(self._lanes))

    async def _shutdown(self, background: list[asyncio.Task[None]]) -> None:
        """Stop taking work, let deliveries in flight finish (bounded), close sinks, disconnect."""
        self._started = False
        self._closing = True
        self._stopping.set()
        if background:
            # Let a broker call in progress finish: cancelling one closes its channel.
            _, stuck = await asyncio.wait(background, timeout=BROKER_TIMEOUT_S)
            for task in stuck:
                log.warning(
                    "webhook: %s did not stop within %gs; cancelled",
                    task.get_name(),
                    BROKER_TIMEOUT_S,
                )
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
        if self._keeper is not None:
            await self._keeper.stop_all()
        in_flight = {task for lane in self._lanes for task in lane.in_flight}
        if in_flight:
            _, pending = await asyncio.wait(in_flight, timeout=self._drain_timeout_s)
            if pending:
                log.warning(
                    "webhook: %d deliveries still running after %gs; cancelled, "
                    "the broker will redeliver them",
                    len(pending),
                    self._drain_timeout_s,
                )
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
        for lane in self._lanes:
            try:
                async with asyncio.timeout(BROKER_TIMEOUT_S):
                    await lane.sink.close()
            except Exception as exc:
                log.warning("webhook %s: closing its sink failed (%s)", lane.name, exc)
        if self._control is not None:
            await self._control.close()
        await self._close_connections()

    async def _close_connections(self) -> None:
        for connection in (self._control_connection, self._connection):
            if connection is not None:
                with contextlib.suppress(*BROKER_ERRORS):
                    async with asyncio.timeout(BROKER_TIMEOUT_S):
                        await connection.close()

    # -- enabled / disabled ----------------------------------------------------------

    # -- one message -------------------------------------------------------------------

    async def _on_message(self, lane: Lane, message: AbstractIncomingMessage) -> None:
        """Runs in the task aiormq starts for each delivery (bounded by the channel's
        prefetch); tracked so shutdown can let it finish. If the connection drops,
        aiormq cancels it and the broker redelivers the unacked message."""
        if self._closing:
            return  # arrived after our cancel: left unacked, the broker requeues it on close
        task = asyncio.current_task()
        assert task is not None
        lane.in_flight.add(task)
        try:
            await self._handle(lane, message)
        finally:
            lane.in_flight.discard(task)

    async def _handle(self, lane: Lane, message: AbstractIncomingMessage) -> None:
        assert self._keeper is not None
        foreign = self._keeper.foreign_exchange(message)
        if foreign is not None:
            await self._refuse(lane, message, foreign)
            return
        attempt = attempt_of(message)
        try:
            await self._settle(lane, message, attempt, await self._outcome(lane, message))
        except BROKER_ERRORS as exc:
            raise_if_cancelled()
            log.warning(
                "webhook %s: could not settle event %s (%s: %s); the broker will redeliver it",
                lane.name,
                message.message_id,
                type(exc).__name__,
                exc,
            )
            await _hand_back(message)
        except Exception as exc:
            raise_if_cancelled()
            await self._settle_bug(lane, message, attempt, exc)

    async def _refuse(self, lane: Lane, message: AbstractIncomingMessage, exchange: str) -> None:
        """Another deployment's event in our queue: hand it back untouched and stop the role
        with one line (``run`` raises it): delivering it would cross deployments."""
        assert self._keeper is not None
        with contextlib.suppress(*BROKER_ERRORS):
            await message.nack(requeue=True)
        if self._refused is None:
            self._refused = self._keeper.refusal(lane, exchange)
            log.error("%s %s: %s", self.name, lane.name, self._refused)
            self._stopping.set()

    async def _outcome(self, lane: Lane, message: AbstractIncomingMessage) -> Settled:
        try:
            delivery = delivery_from(message)
        except InvalidMessage as exc:
            return Invalid(str(exc))
        if not lane.wants(delivery.routing_key):
            return Unmatched(delivery.routing_key)
        started = time.monotonic()
        outcome = await lane.deliver(delivery)
        lane.duration.observe(time.monotonic() - started)
        return outcome

    async def _settle_bug(
        self, lane: Lane, message: AbstractIncomingMessage, attempt: int, exc: Exception
    ) -> None:
        """A bug of ours while settling: a traceback once per kind, then a bounded retry.

        The message is retried a few times and then dead-lettered with the error's
        summary; if even that raises, it goes back to the broker, whose delivery
        limit (see ``bridge.amqp.queue_arguments``) dead-letters it in the end.
        """
        kind = type(exc).__name__
        if f"bug:{kind}" not in lane.logged_errors:
            lane.logged_errors.add(f"bug:{kind}")
            log.exception("webhook %s: bug while settling event %s", lane.name, message.message_id)
        bug = SettleBug(f"{kind}: {exc}", settle_bugs_of(message) + 1)
        try:
            await self._settle(lane, message, attempt, bug)
        except Exception as again:
            raise_if_cancelled()
            log.warning(
                "webhook %s: could not set event %s aside either (%s); handing it back",
                lane.name,
                message.message_id,
                type(again).__name__,
            )
            await _hand_back(message)

    async def _settle(
        self, lane: Lane, message: AbstractIncomingMessage, attempt: int, outcome: Settled
    ) -> None:
        """Carry out ``decide``'s action; one metric per outcome.

        A copy is always confirmed by the broker before the original is acked, so a
        crash in between leaves a duplicate, never a loss. The ack (or the nack of a
        disable) comes last, so a bug raised before it leaves the message ours to settle.
        """
        name = lane.name
        action = decide(outcome, attempt, lane.subscription.retry_schedule, lane.ladder)
        match action:
            case Ack(label="delivered"):
                lane.delivered.inc()
                await _ack(message)
                return
            case Ack():
                assert isinstance(outcome, Unmatched)
                self._note_unmatched(lane, outcome.routing_key)
            case Retry(delay_s=delay_s, next_attempt=next_attempt):
                assert isinstance(outcome, RetryLater | SettleBug)
                headers = retry_headers(message, outcome, next_attempt)
                await self._copy(lane, message, lane.queues.retry(delay_s), headers)
                log.info(
                    "webhook %s: event %s attempt %d failed (%s: %s); retry in %gs",
                    name,
                    message.message_id,
                    attempt,
                    outcome.reason,
                    outcome.detail,
                    delay_s,
                )
            case DisableSubscription():
                assert isinstance(outcome, Disable) and self._keeper is not None
                await self._keeper.disable(lane, outcome)
            case DeadLetter(attempts=attempts):
                assert not isinstance(outcome, Delivered | Disable | Unmatched)
                headers = dead_headers(message, outcome, attempts)
                await self._copy(lane, message, lane.queues.dead, headers)
                log.warning(
                    "webhook %s: event %s dead-lettered after %d attempts (%s: %s)",
                    name,
                    message.message_id,
                    attempts,
                    outcome.reason,
                    outcome.detail,
                )
        self.metrics.deliveries.labels(name, action.label).inc()
        if not isinstance(outcome, Delivered | Unmatched):
            self.metrics.delivery_failures.labels(name, failure_label(outcome.reason)).inc()
        if isinstance(action, DisableSubscription):
            await message.nack(requeue=True)  # it waits in the main queue, in its place
        else:
            await _ack(message)

    def _note_unmatched(self, lane: Lane, key: str) -> None:
        if key in lane.unmatched_keys:
            return
        lane.unmatched_keys.add(key)
        log.warning(
            "webhook %s: acked %s events without delivering them: no pattern of "
            "events = %s matches; %s keeps a binding from an earlier "
            "configuration (`rabbitmqctl list_bindings` shows it; remove it there)",
            lane.name,
            key,
            list(lane.subscription.events),
            lane.queues.main,
        )

    async def _copy(
        self, lane: Lane, message: AbstractIncomingMessage, queue: str, headers: dict[str, Any]
    ) -> None:
        """Publish a copy to ``queue`` and wait for the broker's confirm."""
        assert lane.queue is not None
        await publish_confirmed(lane.queue.channel, queue, copy_message(message, headers))


async def _ack(message: AbstractIncomingMessage) -> None:
    """basic.ack, queued for the connection's writer without waiting until it is written.

    aio-pika's ``message.ack()`` waits for that, which cost a future and a task switch
    per delivery in profiles, and guarantees nothing more: the broker never answers an
    ack, and a connection lost before it is sent redelivers the message either way.
    """
    assert message.delivery_tag is not None  # never consumed with no_ack
    await message.channel.basic_ack(message.delivery_tag, wait=False)


async def _hand_back(message: AbstractIncomingMessage) -> None:
    """Requeue a message we could not settle; if the channel is gone, the broker does it."""
    await asyncio.sleep(HAND_BACK_PAUSE_S)
    with contextlib.suppress(*BROKER_ERRORS):
        await message.nack(requeue=True)


def build_consumer(
    settings: Settings, metrics: Metrics, subscriptions: list[Subscription]
) -> WebhookConsumer:
    """The webhook role for the subscriptions loaded from BRIDGE_SUBSCRIPTIONS."""
    return WebhookConsumer(settings, metrics, [(s, load_sink(s)) for s in subscriptions])
