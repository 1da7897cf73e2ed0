"""The attempt history: one record per delivery attempt, kept on the broker for the event
log's retention, and read by ``patchwork-bridge deliveries``.

It answers "did my CI get event 4711, and what did it answer?": for each attempt the
event, the attempt number, when, how long, what came back (the status, or the error's
class) and what became of it. Records go to a stream queue, ``<exchange>.deliveries``,
with the event log's ``BRIDGE_LOG_MAX_AGE``. They are written in the background without
publisher confirms: a delivery never waits for its record, and at most the records of
the last moments before a crash, or those past a full buffer (counted), are missing.
What is waiting when the writer comes round goes as one message (a JSON array, up to
``BATCH``): one publish per attempt was a third of a delivery's CPU (bench/
throughput.py deliver --py-spy). Older records, one object a message, still read.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection

from bridge.broker.calls import BROKER_TIMEOUT_S, close_channel, raise_if_cancelled
from bridge.broker.errors import BROKER_TROUBLE
from bridge.eventlog import log_arguments
from bridge.metrics import Metrics
from bridge.settings import Settings
from bridge.waiting import sleep_unless

log = logging.getLogger(__name__)

BATCH = 200
"""Records in one message at most."""
LINGER_S = 0.05
"""After a record, how long the writer waits for others to share its message."""
BUFFER = 10_000
"""Records waiting to be written, at most; past that they are dropped (and counted)."""
MAX_BYTES = 2_000_000_000
"""The stream's size cap besides its age: some 5 million records."""


def history_queue(exchange: str) -> str:
    return f"{exchange}.deliveries"


def history_arguments(settings: Settings) -> dict[str, Any]:
    """The event log's arguments (retention, replicas), with a size cap of its own."""
    return {**log_arguments(settings), "x-max-length-bytes": MAX_BYTES}


@dataclass(frozen=True, slots=True)
class Attempt:
    subscription: str
    event: str
    routing_key: str
    attempt: int
    at: str
    """When it started, ISO 8601 UTC."""
    duration_ms: float
    outcome: str
    """What became of it: delivered, retried, dead_lettered, disabled, probe_failed."""
    status: int | None
    """The receiver's HTTP status; None when there was none (timeout, refused)."""
    reason: str | None
    """The failure's class (timeout, connect, http_5xx, ...); None when delivered."""
    detail: str

    def as_dict(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in _FIELDS}

    @classmethod
    def all_from_json(cls, body: bytes) -> list[Attempt]:
        """The records of one message: an array of them, or one (as written before
        records were batched). ValueError or TypeError when it is not ours."""
        loaded = json.loads(body)
        return [cls(**record) for record in (loaded if isinstance(loaded, list) else [loaded])]

    @property
    def failed(self) -> bool:
        return self.outcome != "delivered"


_FIELDS = tuple(f.name for f in fields(Attempt))


def records_json(attempts: list[Attempt]) -> bytes:
    return json.dumps([a.as_dict() for a in attempts], separators=(",", ":")).encode()


class AttemptHistory:
    """Owns its channel and its writer task; ``record`` never waits."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._queue = history_queue(settings.exchange)
        self._buffer: asyncio.Queue[Attempt] = asyncio.Queue(BUFFER)
        self._channel: AbstractChannel | None = None
        self._failing = False

    async def open(self, connection: AbstractConnection) -> None:
        async with asyncio.timeout(BROKER_TIMEOUT_S):
            self._channel = await connection.channel(publisher_confirms=False)
            await self._channel.declare_queue(
                self._queue, durable=True, arguments=history_arguments(self._settings)
            )

    def record(self, attempt: Attempt) -> None:
        try:
            self._buffer.put_nowait(attempt)
        except asyncio.QueueFull:
            self._metrics.history_dropped.inc()

    async def run(self, stopping: asyncio.Event) -> None:
        """Write records as they come, until ``stopping`` (``flush`` writes the rest)."""
        while not stopping.is_set():
            if self._buffer.empty():
                getting = asyncio.ensure_future(self._buffer.get())
                stopped = asyncio.ensure_future(stopping.wait())
                await asyncio.wait([getting, stopped], return_when=asyncio.FIRST_COMPLETED)
                stopped.cancel()
                if not getting.done():
                    getting.cancel()
                    break
                batch = [getting.result()]
            else:
                batch = []
            # A busy moment's records share one message.
            ended = self._buffer.qsize() + len(batch) < BATCH and await sleep_unless(
                stopping, LINGER_S
            )
            await self._write(self._take(batch))
            if ended:
                break

    async def flush(self) -> None:
        """What is left, once deliveries have stopped."""
        while not self._buffer.empty():
            await self._write(self._take([]))

    def _take(self, batch: list[Attempt]) -> list[Attempt]:
        while len(batch) < BATCH and not self._buffer.empty():
            batch.append(self._buffer.get_nowait())
        return batch

    async def _write(self, attempts: list[Attempt]) -> None:
        assert self._channel is not None
        body = records_json(attempts)
        try:
            await self._channel.default_exchange.publish(
                aio_pika.Message(
                    body,
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=self._queue,
                timeout=BROKER_TIMEOUT_S,
            )
        except BROKER_TROUBLE as exc:
            raise_if_cancelled()
            self._metrics.history_dropped.inc(len(attempts))
            if not self._failing:
                log.warning(
                    "attempt history: cannot write to %s (%s); records are dropped until it can",
                    self._queue,
                    type(exc).__name__,
                )
            self._failing = True
            return
        if self._failing:
            log.info("attempt history: writing to %s again", self._queue)
        self._failing = False
        self._metrics.history_records.inc(len(attempts))
        self._metrics.history_bytes.inc(len(body))

    async def close(self) -> None:
        if self._channel is not None:
            await close_channel(self._channel)
            self._channel = None


def attempt_at(when: datetime) -> str:
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
