"""One lane at run time: its channel, queues and consumer, whether it is enabled, the
deliveries in flight, and what becomes of each message (``bridge.delivery.settle``
decides, the lane carries it out). Nothing here knows which role it serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from bridge.broker.calls import BROKER_TIMEOUT_S, raise_if_cancelled
from bridge.broker.errors import BROKER_ERRORS, BROKER_TROUBLE, TopologyError
from bridge.broker.topology import QueueType, publish_confirmed
from bridge.delivery.breaker import NO_BREAKER, Breaker, BreakerSpec, receiver_down
from bridge.delivery.history import Attempt, attempt_at
from bridge.delivery.messages import (
    Facts,
    InvalidMessage,
    copy_message,
    delivery_from,
)
from bridge.delivery.outcomes import (
    Delivered,
    Delivery,
    Disable,
    GiveUp,
    Invalid,
    Outcome,
    RetryLater,
    SettleBug,
    Settled,
    Sink,
    Unmatched,
)
from bridge.delivery.pace import Pace
from bridge.delivery.queues import QueueControl, QueueSet, declare_lane, until_declared
from bridge.delivery.retry import levels_for
from bridge.delivery.settle import (
    Ack,
    Copy,
    Hold,
    Instruction,
    Plan,
    Wait,
    decide,
    unspent,
    wait_if_early,
)
from bridge.logs import one_line
from bridge.metrics import DELIVERY_FAILURE_REASONS, WEBHOOK_FAILURE_REASONS, Metrics
from bridge.topics import TopicMatcher

log = logging.getLogger(__name__)

SINK_GRACE_S = 5.0
"""A sink gets its lane's timeout plus this before the lane gives up on it."""
HAND_BACK_PAUSE_S = 1.0
"""Before returning a message we could not settle, so a broken queue cannot spin. Each
return counts against the queue's delivery limit, which bounds them."""


@dataclass(frozen=True, slots=True)
class LaneSpec:
    """What the engine needs to run one lane: a subscription's, or the checks role's."""

    name: str
    queues: QueueSet
    exchange: str
    """What the main queue is bound to, with ``patterns``."""
    patterns: tuple[str, ...]
    retry_schedule: tuple[float, ...]
    concurrency: int
    """Deliveries at once; the channel's prefetch."""
    timeout_s: float
    """One attempt, at most."""
    replay_from: str | None = None
    """The event exchange whose replay route mirrors the bindings (None: no route)."""
    legacy: QueueSet | None = None
    """Its queues as versions before 0.2 named them, shared by every deployment."""
    breaker: BreakerSpec = NO_BREAKER
    rate: float | None = None
    """Attempts a second at most, over all the processes consuming its queue (None: any)."""


@dataclass(frozen=True, slots=True)
class Tried:
    """A sink's outcome, with when the attempt started and how long it took."""

    outcome: Outcome
    delivery: Delivery
    at: datetime
    took_s: float


def failure_label(reason: str) -> str:
    """A third-party sink's own reasons must not grow the metric's label set."""
    return reason if reason in DELIVERY_FAILURE_REASONS else "other"


