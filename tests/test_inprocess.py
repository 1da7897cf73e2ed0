"""Roles run in-process (demo, tests, benchmarks): a role's failure surfaces at once, not
after a timeout, and stopping waits for every role."""

from __future__ import annotations

import asyncio

import pytest

from bridge.runtime import InProcess


class FakeRole:
    def __init__(self, name: str, *, fail_after_s: float | None = None, ends: bool = False):
        self.name = name
        self._fail_after_s = fail_after_s
        self._ends = ends
        self.stopped_cleanly = False

    async def run(self, stop: asyncio.Event) -> None:
        if self._ends:
            return
        if self._fail_after_s is not None:
            await asyncio.sleep(self._fail_after_s)
            raise ValueError(f"{self.name} broke")
        await stop.wait()
        self.stopped_cleanly = True

    def readiness(self) -> tuple[bool, str]:
        return True, ""

    def connected(self) -> bool:
        return True


async def test_a_failing_role_ends_the_wait_with_its_error_not_a_timeout():
    healthy = FakeRole("healthy")
    never = asyncio.Event()
    with pytest.raises(ValueError, match="broken broke"):
        async with InProcess([healthy, FakeRole("broken", fail_after_s=0.05)]) as bridge:
            await bridge.until(never, 3600)
    assert healthy.stopped_cleanly  # the others were stopped as SIGTERM stops them


async def test_a_role_that_ends_before_it_is_told_is_an_error():
    bridge = InProcess([FakeRole("quitter", ends=True)])
    bridge.start()
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="role quitter ended on its own"):
        await bridge.until(asyncio.Event(), 5)
    await bridge.close()


async def test_until_returns_once_the_event_is_set_and_close_stops_every_role():
    roles = [FakeRole("a"), FakeRole("b")]
    done = asyncio.Event()
    async with InProcess(roles) as bridge:
        asyncio.get_running_loop().call_later(0.05, done.set)
        await bridge.until(done, 3600)
    assert all(role.stopped_cleanly for role in roles)
