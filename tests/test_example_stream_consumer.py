"""examples/stream_consumer.py run as a CI operator would, killed and restarted: it resumes
from the id it saved, so every event is printed once, give or take the one a kill caught
between its work and its save."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.amqp_helpers import wait_for
from tests.stream_helpers import NIPA, connected, producer, stream_role, stream_settings

pytestmark = pytest.mark.broker

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "stream_consumer.py"


class Example:
    def __init__(self, url: str, tmp_path: Path) -> None:
        (tmp_path / "token").write_text(NIPA + "\n")
        self.env = {
            **os.environ,
            "STREAM_URL": url,
            "TOKEN_FILE": str(tmp_path / "token"),
            "STATE": str(tmp_path / "last-event-id"),
            "EVENTS": "#",
        }
        self.lines: list[str] = []
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, str(EXAMPLE), env=self.env, stdout=asyncio.subprocess.PIPE
        )
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        async for line in self._proc.stdout:
            self.lines.append(line.decode().strip())

    async def kill(self) -> None:
        assert self._proc is not None and self._reader is not None
        self._proc.send_signal(signal.SIGKILL)
        await self._proc.wait()
        await self._reader

    def ids(self) -> list[int]:
        # A kill may cut the last line short: only whole "<category> <id>" lines count.
        words = [line.split() for line in self.lines if line.startswith("patch-")]
        return [int(w[1]) for w in words if len(w) == 2 and w[1].isdigit()]


async def test_the_stream_example_resumes_after_a_kill_and_misses_nothing(
    patchwork, exchange_name, tmp_path
):
    settings = stream_settings(patchwork, exchange_name, tmp_path)
    async with producer(settings), stream_role(settings) as url:
        example = Example(url, tmp_path)
        await example.start()
        await connected(url)  # no saved id yet, so it reads from now on
        added = patchwork.add_events(200, category="patch-created")
        await wait_for(lambda: len(example.ids()) >= 80, timeout=30)
        await example.kill()
        added += patchwork.add_events(100, category="patch-created")  # while it is down
        await example.start()
        await wait_for(lambda: set(example.ids()) >= {e["id"] for e in added}, timeout=30)
        await example.kill()
    counts = Counter(example.ids())
    assert set(counts) == {e["id"] for e in added}
    assert sum(counts.values()) - len(counts) <= 1  # the kill may catch one printed, unsaved
