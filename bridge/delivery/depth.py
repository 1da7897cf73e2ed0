"""Queue depth gauges: how many events wait in each subscription's main, retry and dead queues.

A passive declare answers with the ready-message and consumer counts, so no
management plugin is needed. The sampler is owned by the delivery engine and
runs until the consumer stops.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from aio_pika.abc import AbstractConnection

from bridge.broker.calls import raise_if_cancelled
from bridge.broker.errors import BROKER_TROUBLE
from bridge.delivery.queues import QueueControl
from bridge.metrics import Metrics
from bridge.waiting import Ticker

log = logging.getLogger(__name__)


class QueueDepthSampler:
    """Every ``interval_s``, set ``queue_messages`` and ``queue_consumers`` for each queue.

    It uses a channel of its own, so its passive declares never disturb deliveries.
    """

    def __init__(
        self,
        connection: AbstractConnection,
        queues: Sequence[str],
        metrics: Metrics,
        interval_s: float,
    ) -> None:
        self._control = QueueControl(connection)
        self._queues = list(queues)
        self._metrics = metrics
        self._interval_s = interval_s
        self._missing: set[str] = set()
        self._failing = False

    async def run(self, stop: asyncio.Event) -> None:
        """Sample at a fixed rate until ``stop`` is set (between samples, so no declare is
        cut off halfway) or until cancelled; broker trouble is logged, never fatal."""
        try:
            async for _ in Ticker(stop, self._interval_s):
                try:
                    await self.sample_once()
                    self._recovered()
                except BROKER_TROUBLE as exc:
                    raise_if_cancelled()
                    self._failed(exc)
        finally:
            await self._control.close()

    async def sample_once(self) -> None:
        """One pass over all queues; a missing queue is logged once and skipped."""
        for name in self._queues:
            result = await self._control.inspect(name)
            if result is None:
                if name not in self._missing:
                    self._missing.add(name)
                    log.warning("queue depth: queue %s does not exist; skipping it", name)
                continue
            self._missing.discard(name)
            self._metrics.queue_messages.labels(name).set(result.message_count or 0)
            self._metrics.queue_consumers.labels(name).set(result.consumer_count or 0)

    def _failed(self, exc: BaseException) -> None:
        if not self._failing:
            self._failing = True
            log.warning(
                "queue depth: cannot sample queues (%s: %s); will retry", type(exc).__name__, exc
            )

    def _recovered(self) -> None:
        if self._failing:
            self._failing = False
            log.info("queue depth: sampling again")
