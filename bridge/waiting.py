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

    def __init__(
        self,
        stop: asyncio.Event,
        interval_s: float,
        *,
        at_once: bool = True,
        wake: asyncio.Event | None = None,
    ) -> None:
        """``wake``, when set, ticks at once (and is cleared): a step because something
        happened, besides the periodic ones."""
        self._stop = stop
        self.interval_s = interval_s
        """May change between ticks; it applies from the next one."""
        self._wake = wake
        self._next_at = time.monotonic() + (0.0 if at_once else interval_s)
        self._paused = False

    def pause(self, seconds: float) -> None:
        """The next tick comes ``seconds`` from now, whatever the rate says."""
        self._next_at = time.monotonic() + seconds
        self._paused = True

    async def __aiter__(self) -> AsyncIterator[None]:
        while not await self._sleep():
            # A wake starts the period again from now; a tick on time keeps the fixed rate.
            woken = self._wake is not None and self._wake.is_set()
            if self._wake is not None:
                self._wake.clear()
            self._paused = False
            start = time.monotonic() if woken else self._next_at
            yield
            if not self._paused:
                self._next_at = max(start + self.interval_s, time.monotonic())

    async def _sleep(self) -> bool:
        """Until the next tick, a wake or stop; True on stop."""
        if self._wake is None or self._paused:
            return await sleep_unless(self._stop, self._next_at - time.monotonic())
        seconds = self._next_at - time.monotonic()
        if seconds > 0 and not self._stop.is_set() and not self._wake.is_set():
            waits = [asyncio.ensure_future(e.wait()) for e in (self._stop, self._wake)]
            try:
                await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiting in waits:
                    waiting.cancel()
        return self._stop.is_set()
