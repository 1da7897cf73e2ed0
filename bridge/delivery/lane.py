"""One lane at run time: its channel, queues and consumer, whether it is enabled or its
breaker open, and the deliveries in flight. What a sink is handed and answers is
``bridge.delivery.attempts``; what becomes of each message ``bridge.delivery.settle``
decides and ``bridge.delivery.carry_out`` carries out. Nothing here knows which role it
serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import warnings
from collections.abc import Callable
from datetime import UTC, datetime

from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from bridge.broker.calls import BROKER_TIMEOUT_S, raise_if_cancelled
from bridge.broker.errors import BROKER_ERRORS, BROKER_TROUBLE, TopologyError
from bridge.broker.topology import QueueType
from bridge.delivery.attempts import Attempts, Tried
from bridge.delivery.breaker import Breaker, receiver_down
from bridge.delivery.carry_out import Settler, hand_back
from bridge.delivery.history import Attempt
from bridge.delivery.messages import Facts
from bridge.delivery.outcomes import Delivery, Disable, Settled, Sink
from bridge.delivery.ownership import (
    OldRetries,
    check_head,
    foreign_exchange,
    leave_legacy,
    refusal,
)
from bridge.delivery.pace import Pace
from bridge.delivery.queues import QueueControl, declare_lane, until_declared
from bridge.delivery.retry import levels_for
from bridge.delivery.settle import Hold, Instruction, Plan, decide, unspent, wait_if_early
from bridge.delivery.spec import LaneSpec
from bridge.logs import one_line
from bridge.metrics import WEBHOOK_FAILURE_REASONS, Metrics

log = logging.getLogger(__name__)


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
        self.label = role if spec.name == role else f"{role} {spec.name}"
        self._metrics = metrics
        self._control = control
        self._queue_type = queue_type
        self._refuse = refuse
        self._plan = Plan(spec.queues, spec.retry_schedule, levels_for(spec.retry_schedule))
        self._attempts = Attempts(
            spec.name, self.label, sink, spec.patterns, spec.timeout_s, metrics, history
        )
        self._settler = Settler(
            spec.name, self.label, lambda: self.queue, self._plan, metrics, spec.patterns
        )
        self._old_retries = OldRetries(spec, control, self.label)
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
        metrics.in_flight.labels(spec.name).set_function(lambda: len(self.in_flight))
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

        channel, queue = await until_declared(
            connection, declare, self.label, prefetch=spec.concurrency
        )
        self.queue = queue
        self._hear_broker_cancel(channel)
        await leave_legacy(channel, spec, self._control, self.label)
        await self.tidy_old_retries()
        await check_head(queue, spec)

    async def tidy_old_retries(self) -> None:
        await self._old_retries.tidy()

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
            await self._settler.wait(message, early)
            return
        delivery = self._attempts.read(message)
        if not isinstance(delivery, Delivery):
            await self._carry_out(message, decide(delivery, facts, self._plan, _now()))
            return
        tried = await self._attempts.attempt(delivery)
        outcome = tried.outcome
        if receiver_down(outcome):
            self._metrics.breaker_probes.labels(self.name, "failed").inc()
            self.breaker.probe_failed(time.monotonic())
            await self._settler.wait(message, unspent(facts, self._plan))
            self._attempts.remember(tried, "probe_failed")
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
        self._attempts.remember(tried, instruction.label)
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
        foreign = foreign_exchange(message, self.spec)
        if foreign is not None:
            # Another deployment's event: hand it back untouched and stop the role.
            with contextlib.suppress(*BROKER_ERRORS):
                await message.nack(requeue=True)
            self._refuse(refusal(self.spec, foreign))
            return
        facts = Facts.of(message)
        try:
            early = wait_if_early(facts, self._plan, _now())
            if early is not None:
                await self._settler.wait(message, early)
                return
            result = await self._outcome(message)
            if result is None:  # the breaker opened before its turn: not attempted
                await self._settler.wait(message, unspent(facts, self._plan))
                return
            outcome = result.outcome if isinstance(result, Tried) else result
            if self.breaker.saw(outcome):
                await self._open_breaker(outcome)
            instruction = decide(outcome, facts, self._plan, _now())
            await self._carry_out(message, instruction)
            if isinstance(result, Tried):
                self._attempts.remember(result, instruction.label)
        except BROKER_TROUBLE as exc:
            raise_if_cancelled()
            log.warning(
                "%s: could not settle event %s (%s: %s); the broker will redeliver it",
                self.label,
                message.message_id,
                type(exc).__name__,
                exc,
            )
            await hand_back(message)
        except Exception as exc:
            raise_if_cancelled()
            await self._settler.settle_bug(message, facts, exc)

    async def _outcome(self, message: AbstractIncomingMessage) -> Settled | Tried | None:
        """What became of the attempt (Tried when a sink was asked); None when the breaker
        is open by its turn."""
        delivery = self._attempts.read(message)
        if not isinstance(delivery, Delivery):
            return delivery
        if self._pace is not None:
            await self._pace.turn()
        if self.breaker.open:
            return None
        return await self._attempts.attempt(delivery)

    async def _carry_out(self, message: AbstractIncomingMessage, instruction: Instruction) -> None:
        """A hold disables the lane first (the first 410 does it; later ones find it done)."""
        if isinstance(instruction, Hold):
            await self.disable(instruction.outcome)
        await self._settler.carry_out(message, instruction)


def _now() -> datetime:
    return datetime.now(UTC)
