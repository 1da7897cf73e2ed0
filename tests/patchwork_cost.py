"""The Patchwork double with what serving costs a real Patchwork, for the tests and the
benchmarks whose figures depend on it (bench/ imports it too). Not in the wheel."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from bridge.demo.patchwork_double import FakePatchwork


@dataclass(frozen=True, slots=True)
class ServingCost:
    """What one ``/events/`` request costs the server, as seconds of delay.

    ``MEASURED`` is what a real Patchwork took (gunicorn with 4 workers, PostgreSQL,
    14,600 events): about 60 ms a request plus 1.9 ms an event served. Every page also
    COUNTs the filtered rows on a table with no index on ``date``; its per-row cost is
    our estimate, not a measurement.
    """

    request_s: float = 0.0
    per_event_s: float = 0.0
    count_per_row_s: float = 0.0
    workers: int | None = None
    """Requests served at once; None: no limit."""


MEASURED = ServingCost(request_s=0.060, per_event_s=0.0019, count_per_row_s=0.00002, workers=4)


class CostedPatchwork(FakePatchwork):
    """The double, charging ``cost`` for every ``/events/`` page, and noting who asked when."""

    def __init__(self, *, cost: ServingCost | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cost = cost or ServingCost()
        self._workers = asyncio.Semaphore(self.cost.workers) if self.cost.workers else None
        self.busy_s = 0.0
        """Seconds of serving cost charged so far."""
        self.pollers: list[str] = []
        """The User-Agent of each ``/events/`` request, in order: who polled when."""
        self.poll_times: list[float] = []
        """``time.monotonic()`` of each of those requests."""

    async def served(self, request: web.Request, rows: int, items: int) -> None:
        self.pollers.append(request.headers.get("User-Agent", ""))
        self.poll_times.append(time.monotonic())
        cost = self.cost
        delay_s = cost.request_s + cost.per_event_s * items + cost.count_per_row_s * rows
        if delay_s <= 0:
            return
        self.busy_s += delay_s
        if self._workers is None:
            await asyncio.sleep(delay_s)
            return
        async with self._workers:  # a busy server queues requests behind its workers
            await asyncio.sleep(delay_s)
