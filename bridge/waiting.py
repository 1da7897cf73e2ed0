"""Pauses that end early when a stop is requested, so loops stop between steps, not inside one."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator


async def sleep_unless(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds`` or until ``stop`` is set; True if it was set."""
    if seconds > 0 and not stop.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await stop.wait()
    return stop.is_set()


class Ticker:
    """The one shape of every periodic loop here: a step per tick until ``stop``.

    Fixed rate, not fixed pause: a slow step does not stretch the period, and ticks
    missed while a step ran are dropped, not bunched. ``stop`` is looked at between
    steps, so a step is never cut halfway. ``pause`` puts the next tick further off
    (a backoff after a failure).

        async for _ in Ticker(stop, 5.0):
            await step()
    """

    def __init__(self, stop: asyncio.Event, interval_s: float, *, at_once: bool = True) -> None:
        self._stop = stop
        self._interval_s = interval_s
        self._next_at = time.monotonic() + (0.0 if at_once else interval_s)
        self._paused = False

    def pause(self, seconds: float) -> None:
        """The next tick comes ``seconds`` from now, whatever the rate says."""
        self._next_at = time.monotonic() + seconds
        self._paused = True

    async def __aiter__(self) -> AsyncIterator[None]:
        while not await sleep_unless(self._stop, self._next_at - time.monotonic()):
            self._paused = False
            yield
            if not self._paused:
                self._next_at = max(self._next_at + self._interval_s, time.monotonic())
