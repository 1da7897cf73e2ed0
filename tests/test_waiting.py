"""The one periodic-loop shape: fixed rate, dropped ticks, pause for backoff, stop between steps.

A fake clock drives the ticker, so these say what it does, not how fast this machine is.
"""

from __future__ import annotations

import asyncio

import pytest

from bridge import waiting
from bridge.waiting import Ticker


class FakeClock:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        monkeypatch.setattr(waiting.time, "monotonic", lambda: self.now)
        monkeypatch.setattr(waiting, "sleep_unless", self.sleep_unless)

    async def sleep_unless(self, stop: asyncio.Event, seconds: float) -> bool:
        if seconds > 0 and not stop.is_set():
            self.sleeps.append(round(seconds, 6))
            self.now += seconds
        return stop.is_set()


async def test_ticks_keep_a_fixed_rate_and_drop_the_ones_a_slow_step_missed(monkeypatch):
    clock = FakeClock(monkeypatch)
    stop = asyncio.Event()
    started: list[float] = []
    step_costs = [1.0, 0.0, 25.0, 0.0, 0.0]
    async for _ in Ticker(stop, 10.0):
        started.append(clock.now - 1000.0)
        clock.now += step_costs[len(started) - 1]
        if len(started) == len(step_costs):
            stop.set()
    # 0, 10 (not 11: the step's cost is inside the period), 20; the 25 s step missed 30
    # and 40, so the next comes at once (45), then on the new beat.
    assert started == [0.0, 10.0, 20.0, 45.0, 55.0]


async def test_pause_puts_the_next_tick_off_then_the_rate_resumes(monkeypatch):
    clock = FakeClock(monkeypatch)
    stop = asyncio.Event()
    started: list[float] = []
    async for _ in ticker_with_pause(stop, started, clock):
        pass
    assert started == [0.0, 30.0, 40.0]


async def ticker_with_pause(stop, started, clock):
    ticker = Ticker(stop, 10.0)
    async for _ in ticker:
        started.append(clock.now - 1000.0)
        if len(started) == 1:
            ticker.pause(30.0)  # a backoff after a failed step
        if len(started) == 3:
            stop.set()
        yield


async def test_stop_ends_the_loop_after_the_step_not_inside_it():
    stop = asyncio.Event()
    finished: list[int] = []

    async def loop() -> None:
        async for _ in Ticker(stop, 3600.0):
            await asyncio.sleep(0.05)
            finished.append(1)

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.01)
    stop.set()  # while the first step runs
    await asyncio.wait_for(task, 5)  # the hour-long wait ended with the stop
    assert finished == [1]


async def test_not_at_once_waits_a_period_before_the_first_step(monkeypatch):
    clock = FakeClock(monkeypatch)
    stop = asyncio.Event()
    started: list[float] = []
    async for _ in Ticker(stop, 5.0, at_once=False):
        started.append(clock.now - 1000.0)
        stop.set()
    assert started == [5.0]
