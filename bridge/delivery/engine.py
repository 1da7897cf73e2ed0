"""The delivery engine as a role (see ``bridge.runtime.Role``): lanes from queues to sinks.

Each lane (``bridge.delivery.lane``) has its own channel with prefetch = its concurrency and
its own sink, so a sink that hangs holds only its own slots. Retries wait in broker queues,
so they survive a restart. The webhook role runs one lane per subscription, the checks
role one lane of its own; the engine does not know which it is running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from aio_pika.abc import AbstractRobustConnection

from bridge.broker.calls import BROKER_TIMEOUT_S, raise_if_cancelled
from bridge.broker.connect import connect_with_retry, is_connected
from bridge.broker.errors import BROKER_ERRORS, BROKER_TROUBLE, TopologyError
from bridge.broker.nodes import node_of
from bridge.broker.topology import declare_exchange
from bridge.delivery.depth import QueueDepthSampler
from bridge.delivery.history import AttemptHistory, history_queue
from bridge.delivery.lane import Lane
from bridge.delivery.outcomes import Sink
from bridge.delivery.queues import QueueControl
from bridge.delivery.spec import LaneSpec
from bridge.metrics import Metrics
from bridge.settings import Settings
from bridge.waiting import Ticker

log = logging.getLogger(__name__)

MARKER_CHECK_INTERVAL_S = 5.0
"""How soon an enable/disable made elsewhere (CLI, another process) takes effect here."""
DRAIN_TIMEOUT_S = 10.0
"""On shutdown, how long deliveries in flight may finish before they are cancelled."""


class DeliveryRole:
    def __init__(
        self,
        name: str,
        settings: Settings,
        metrics: Metrics,
        lanes: Sequence[tuple[LaneSpec, Sink]],
        *,
        connection_name: str | None = None,
        marker_check_interval_s: float = MARKER_CHECK_INTERVAL_S,
        drain_timeout_s: float = DRAIN_TIMEOUT_S,
    ) -> None:
        """``name`` is the role's (``webhook``, ``checks``): its connections, logs and
        readiness say it; ``connection_name`` names its connections instead (tests cut one
        by its name). Takes ready sinks and owns them: closed when ``run`` returns."""
        self.name = name
        self._connection_name = connection_name or name
        self.settings = settings
        self.metrics = metrics
        self._specs = list(lanes)
        self._marker_check_interval_s = marker_check_interval_s
        self._drain_timeout_s = drain_timeout_s
        self._connection: AbstractRobustConnection | None = None
        self._control_connection: AbstractRobustConnection | None = None
        self._control: QueueControl | None = None
        self._history: AttemptHistory | None = None
        self.lanes: list[Lane] = []
        self._started = False
        self._stopping = asyncio.Event()
        """Set first on shutdown (or on a refusal): background loops finish their step."""
        self._refused: TopologyError | None = None
        """A queue of ours turned out to be bound to another deployment's exchange."""

    @property
    def lane_names(self) -> list[str]:
        return [spec.name for spec, _ in self._specs]

    # -- lifecycle -----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        self._connection = await connect_with_retry(self.settings, self._connection_name, stop)
        if self._connection is None:
            await self._close_sinks()
            return  # stopped before RabbitMQ answered
        # Passive declares on a connection of their own: the broker closes the channel of
        # one that finds no queue, and aiormq 7.2 drops the Close-Ok when the connection's
        # write queue is full (acks of busy lanes), then reuses the channel number; the
        # broker closes the whole connection ("second 'channel.open' seen").
        self._control_connection = await connect_with_retry(
            self.settings, f"{self._connection_name}-control", stop
        )
        if self._control_connection is None:
            await self._close_sinks()
            await self._close_connections()
            return
        self._control = QueueControl(self._control_connection)
        self._history = await self._open_history()
        self.lanes = [
            Lane(
                spec,
                sink,
                role=self.name,
                metrics=self.metrics,
                control=self._control,
                queue_type=self.settings.queue_type,
                refuse=self._refuse,
                history=self._history.record if self._history else None,
            )
            for spec, sink in self._specs
        ]
        background: list[asyncio.Task[None]] = []
        try:
            try:
                await self._start()
            except TopologyError as exc:
                log.error("%s: %s", self.name, exc)
                raise
            sampler = QueueDepthSampler(
                self._control_connection,
                [q for lane in self.lanes for q in lane.watched],
                self.metrics,
                self.settings.queue_depth_interval,
            )
            background = [
                asyncio.create_task(self._watch(), name=f"{self.name}-markers"),
                asyncio.create_task(sampler.run(self._stopping), name=f"{self.name}-queue-depth"),
            ]
            if self._history is not None:
                writer = self._history.run(self._stopping)
                background.append(asyncio.create_task(writer, name=f"{self.name}-history"))
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

    async def _open_history(self) -> AttemptHistory | None:
        """The attempt history's stream; without it deliveries go on, unrecorded."""
        assert self._connection is not None
        history = AttemptHistory(self.settings, self.metrics)
        try:
            await history.open(self._connection)
        except BROKER_TROUBLE as exc:
            raise_if_cancelled()
            log.error(
                "%s: cannot declare the attempt history %s (%s: %s); delivering without it",
                self.name,
                history_queue(self.settings.exchange),
                type(exc).__name__,
                exc,
            )
            await history.close()
            return None
        return history

    def connected(self) -> bool:
        return is_connected(self._connection)

    def node(self) -> str | None:
        return node_of(self._connection)

    def readiness(self) -> tuple[bool, str]:
        if self._connection is None or not self._started:
            return False, f"{self.name}: connecting to RabbitMQ and declaring queues"
        if not self.connected():
            return False, f"{self.name}: connection to RabbitMQ lost, reconnecting"
        cancelled = [lane.name for lane in self.lanes if lane.cancelled]
        if cancelled:
            return False, f"{self.name}: not consuming the main queue of {', '.join(cancelled)}"
        # Ready: a receiver that is down is not this process's trouble, but /readyz says it.
        broken = [
            f"{lane.name} (next probe within {lane.breaker.interval_s:g}s)"
            for lane in self.lanes
            if lane.breaker.open
        ]
        if broken:
            return True, f"{self.name}: circuit breaker open for {', '.join(broken)}"
        return True, ""

    async def _start(self) -> None:
        """Declare the topology once for this process, then consume every enabled lane."""
        assert self._connection is not None
        async with asyncio.timeout(BROKER_TIMEOUT_S):
            control = await self._connection.channel()
            for exchange in sorted({lane.spec.exchange for lane in self.lanes}):
                await declare_exchange(control, exchange)
        for lane in self.lanes:
            await lane.open(self._connection)
            await lane.start()
        self._started = True
        log.info("%s: consuming for %d lanes", self.name, len(self.lanes))

    def _refuse(self, refusal: TopologyError) -> None:
        """A lane found another deployment's event in its queue: stop, and ``run`` raises."""
        if self._refused is None:
            self._refused = refusal
            log.error("%s: %s", self.name, refusal)
            self._stopping.set()

    async def _watch(self) -> None:
        """Follow what changes elsewhere: an enable or disable made by the CLI or another
        process, a consumer the broker cancelled (queue deleted, quorum leader moved)."""
        assert self._connection is not None
        failing = False
        async for _ in Ticker(self._stopping, self._marker_check_interval_s, at_once=False):
            try:
                for lane in self.lanes:
                    await lane.follow_cancel(self._connection)
                    await lane.follow_marker()
                    await lane.follow_breaker()
                    await lane.tidy_old_retries()
            except BROKER_TROUBLE as exc:
                raise_if_cancelled()
                if not failing:
                    log.warning(
                        "%s: cannot check disabled markers (%s); will retry", self.name, exc
                    )
                failing = True
            else:
                if failing:
                    log.info("%s: checking disabled markers again", self.name)
                failing = False

    async def _shutdown(self, background: list[asyncio.Task[None]]) -> None:
        """Stop taking work, let deliveries in flight finish (bounded), close sinks, disconnect."""
        self._started = False
        for lane in self.lanes:
            lane.closing = True
        self._stopping.set()
        if background:
            # Let a broker call in progress finish: cancelling one closes its channel.
            _, stuck = await asyncio.wait(background, timeout=BROKER_TIMEOUT_S)
            for task in stuck:
                log.warning(
                    "%s: %s did not stop within %gs; cancelled",
                    self.name,
                    task.get_name(),
                    BROKER_TIMEOUT_S,
                )
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
        for lane in self.lanes:
            await lane.stop()
        in_flight = {task for lane in self.lanes for task in lane.in_flight}
        if in_flight:
            log.info(
                "%s: waiting up to %gs for %d deliveries in flight to finish",
                self.name,
                self._drain_timeout_s,
                len(in_flight),
            )
            _, pending = await asyncio.wait(in_flight, timeout=self._drain_timeout_s)
            if pending:
                log.warning(
                    "%s: %d deliveries still running after %gs; cancelled, "
                    "the broker will redeliver them",
                    self.name,
                    len(pending),
                    self._drain_timeout_s,
                )
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
        await self._close_sinks()
        if self._history is not None:
            try:
                async with asyncio.timeout(BROKER_TIMEOUT_S):
                    await self._history.flush()
            except TimeoutError:
                log.warning("%s: the last attempt records were not written", self.name)
            await self._history.close()
        if self._control is not None:
            await self._control.close()
        await self._close_connections()

    async def _close_sinks(self) -> None:
        for spec, sink in self._specs:
            try:
                async with asyncio.timeout(BROKER_TIMEOUT_S):
                    await sink.close()
            except Exception as exc:
                log.warning("%s %s: closing its sink failed (%s)", self.name, spec.name, exc)

    async def _close_connections(self) -> None:
        for connection in (self._control_connection, self._connection):
            if connection is not None:
                with contextlib.suppress(*BROKER_ERRORS):
                    async with asyncio.timeout(BROKER_TIMEOUT_S):
                        await connection.close()
