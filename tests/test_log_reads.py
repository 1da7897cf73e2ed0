"""Clients catching up share their reads of the log (bridge/stream/reads.py): each gets
every message from its start once, in order, while the broker is asked for each stretch
about once and for no more than ``at_once`` reads at a time. The log here is a list and a
read of it a generator (the broker's side is tests/test_stream.py's)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from types import SimpleNamespace

import pytest

import bridge.stream.reads as reads_module
from bridge.stream.reads import LogReads


class FakeLog:
    """``size`` messages at offsets 0..size-1; counts what each read sends."""

    def __init__(self, size: int) -> None:
        self.messages = [SimpleNamespace(headers={"x-stream-offset": i}) for i in range(size)]
        self.sent = 0
        self.reading = 0
        self.most_at_once = 0
        self.open = asyncio.Event()
        """Cleared: every read waits before its first message."""
        self.open.set()
        self.stuck_at: int | None = None
        """A read reaching this offset stops sending (its client takes nothing more)."""

    async def read_log(self, connection, exchange, start, **_: object) -> AsyncIterator[object]:
        self.reading += 1
        self.most_at_once = max(self.most_at_once, self.reading)
        try:
            await self.open.wait()
            for message in self.messages[start:]:
                if message.headers["x-stream-offset"] == self.stuck_at:
                    await asyncio.Event().wait()
                self.sent += 1
                yield message
                await asyncio.sleep(0)
        finally:
            self.reading -= 1


class Connections:
    @contextlib.asynccontextmanager
    async def lease(self) -> AsyncIterator[object]:
        yield object()


@pytest.fixture
def log(monkeypatch: pytest.MonkeyPatch) -> FakeLog:
    fake = FakeLog(2000)
    monkeypatch.setattr(reads_module, "read_log", fake.read_log)
    return fake


async def read_from(reads: LogReads, start: int) -> list[int]:
    messages = reads.read(start, first_wait_s=1, idle_end_s=1, prefetch=100)
    async with contextlib.aclosing(messages):
        return [m.headers["x-stream-offset"] async for m in messages]


async def test_clients_spread_over_the_log_get_all_once_and_it_is_read_about_once(
    log: FakeLog,
) -> None:
    reads = LogReads(Connections(), "x", at_once=4)  # type: ignore[arg-type]
    starts = list(range(0, 2000, 50))  # 40 clients, 10 times the reads at once
    log.open.clear()  # all of them asking before any read sends
    clients = [asyncio.create_task(read_from(reads, start)) for start in starts]
    await asyncio.sleep(0.05)
    log.open.set()
    got = await asyncio.wait_for(asyncio.gather(*clients), 30)
    for start, offsets in zip(starts, got, strict=True):
        assert offsets == list(range(start, 2000)), start
    assert log.most_at_once == 4
    each_its_own = sum(2000 - start for start in starts)  # 41,000
    assert log.sent <= 4 * 2000 < each_its_own, log.sent
    assert reads.broker_reads == 4  # the others joined a read that came by their offset


async def test_a_client_behind_a_stuck_read_reads_on_its_own(
    log: FakeLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reads_module, "FOLLOW_WAIT_S", 0.2)
    reads = LogReads(Connections(), "x", at_once=4)  # type: ignore[arg-type]
    log.stuck_at = 100
    stuck = asyncio.create_task(read_from(reads, 0))
    while log.sent < 100:
        await asyncio.sleep(0.01)
    # Offset 100 is the stuck read's next: a client starting there waits for it a while,
    # then reads on its own (a read that does not stick).
    log.stuck_at = None
    offsets = await asyncio.wait_for(read_from(reads, 100), 10)
    assert offsets == list(range(100, 2000))
    assert reads.broker_reads == 2
    stuck.cancel()
    await asyncio.gather(stuck, return_exceptions=True)
