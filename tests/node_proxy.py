"""Stand-in cluster nodes for one broker: TCP forwarders on loopback that can die (every
socket reset, the port closed) or hang (the port open, nothing forwarded any more), the
two ways a node goes. Lets the multi-node code be tested on any single RabbitMQ."""

from __future__ import annotations

import asyncio
import contextlib
import socket

from yarl import URL


class NodeProxy:
    def __init__(self, broker_url: str) -> None:
        self._target = URL(broker_url)
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._hung = asyncio.Event()
        self._killed = asyncio.Event()
        self.port = 0

    def url(self, broker_url: str) -> str:
        """``broker_url`` (credentials, vhost) pointed at this stand-in."""
        return str(URL(broker_url).with_host("127.0.0.1").with_port(self.port))

    async def start(self) -> None:
        if self.port == 0:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.port = s.getsockname()[1]
        self._hung.clear()
        self._killed.clear()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        if self._hung.is_set():
            return  # a hung node: the kernel accepted, nothing ever answers
        try:
            up_reader, up_writer = await asyncio.open_connection(
                self._target.host, self._target.port
            )
        except OSError:
            writer.transport.abort()
            return
        self._writers.append(up_writer)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                if self._hung.is_set():
                    await self._killed.wait()  # held until the node is killed
                    break
                writer.write(data)
                await writer.drain()
        writer.transport.abort()

    async def kill(self) -> None:
        """Like ``kill -9`` of the node: its port closes and every connection is reset."""
        self._killed.set()
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    def hang(self) -> None:
        """Like SIGSTOP of the node: connections stay open and nothing passes any more."""
        self._hung.set()