class Lane:
    def __init__(
        self,
        spec: LaneSpec,
        sink: Sink,
        *,
        role: str,
        metrics: Metrics,
        control: QueueControl,
        queue_type: QueueType,
        refuse: Callable[[TopologyError], None],
        history: Callable[[Attempt], None] | None = None,
    ) -> None:
        """``role`` names the lane in logs; ``refuse`` stops the role (a queue of ours bound
        to another deployment's exchange). The lane owns ``sink`` from here on."""
        self.spec = spec
        self.sink = sink
        self.label = role if spec.name == role else f"{role} {spec.name}"
        self._metrics = metrics
        self._control = control
        self._queue_type = queue_type
        self._refuse = refuse
        self._history = history
        """Where each attempt's record goes (None: kept nowhere)."""
        self._plan = Plan(spec.queues, spec.retry_schedule, levels_for(spec.retry_schedule))
        self._old_retries = dict.fromkeys(spec.queues.legacy_retries(spec.retry_schedule), False)
        """Retry queues of an earlier version still to delete once empty, and whether the log
        said what one still held."""
        self._wants = TopicMatcher(spec.patterns)
        self._sink_times_out = bool(getattr(sink, "enforces_timeout", False))
        self.queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._lock = asyncio.Lock()
        """Held while consuming starts or stops: a 410 and the watcher cannot interleave."""
        self.in_flight: set[asyncio.Task[None]] = set()
        self.closing = False
        """Set on shutdown: a message arriving after our cancel is left to the broker."""
        self.cancelled = False
        """The broker cancelled our consumer (queue deleted, quorum leader moved) and it is
        not consuming again yet."""
        self._seen_missing = False
        self._logged: set[str] = set()
        """Kinds of sink errors and bugs whose traceback was logged (once each)."""
        self._unmatched: set[str] = set()
        # The metric children of the hot path, looked up once instead of per delivery.
        metrics.in_flight.labels(spec.name).set_function(lambda: len(self.in_flight))
        self._duration = metrics.delivery_duration.labels(spec.name)
        self._delivered = metrics.deliveries.labels(spec.name, "delivered")
        self._enabled = metrics.subscription_enabled.labels(spec.name)
        self.breaker = Breaker(spec.breaker)
        self._breaker_open = metrics.breaker_open.labels(spec.name)
        self._breaker_open.set(0)
        for result in ("ok", "failed", "empty"):
            metrics.breaker_probes.labels(spec.name, result)
        metrics.lane_started(spec.name, getattr(sink, "failure_reasons", WEBHOOK_FAILURE_REASONS))
        self._pace = Pace(spec.rate) if spec.rate else None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def watched(self) -> list[str]:
        """Its main, retry and dead queues: whose depth an operator watches."""
        return self.spec.queues.watched(self.spec.retry_schedule)

    @property
    def consuming(self) -> bool:
        return self._consumer_tag is not None

    # -- its queues and its consumer -----------------------------------------------------

    async def open(self, connection: AbstractRobustConnection) -> None:
        """A channel of its own (prefetch = concurrency) and its declared, bound queues."""
        spec = self.spec

        async def declare(channel: AbstractChannel) -> AbstractQueue:
            return await declare_lane(
                channel,
                spec.exchange,
                spec.queues,
                spec.patterns,
                spec.retry_schedule,
                self._queue_type,
                replay_from=spec.replay_from,
            )

        channel, self.queue = await until_declared(
            connection, declare, self.label, prefetch=spec.concurrency
        )
        self._hear_broker_cancel(channel)
        await self._leave_legacy(channel)
        await self.tidy_old_retries()
        await self._check_head()

    async def start(self) -> None:
        """Consume, unless its marker says it is disabled or its breaker is open."""
        if self.spec.breaker.failures and await self._control.is_breaker_open(self.spec.queues):
            self._note_open_elsewhere()
        if await self._control.is_disabled(self.spec.queues):
            self._enabled.set(0)
            log.warning(
                "%s: disabled (marker queue %s exists); events wait in %s",
                self.label,
                self.spec.queues.marker,
                self.spec.queues.main,
            )
        elif not self.breaker.open:
            await self._consume()

    async def stop(self) -> None:
        if self._consumer_tag is not None:
            await self._stop_consuming()

    async def _consume(self) -> None:
        assert self.queue is not None
        # Enabled from before the first delivery can arrive (it may, before consume returns).
        self._enabled.set(1)
        try:
            self._consumer_tag = await self.queue.consume(self._arrived, timeout=BROKER_TIMEOUT_S)
        except BaseException:
            self._enabled.set(0)
            raise

    async def _stop_consuming(self) -> None:
        """Cancel the consumer; its unacked messages stay ours to settle."""
        tag, self._consumer_tag = self._consumer_tag, None
        if tag is None or self.queue is None:
            return
        try:
            await self.queue.cancel(tag, timeout=BROKER_TIMEOUT_S)
        except BROKER_TROUBLE as exc:
            raise_if_cancelled()
            # The robust queue has already forgotten the consumer: it is not restored.
            log.warning("%s: cancelling its consumer failed (%s)", self.label, exc)

    def _hear_broker_cancel(self, channel: AbstractChannel) -> None:
        """Say so the moment the broker cancels the consumer (queue deleted, quorum leader
        moved). aio-pika recovers by reconnecting, often before the watcher's next look
        at the queue; the watcher then says when it consumes again."""

        def cancelled(_: object) -> None:
            if self._consumer_tag is not None:  # not our own cancel of a disabled lane
                self._mark_cancelled("is gone or lost its consumer")

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

    def _mark_cancelled(self, what: str) -> None:
        """Not consuming its main queue: one warning, and /readyz says so until it is."""
        if self.cancelled or self.queue is None:
            return
        self.cancelled = True
        log.warning(
            "%s: %s %s (deleted by an operator, or its quorum leader moved); "
            "consuming again as soon as it is back",
            self.label,
            self.queue.name,
            what,
        )

    async def _leave_legacy(self, channel: AbstractChannel) -> None:
        """An old main queue of this lane stops getting this deployment's events (the new
        one is bound now), and one line says what still waits in it."""
        legacy = self.spec.legacy
        if legacy is None:
            return
        found = await self._control.inspect(legacy.main)
        if found is None:
            return
        async with asyncio.timeout(BROKER_TIMEOUT_S):
            old = await channel.get_queue(legacy.main, ensure=False)
            for pattern in self.spec.patterns:
                await old.unbind(self.spec.exchange, pattern)
        log.warning(
            "%s: %s, as versions before 0.2 named this lane's queue, still exists (%d "
            "messages); no longer bound to %s. `patchwork-bridge migrate` moves this "
            "deployment's messages (and those of its retry and dead queues) into %s",
            self.label,
            legacy.main,
            found.message_count or 0,
            self.spec.exchange,
            self.spec.queues.main,
        )

    async def tidy_old_retries(self) -> None:
        """Delete the retry queues of an earlier version's ladder once they are empty: what
        waits there comes back to the main queue by itself, within that queue's TTL."""
        for name, said in list(self._old_retries.items()):
            held = await self._control.delete_if_empty(name)
            if held == 0:
                del self._old_retries[name]
                if said:
                    log.info(
                        "%s: %s, a retry queue of an earlier version, is empty: deleted",
                        self.label,
                        name,
                    )
            elif not said:
                log.info(
                    "%s: %s, a retry queue of an earlier version, holds %d events; they "
                    "come back by themselves, and it is deleted once empty",
                    self.label,
                    name,
                    held,
                )
                self._old_retries[name] = True

    async def _check_head(self) -> None:
        """The message at the head of the main queue, looked at and handed back: one routed
        from another deployment's exchange stops the start (TopologyError)."""
        assert self.queue is not None
        head = await self.queue.get(no_ack=False, fail=False, timeout=BROKER_TIMEOUT_S)
        if head is None:
            return
        await head.nack(requeue=True)  # back in its place
        foreign = self._foreign_exchange(head)
        if foreign is not None:
            raise self._refusal(foreign)

    def _foreign_exchange(self, message: AbstractIncomingMessage) -> str | None:
        """The exchange a message was routed from when that is another deployment's: a
        queue of this deployment's name bound to it would mix their events."""
        exchange = message.exchange
        if not exchange or exchange == self.spec.exchange:
            return None  # moved between our queues, or routed from our exchange
        replay = self.spec.replay_from
        if replay is not None and exchange.startswith(f"{replay}.replay."):
            return None  # a replay's copy, through the queue's replay route
        return exchange

    def _refusal(self, exchange: str) -> TopologyError:
        return TopologyError(
            f"{self.spec.queues.main} is bound to exchange {exchange}, not only to this "
            f"deployment's {self.spec.exchange}: its queues must be its own; unbind it "
            "(rabbitmqctl list_bindings shows it), or give this deployment another "
            "BRIDGE_EXCHANGE"
        )

    # -- enabled or not, and found again -------------------------------------------------

    async def disable(self, outcome: Disable) -> None:
        """Stop consuming and persist the state; the first 410 does it, later ones find it done."""
        async with self._lock:
            if self._consumer_tag is None:
                return
            await self._stop_consuming()
            self._enabled.set(0)
            try:
                await self._control.set_disabled(self.spec.queues, True, self._queue_type)
            except BROKER_TROUBLE as exc:
                raise_if_cancelled()
                log.error(
                    "%s: could not persist the disabled state (%s); "
                    "it resumes at the next marker check",
                    self.label,
                    type(exc).__name__,
                )
            log.warning(
                "%s: disabled (%s, status %s: %s); events wait in %s until "
                "`patchwork-bridge subscriptions enable %s`",
                self.label,
                outcome.reason,
                outcome.status,
                one_line(outcome.detail),
                self.spec.queues.main,
                self.name,
            )

    async def follow_marker(self) -> None:
        """Follow an enable or disable made elsewhere: the CLI, or a 410 another process saw."""
        async with self._lock:
            disabled = await self._control.is_disabled(self.spec.queues)
            if disabled and self._consumer_tag is not None:
                await self._stop_consuming()
                self._enabled.set(0)
                log.warning("%s: disabled elsewhere; stopped consuming", self.label)
            elif not disabled and self._consumer_tag is None and not self.breaker.open:
                assert self.queue is not None
                await self._consume()
                log.info("%s: enabled; consuming %s", self.label, self.queue.name)

    async def follow_cancel(self, connection: AbstractRobustConnection) -> None:
        """Notice a main queue that lost its consumer, and see it consume again.

        The broker cancels a consumer when an operator deletes its queue or a quorum
        leader moves; aio-pika answers by reconnecting, which declares the queue and
        consumes again. This says so in the log and in /readyz, and declares the queue
        itself should it still be missing at the next look.
        """
        assert self.queue is not None
        if self._consumer_tag is None:
            return  # disabled: nobody should consume
        found = await self._control.inspect(self.queue.name)
        if found is not None and self._pace is not None:
            self._pace.share = max(1, found.consumer_count or 0)
        if found is not None and (found.consumer_count or 0) > 0:
            self._seen_missing = False
            if self.cancelled:
                self.cancelled = False
                log.info("%s: consuming %s again", self.label, self.queue.name)
            return
        self._mark_cancelled("is gone" if found is None else "has no consumer")
        if found is None and self._seen_missing:
            # Missing at two looks in a row: aio-pika's own recovery did not bring it back.
            log.warning("%s: %s is still missing; declaring it", self.label, self.queue.name)
            async with self._lock:
                await self.open(connection)
                await self._consume()
            self._seen_missing = False
        else:
            self._seen_missing = found is None

    # -- the circuit breaker ---------------------------------------------------------------

    async def _open_breaker(self, outcome: Settled) -> None:
        """Stop consuming and say so on the broker; events wait in the main queue."""
        async with self._lock:
            if self.breaker.open:
                return
            self.breaker.opened(time.monotonic())
            self._breaker_open.set(1)
            if self._consumer_tag is not None:
                await self._stop_consuming()
            await self._persist_breaker(True)
        log.warning(
            "%s: circuit breaker open after %d failures in a row (last: %s: %s); events "
            "wait in %s, one is sent as a probe in %gs, then at doubling intervals",
            self.label,
            self.spec.breaker.failures,
            getattr(outcome, "reason", "?"),
            one_line(getattr(outcome, "detail", "")),
            self.spec.queues.main,
            self.breaker.interval_s,
        )

    def _note_open_elsewhere(self) -> None:
        self.breaker.opened(time.monotonic())
        self._breaker_open.set(1)
        log.warning(
            "%s: circuit breaker open (marker %s); events wait in %s, probing in %gs",
            self.label,
            self.spec.queues.breaker,
            self.spec.queues.main,
            self.breaker.interval_s,
        )

    async def follow_breaker(self) -> None:
        """Follow the breaker's marker (opened or closed by another process), and probe
        when a probe is due."""
        if not self.spec.breaker.failures:
            return
        marked = await self._control.is_breaker_open(self.spec.queues)
        async with self._lock:
            if marked and not self.breaker.open:
                if self._consumer_tag is not None:
                    await self._stop_consuming()
                self._note_open_elsewhere()
                return
            if not marked and self.breaker.open:
                self.breaker.closed()
                self._breaker_open.set(0)
                log.info("%s: circuit breaker closed elsewhere", self.label)
                await self._consume_unless_disabled()
                return
        if self.breaker.probe_due(time.monotonic()):
            await self._probe()

    async def _probe(self) -> None:
        """One event from the main queue, attempted; no attempt is spent if it fails."""
        assert self.queue is not None
        if await self._control.is_disabled(self.spec.queues):
            return  # an operator's word wins; the probe waits until it is enabled
        message = await self.queue.get(no_ack=False, fail=False, timeout=BROKER_TIMEOUT_S)
        if message is None:
            self._metrics.breaker_probes.labels(self.name, "empty").inc()
            await self._close_breaker("nothing waits to probe with", half_open=True)
            return
        # Not one to probe with (not due, or no sink would take it): settled as the
        # consumer would settle it; the next tick probes again.
        facts = Facts.of(message)
        early = wait_if_early(facts, self._plan, _now())
        if early is not None:
            await self._wait(message, early)
            return
        delivery = self._read(message)
        if not isinstance(delivery, Delivery):
            await self._carry_out(message, decide(delivery, facts, self._plan, _now()))
            return
        tried = await self._attempt(delivery)
        outcome = tried.outcome
        if receiver_down(outcome):
            self._metrics.breaker_probes.labels(self.name, "failed").inc()
            self.breaker.probe_failed(time.monotonic())
            await self._wait(message, unspent(facts, self._plan))
            self._remember(tried, "probe_failed")
            log.info(
                "%s: probe with event %s failed (%s: %s); next probe in %gs",
                self.label,
                delivery.message_id,
                getattr(outcome, "reason", "?"),
                one_line(getattr(outcome, "detail", "")),
                self.breaker.interval_s,
            )
            return
        self._metrics.breaker_probes.labels(self.name, "ok").inc()
        instruction = decide(outcome, facts, self._plan, _now())
        await self._carry_out(message, instruction)
        self._remember(tried, instruction.label)
        await self._close_breaker(f"probe with event {delivery.message_id} answered")

    async def _close_breaker(self, why: str, *, half_open: bool = False) -> None:
        async with self._lock:
            self.breaker.closed(half_open=half_open)
            self._breaker_open.set(0)
            await self._persist_breaker(False)
            await self._consume_unless_disabled()
        log.info(
            "%s: circuit breaker closed (%s); consuming %s", self.label, why, self.spec.queues.main
        )

    async def _consume_unless_disabled(self) -> None:
        if self._consumer_tag is None and not await self._control.is_disabled(self.spec.queues):
            await self._consume()

    async def _persist_breaker(self, is_open: bool) -> None:
        try:
            await self._control.set_breaker_open(self.spec.queues, is_open, self._queue_type)
        except BROKER_TROUBLE as exc:
            raise_if_cancelled()
            log.error(
                "%s: could not record the breaker as %s on the broker (%s); other processes "
                "follow at the next marker check",
                self.label,
                "open" if is_open else "closed",
                type(exc).__name__,
            )

    # -- one message -----------------------------------------------------------------------

    async def _arrived(self, message: AbstractIncomingMessage) -> None:
        """Runs in the task aiormq starts for each delivery (bounded by the prefetch); tracked
        so shutdown can let it finish. If the connection drops, aiormq cancels it and the
        broker redelivers the unacked message."""
        if self.closing:
            return  # arrived after our cancel: left unacked, the broker requeues it on close
        task = asyncio.current_task()
        assert task is not None
        self.in_flight.add(task)
        try:
            await self._handle(message)
        finally:
            self.in_flight.discard(task)

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        foreign = self._foreign_exchange(message)
        if foreign is not None:
            # Another deployment's event: hand it back untouched and stop the role.
            with contextlib.suppress(*BROKER_ERRORS):
                await message.nack(requeue=True)
            self._refuse(self._refusal(foreign))
            return
        facts = Facts.of(message)
        try:
            early = wait_if_early(facts, self._plan, _now())
            if early is not None:
                await self._wait(message, early)
                return
            result = await self._outcome(message)
            if result is None:  # the breaker opened before its turn: not attempted
                await self._wait(message, unspent(facts, self._plan))
                return
            outcome = result.outcome if isinstance(result, Tried) else result
            if self.breaker.saw(outcome):
                await self._open_breaker(outcome)
            instruction = decide(outcome, facts, self._plan, _now())
            await self._carry_out(message, instruction)
            if isinstance(result, Tried):
                self._remember(result, instruction.label)
        except BROKER_TROUBLE as exc:
            raise_if_cancelled()
            log.warning(
                "%s: could not settle event %s (%s: %s); the broker will redeliver it",
                self.label,
                message.message_id,
                type(exc).__name__,
                exc,
            )
            await _hand_back(message)
        except Exception as exc:
            raise_if_cancelled()
            await self._settle_bug(message, facts, exc)

    async def _outcome(self, message: AbstractIncomingMessage) -> Settled | Tried | None:
        """What became of the attempt (Tried when a sink was asked); None when the breaker
        is open by its turn."""
        delivery = self._read(message)
        if not isinstance(delivery, Delivery):
            return delivery
        if self._pace is not None:
            await self._pace.turn()
        if self.breaker.open:
            return None
        return await self._attempt(delivery)

    def _read(self, message: AbstractIncomingMessage) -> Delivery | Invalid | Unmatched:
        """What a sink would be handed, or why no sink is handed it."""
        try:
            delivery = delivery_from(message)
        except InvalidMessage as exc:
            return Invalid(str(exc))
        if not self._wants(delivery.routing_key):
            return Unmatched(delivery.routing_key)
        return delivery

    async def _attempt(self, delivery: Delivery) -> Tried:
        at = _now()
        started = time.monotonic()
        outcome = await self._deliver(delivery)
        took_s = time.monotonic() - started
        self._duration.observe(took_s)
        return Tried(outcome, delivery, at, took_s)

    def _remember(self, tried: Tried, what_became: str) -> None:
        """The attempt's record in the attempt history (``bridge.delivery.history``)."""
        if self._history is None:
            return
        outcome, delivery = tried.outcome, tried.delivery
        failed = not isinstance(outcome, Delivered)
        self._history(
            Attempt(
                subscription=self.name,
                event=delivery.message_id,
                routing_key=delivery.routing_key,
                attempt=delivery.attempt,
                at=attempt_at(tried.at),
                duration_ms=round(tried.took_s * 1000, 1),
                outcome=what_became,
                status=outcome.status,
                reason=outcome.reason if failed else None,  # type: ignore[union-attr]
                detail=one_line(outcome.detail) if failed else "",  # type: ignore[union-attr]
            )
        )

    async def _deliver(self, delivery: Delivery) -> Outcome:
        """The sink's outcome; a sink that raises, hangs or answers nonsense is retried."""
        limit_s = self.spec.timeout_s + SINK_GRACE_S
        deadline: asyncio.Timeout | None = None
        try:
            if self._sink_times_out:  # it needs no second deadline
                outcome = await self.sink.deliver(delivery)
            else:
                async with (deadline := asyncio.timeout(limit_s)):
                    outcome = await self.sink.deliver(delivery)
        except Exception as exc:
            if isinstance(exc, TimeoutError) and deadline is not None and deadline.expired():
                return RetryLater("timeout", f"sink gave no outcome within {limit_s:g}s")
            kind = type(exc).__name__
            if kind not in self._logged:  # a traceback once per kind, not per event
                self._logged.add(kind)
                log.exception("%s: sink raised %s", self.label, kind)
            else:
                log.warning("%s: sink raised %s again", self.label, kind)
            return RetryLater("sink_error", kind)
        if not isinstance(outcome, Delivered | RetryLater | GiveUp | Disable):
            return RetryLater("sink_error", f"sink returned {type(outcome).__name__}")
        return outcome

    async def _wait(self, message: AbstractIncomingMessage, wait: Wait) -> None:
        """Park a copy that is not due yet in the next delay level; no attempt, no count."""
        assert self.queue is not None
        await publish_confirmed(self.queue.channel, wait.queue, copy_message(message, wait.headers))
        await _ack(message)

    async def _carry_out(self, message: AbstractIncomingMessage, instruction: Instruction) -> None:
        """The instruction, then its metrics. The ack (or the nack of a hold) comes last, so
        a bug raised before it leaves the message ours to settle."""
        match instruction:
            case Ack(label="delivered"):
                self._delivered.inc()
                await _ack(message)
                return
            case Ack(unmatched=key):
                self._say_unmatched(key)
            case Copy(queue=queue, headers=headers, said=said, warn=warn):
                assert self.queue is not None
                copy = copy_message(message, headers)
                await publish_confirmed(self.queue.channel, queue, copy)
                log.log(logging.WARNING if warn else logging.INFO, "%s: %s", self.label, said)
            case Hold(outcome=outcome):
                await self.disable(outcome)
        self._metrics.deliveries.labels(self.name, instruction.label).inc()
        if isinstance(instruction, Copy | Hold):
            self._metrics.delivery_failures.labels(
                self.name, failure_label(instruction.reason)
            ).inc()
        if isinstance(instruction, Hold):
            await message.nack(requeue=True)  # it waits in the main queue, in its place
        else:
            await _ack(message)

    async def _settle_bug(
        self, message: AbstractIncomingMessage, facts: Facts, exc: Exception
    ) -> None:
        """A bug of ours while settling: a traceback once per kind, then a bounded retry.

        The message is retried a few times and then dead-lettered with the error's
        summary; if even that raises, it goes back to the broker, whose delivery
        limit (see ``bridge.broker.topology.queue_arguments``) dead-letters it in the end.
        """
        kind = type(exc).__name__
        if f"bug:{kind}" not in self._logged:
            self._logged.add(f"bug:{kind}")
            log.exception("%s: bug while settling event %s", self.label, message.message_id)
        bug = SettleBug(f"{kind}: {exc}", facts.settle_bugs + 1)
        try:
            await self._carry_out(message, decide(bug, facts, self._plan, _now()))
        except Exception as again:
            raise_if_cancelled()
            log.warning(
                "%s: could not set event %s aside either (%s); handing it back",
                self.label,
                message.message_id,
                type(again).__name__,
            )
            await _hand_back(message)

    def _say_unmatched(self, key: str | None) -> None:
        if key is None or key in self._unmatched:
            return
        self._unmatched.add(key)
        log.warning(
            "%s: acked %s events without delivering them: no pattern of "
            "events = %s matches; %s keeps a binding from an earlier "
            "configuration (`rabbitmqctl list_bindings` shows it; remove it there)",
            self.label,
            key,
            list(self.spec.patterns),
            self.spec.queues.main,
        )


def _now() -> datetime:
    return datetime.now(UTC)


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
