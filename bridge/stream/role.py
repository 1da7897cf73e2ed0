"""The ``stream`` role: one connection for the hub following the log and for results, one
for clients' reads of the log, and the HTTP server."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aio_pika.abc import AbstractRobustConnection
from aiohttp import web

from bridge.broker.calls import BROKER_TIMEOUT_S
from bridge.broker.connect import RecycledConnection, connect_with_retry, is_connected
from bridge.broker.nodes import node_of
from bridge.checks.patchwork import PatchworkChecks
from bridge.http import PortInUse, serve_app
from bridge.metrics import Metrics
from bridge.settings import Settings
from bridge.stream.consumers import StreamConsumers
from bridge.stream.hub import Hub
from bridge.stream.server import CLOSE_TIMEOUT_S, StreamServer
from bridge.waiting import Ticker

log = logging.getLogger(__name__)


class StreamRole:
    name = "stream"

    def __init__(self, settings: Settings, metrics: Metrics, consumers: StreamConsumers) -> None:
        self.settings = settings
        self.metrics = metrics
        self.consumers = consumers
        self.port: int | None = None
        """The port bound (BRIDGE_STREAM_PORT=0 picks one), once serving."""
        self._connection: AbstractRobustConnection | None = None
        self._hub: Hub | None = None
        self._server: StreamServer | None = None

    async def run(self, stop: asyncio.Event) -> None:
        self._connection = await connect_with_retry(self.settings, self.name, stop)
        if self._connection is None:
            return
        hub = self._hub = Hub(self._connection, self.settings.exchange)
        reads = RecycledConnection(self.settings, f"{self.name} history")
        patchwork = PatchworkChecks(self.settings) if self.settings.patchwork_url else None
        server = self._server = StreamServer(
            self.settings, self.metrics, self.consumers, hub, self._connection, reads, patchwork
        )
        hub_stop = asyncio.Event()
        following = asyncio.create_task(hub.run(hub_stop), name="stream-hub")
        runner: web.AppRunner | None = None
        try:
            try:
                runner, self.port = await serve_app(
                    server.app(), self.settings.stream_host, self.settings.stream_port
                )
            except OSError as exc:
                raise PortInUse(
                    f"BRIDGE_STREAM_PORT: cannot serve the stream on "
                    f"{self.settings.stream_host}:{self.settings.stream_port} ({exc.strerror})"
                ) from None
            log.info(
                "stream: serving /v1/events on %s:%d for %d consumers",
                self.settings.stream_host,
                self.port,
                len(self.consumers.consumers),
            )
            async for _ in Ticker(stop, 1.0):
                server.sample_lag()
                if following.done():
                    following.result()  # the hub only ends by raising, or on stop
        finally:
            server.closing.set()  # every client gets the end of its stream
            if runner is not None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(CLOSE_TIMEOUT_S + 5):
                        await runner.cleanup()
            hub_stop.set()
            try:
                async with asyncio.timeout(BROKER_TIMEOUT_S):
                    await following
            except TimeoutError:
                log.warning("stream: the log reader did not stop within %ss", BROKER_TIMEOUT_S)
            await reads.close()
            if patchwork is not None:
                await patchwork.close()
            with contextlib.suppress(Exception):
                await self._connection.close()

    def readiness(self) -> tuple[bool, str]:
        if self._connection is None or self.port is None:
            return False, "stream: connecting to RabbitMQ"
        if not self.connected():
            return False, "stream: connection to RabbitMQ lost, reconnecting"
        if self._hub is None or not self._hub.attached:
            return False, "stream: waiting for the event log"
        return True, ""

    def connected(self) -> bool:
        return is_connected(self._connection)

    def node(self) -> str | None:
        return node_of(self._connection)
