"""Roles run in-process (demo, tests, benchmarks): a role's failure surfaces at once, not
after a timeout, and stopping waits for every role."""

from __future__ import annotations

import asyncio

import pytest

from bridge.runtime import InProcess, RoleEnded, _run_role


class FakeRole:
    def __init__(
        self,
        name: str,
        *,
        fail_after_s: float | None = None,
        ends: bool = False,
        cancelled_under_it: bool = False,
    ):
        self.name = name
        self._fail_after_s = fail_after_s
        self._ends = ends
        self._cancelled_under_it = cancelled_under_it
        self.stopped_cleanly = False

    async def run(self, stop: asyncio.Event) -> None:
        if self._ends:
            return
        if self._cancelled_under_it:
            # What aiormq does to a call in flight when its connection dies.
            call = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_later(0.05, call.cancel, "reader exited abnormally")
            await call
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
    with pytest.raises(RoleEnded, match="the quitter role returned before it was told to stop"):
        await bridge.until(asyncio.Event(), 5)
    with pytest.raises(RoleEnded):
        await bridge.close()


async def test_a_role_whose_call_a_library_cancelled_fails_loudly_and_stops_the_rest():
    """Not a quiet end: a TaskGroup ignores a cancelled task, and `run` exited 0 with one
    role gone when aiormq cancelled a declare as a hung node's connection died."""
    healthy = FakeRole("healthy")
    with pytest.raises(RoleEnded, match="the victim role was cancelled: reader exited"):
        async with InProcess([healthy, FakeRole("victim", cancelled_under_it=True)]) as bridge:
            await bridge.until(asyncio.Event(), 3600)
    assert healthy.stopped_cleanly


async def test_a_role_cancelled_by_its_owner_is_cancelled_not_an_error():
    task = asyncio.create_task(_run_role(FakeRole("a"), asyncio.Event()))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_until_returns_once_the_event_is_set_and_close_stops_every_role():
    roles = [FakeRole("a"), FakeRole("b")]
    done = asyncio.Event()
    async with InProcess(roles) as bridge:
        asyncio.get_running_loop().call_later(0.05, done.set)
        await bridge.until(done, 3600)
    assert all(role.stopped_cleanly for role in roles)
