"""The receiver process of the webhook benchmarks, and the handle a benchmark drives it with.

It runs in a process of its own (``python bench/receiver.py``), so its CPU never counts
against the consumer being measured. It timestamps every POST with ``time.monotonic()``
(CLOCK_MONOTONIC, the same clock in every process of the machine), keyed by the first path
segment: ``/fast/...`` answers 204 at once, ``/hang/...`` never answers until released,
``/away/...`` answers 503 until released and 204 after.
Control endpoints live under ``/_/``."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from common import CONTROL_TIMEOUT_S

# -- the receiver process ---------------------------------------------------------------


@dataclass
class _Lane:
    """What one path segment has seen."""

    requests: int = 0
    first_s: float | None = None
    last_new_s: float | None = None
    arrivals: dict[str, float] = field(default_factory=dict)
    """webhook-id -> monotonic time of its first arrival."""


class _ReceiverState:
    def __init__(self) -> None:
        self.lanes: dict[str, _Lane] = {}
        self.released = asyncio.Event()

    def reset(self) -> None:
        self.lanes.clear()
        self.released = asyncio.Event()


def _receiver_app() -> web.Application:
    state = _ReceiverState()

    async def post(request: web.Request) -> web.StreamResponse:
        segment = request.match_info["segment"]
        lane = state.lanes.setdefault(segment, _Lane())
        lane.requests += 1
        if segment == "hang":
            released = state.released
            await released.wait()
            return web.Response(status=503)
        if segment == "down":  # a receiver that is not there: every answer a 503
            await request.read()
            return web.Response(status=503, text="down")
        if segment == "away" and not state.released.is_set():  # back once released
            await request.read()
            return web.Response(status=503, text="away")
        await request.read()
        now = time.monotonic()
        if lane.first_s is None:
            lane.first_s = now
        webhook_id = request.headers.get("webhook-id", f"anonymous-{lane.requests}")
        if webhook_id not in lane.arrivals:
            lane.arrivals[webhook_id] = now
            lane.last_new_s = now
        return web.Response(status=204)

    async def stats(_: web.Request) -> web.Response:
        return web.json_response(
            {
                name: {
                    "requests": lane.requests,
                    "unique": len(lane.arrivals),
                    "first_s": lane.first_s,
                    "last_new_s": lane.last_new_s,
                }
                for name, lane in state.lanes.items()
            }
        )

    async def arrivals(request: web.Request) -> web.Response:
        lane = state.lanes.get(request.query["segment"], _Lane())
        return web.json_response(lane.arrivals)

    async def reset(_: web.Request) -> web.Response:
        state.released.set()  # let anything still hung go before forgetting it
        state.reset()
        return web.Response(status=204)

    async def release(_: web.Request) -> web.Response:
        state.released.set()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_get("/_/stats", stats)
    app.router.add_get("/_/arrivals", arrivals)
    app.router.add_post("/_/reset", reset)
    app.router.add_post("/_/release", release)
    app.router.add_post("/{segment}/{tail:.*}", post)
    return app


async def _serve_receiver() -> None:
    runner = web.AppRunner(_receiver_app(), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(runner.addresses[0][1], flush=True)  # the first line: the bench reads the port
    try:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until EOF
    finally:
        await runner.cleanup()


@dataclass(frozen=True, slots=True)
class LaneStats:
    requests: int
    unique: int
    first_s: float | None
    last_new_s: float | None

    def rate(self) -> float:
        """Deliveries/s from the first arrival to the last new one."""
        if self.first_s is None or self.last_new_s is None or self.unique < 2:
            return 0.0
        return (self.unique - 1) / max(self.last_new_s - self.first_s, 1e-9)


class Receiver:
    """Handle on the receiver process; ``async with Receiver.start() as receiver``."""

    def __init__(self, process: asyncio.subprocess.Process, port: int) -> None:
        self._process = process
        self.port = port
        self._base = f"http://127.0.0.1:{port}"
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=CONTROL_TIMEOUT_S)
        )

    @classmethod
    @contextlib.asynccontextmanager
    async def start(cls) -> AsyncIterator[Receiver]:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert process.stdout is not None
        try:
            line = await asyncio.wait_for(process.stdout.readline(), CONTROL_TIMEOUT_S)
            receiver = cls(process, int(line))
        except BaseException:
            process.kill()
            await process.wait()
            raise
        try:
            yield receiver
        finally:
            await receiver._close()

    def url(self, segment: str) -> str:
        return f"{self._base}/{segment}/hooks/patchwork"

    async def lanes(self) -> dict[str, LaneStats]:
        """Every segment that has seen a POST, in one request."""
        async with self._session.get(f"{self._base}/_/stats") as response:
            lanes = await response.json()
        return {segment: LaneStats(**lane) for segment, lane in lanes.items()}

    async def stats(self, segment: str) -> LaneStats:
        lanes = await self.lanes()
        return lanes.get(segment, LaneStats(requests=0, unique=0, first_s=None, last_new_s=None))

    async def arrivals(self, segment: str) -> dict[str, float]:
        async with self._session.get(
            f"{self._base}/_/arrivals", params={"segment": segment}
        ) as response:
            return dict(await response.json())

    async def reset(self) -> None:
        async with self._session.post(f"{self._base}/_/reset") as response:
            response.raise_for_status()

    async def release(self) -> None:
        """Hung requests, and every later one to ``/hang``, get a 503."""
        async with self._session.post(f"{self._base}/_/release") as response:
            response.raise_for_status()

    async def wait_for(
        self,
        segment: str,
        unique: int,
        timeout_s: float,
        check: Callable[[], None] | None = None,
        poll_s: float = 0.05,
    ) -> LaneStats:
        """Until ``unique`` distinct webhook-ids reached ``segment``; ``check`` raises to abort."""
        deadline = time.monotonic() + timeout_s
        while True:
            stats = await self.stats(segment)
            if stats.unique >= unique:
                return stats
            if check is not None:
                check()
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"/{segment}: {stats.unique} of {unique} events after {timeout_s:g}s"
                )
            await asyncio.sleep(poll_s)

    async def _close(self) -> None:
        await self._session.close()
        assert self._process.stdin is not None
        self._process.stdin.close()
        try:
            await asyncio.wait_for(self._process.wait(), 5.0)
        except TimeoutError:
            self._process.kill()
            await self._process.wait()


if __name__ == "__main__":
    asyncio.run(_serve_receiver())
