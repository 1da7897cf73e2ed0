"""The tests' one webhook receiver: a real aiohttp server on 127.0.0.1 standing in for a CI.

It records every request as it arrives and answers as ``handler`` says (default 204).
Counting successes per ``webhook-id`` lets a test tell a real duplicate from a retry.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import NamedTuple

from aiohttp import web
from multidict import CIMultiDict

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Hit(NamedTuple):
    """One request as it arrived."""

    path: str
    """Path and query string."""
    headers: CIMultiDict[str]
    """Looked up in any case, as HTTP means them."""
    body: bytes

    @property
    def webhook_id(self) -> str:
        return self.headers.get("webhook-id", "")


class Receiver:
    def __init__(self, handler: Handler | None = None, *, latency_s: float = 0.0) -> None:
        self.handler: Handler = handler or self.no_content
        self.latency_s = latency_s
        """How long every answer takes, so deliveries are in flight when a fault strikes."""
        self.requests: list[Hit] = []
        self.answers: list[tuple[str, int]] = []
        """(webhook-id, status) of each answer sent, in the order they were sent."""
        self.successes: Counter[str] = Counter()
        """webhook-id -> 2xx answers sent."""
        self.in_flight = 0
        self.held = 0
        """Requests that ``hold`` kept waiting."""
        self.release = asyncio.Event()
        """Set by the test, or by ``stop``: every held request returns."""
        self.port = 0
        self._runner: web.AppRunner | None = None

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def delivered(self) -> set[str]:
        return set(self.successes)

    async def start(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        # A held handler must not keep cleanup() waiting for aiohttp's default 60 s.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self.url()

    async def stop(self) -> None:
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Receiver:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        hit = Hit(request.path_qs, CIMultiDict(request.headers), body)
        self.requests.append(hit)
        self.in_flight += 1
        try:
            if self.latency_s:
                await asyncio.sleep(self.latency_s)
            response = await self.handler(request)
        finally:
            self.in_flight -= 1
        self.answers.append((hit.webhook_id, response.status))
        if 200 <= response.status < 300:
            self.successes[hit.webhook_id] += 1
        return response

    async def hold(self, seconds: float = 3600.0) -> None:
        """Keep this request waiting until ``release`` is set or ``seconds`` pass."""
        self.held += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.release.wait(), seconds)

    # -- answers a test can pick --------------------------------------------------------

    async def no_content(self, request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def hang(self, request: web.Request) -> web.Response:
        """Answer only once released (by then the bridge has given up)."""
        await self.hold()
        return web.Response(text="too late")

    async def endless(self, request: web.Request) -> web.StreamResponse:
        """A 500 whose body never ends until released or the client hangs up."""
        response = web.StreamResponse(status=500)
        await response.prepare(request)
        chunk = b"x" * 65536
        with contextlib.suppress(ConnectionResetError):  # the sink read what it wanted
            while not self.release.is_set():
                await response.write(chunk)
        return response


def answering(status: int, **headers: str) -> Handler:
    """A handler that always answers ``status`` with ``headers``."""

    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=status, headers=headers, text=f"status {status}")

    return handler
