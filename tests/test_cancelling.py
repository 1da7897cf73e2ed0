"""Waits that end when their task is cancelled, even when what they wait for arrives at
the same moment. On Python 3.11 ``asyncio.wait_for`` returns the result then and drops
the cancel: a stream client dropped as slow as its read got a message waited for the hub
for good (bench/memory.py). No code of ours waits with it."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

import bridge
from bridge.broker.calls import uncancelled


async def test_a_broker_call_cancelled_as_it_ends_still_cancels_its_caller():
    end = asyncio.get_running_loop().create_future()

    async def call() -> str:
        await end
        return "answered"

    caller = asyncio.create_task(uncancelled(call()))
    await asyncio.sleep(0)  # the caller waits on the call, which runs in a task of its own
    end.set_result(None)
    await asyncio.sleep(0)  # the call has ended; its caller has not run since
    assert caller.cancel()  # still waiting: the cancel must win over the answer
    with pytest.raises(asyncio.CancelledError):
        await caller


def test_no_code_of_ours_waits_with_wait_for():
    package = Path(bridge.__file__).parent
    users = [
        f"{path.relative_to(package)}:{number}"
        for path in sorted(package.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"\basyncio\.wait_for\(", line)
    ]
    assert users == []
