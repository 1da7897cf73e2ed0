"""What users copy: the README's httpx-sse snippet and examples/stream_consumer.py, run as
processes against the stream role for several keep-alive intervals, with events before,
between and after the keep-alives. httpx-sse 0.4.3 turns a keep-alive that ends with a
blank line into an empty event, which both parse as JSON: they must never see one."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections import Counter
from pathlib import Path

import httpx
import pytest

from bridge.metrics import Metrics
from bridge.settings import Settings
from tests.amqp_helpers import wait_for
from tests.stream_helpers import NIPA, producer, stream_role, stream_settings

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parents[1]
KEEPALIVE_S = 1.0
"""The role's BRIDGE_STREAM_KEEPALIVE in these tests: 15 s by default, the same code."""


def readme_snippet() -> str:
    """The Python block under "Reading the stream" in README.md, as a user copies it."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Reading the stream", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]


@pytest.fixture
def settings(patchwork, exchange_name, tmp_path) -> Settings:
    return stream_settings(patchwork, exchange_name, tmp_path).model_copy(
        update={"stream_keepalive": KEEPALIVE_S}
    )


class Client:
    """A user's stream client as a child process, its output collected as it comes."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.argv, self.cwd, self.env = argv, cwd, env
        self.lines: list[str] = []
        self.err = b""
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            cwd=self.cwd,
            env={**os.environ, **self.env},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for line in self.proc.stdout:
            self.lines.append(line.decode().strip())

    def ids(self) -> list[int]:
        words = [line.split() for line in self.lines]
        return [int(w[1]) for w in words if len(w) == 2 and w[1].isdigit()]

    async def wait_for_ids(self, wanted: set[int], timeout_s: float = 30) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not wanted <= set(self.ids()):
            self.assert_running()
            assert asyncio.get_running_loop().time() < deadline, (wanted, self.lines)
            await asyncio.sleep(0.05)

    def assert_running(self) -> None:
        assert self.proc is not None
        assert self.proc.returncode is None, f"the client ended by itself: {self.lines}"

    async def stop(self) -> int:
        """Our signal: the only way it may end."""
        assert self.proc is not None and self.proc.stderr is not None
        self.assert_running()
        self.proc.send_signal(signal.SIGTERM)
        self.err = await self.proc.stderr.read()
        code = await asyncio.wait_for(self.proc.wait(), 10)
        assert self._reader is not None
        await self._reader
        return code


async def run_across_keepalives(patchwork, settings: Settings, client: Client) -> Counter[int]:
    """Events right after connecting, between keep-alives, and after the third: all of them
    printed, each once, and the client still running until we stop it."""
    metrics = Metrics()

    def connected() -> bool:  # from then on it gets what is published
        client.assert_running()
        clients = "patchwork_bridge_stream_clients"
        return metrics.registry.get_sample_value(clients, {"consumer": "nipa"}) == 1

    async with producer(settings), stream_role(settings, metrics) as url:
        client.env["STREAM_URL"] = url
        await client.start()
        await wait_for(connected, what="the client connected")
        added = patchwork.add_events(3, project="netdevbpf")  # what the README asks for
        await client.wait_for_ids({e["id"] for e in added})
        await asyncio.sleep(1.5 * KEEPALIVE_S)  # one keep-alive has gone out
        added += patchwork.add_events(3, project="netdevbpf")  # what the README asks for
        await client.wait_for_ids({e["id"] for e in added})
        await asyncio.sleep(2.5 * KEEPALIVE_S)  # two more, the third with no event around
        added += patchwork.add_events(3, project="netdevbpf")  # what the README asks for
        await client.wait_for_ids({e["id"] for e in added})
        await asyncio.sleep(1.5 * KEEPALIVE_S)
        code = await client.stop()
    assert code == -signal.SIGTERM, client.err.decode()[-2000:]
    assert b"Traceback" not in client.err, client.err.decode()[-2000:]
    counts = Counter(client.ids())
    assert set(counts) == {e["id"] for e in added}
    return counts


async def test_the_readme_snippet_reads_for_hours_past_keepalives(patchwork, settings, tmp_path):
    (tmp_path / "token").write_text(NIPA + "\n")
    snippet = readme_snippet().replace(
        'URL = "http://bridge.example.org:9470/v1/events"',
        'import os; URL = os.environ["STREAM_URL"] + "/v1/events"',
    )
    assert "os.environ" in snippet, "the README's URL line changed: update this test"
    # -u: its prints reach our pipe as they happen, as they reach a terminal
    client = Client([sys.executable, "-u", "-c", snippet], tmp_path, {})
    counts = await run_across_keepalives(patchwork, settings, client)
    assert max(counts.values()) == 1


async def test_the_stream_example_reads_for_hours_past_keepalives(patchwork, settings, tmp_path):
    (tmp_path / "token").write_text(NIPA + "\n")
    env = {"TOKEN_FILE": str(tmp_path / "token"), "STATE": str(tmp_path / "last-event-id")}
    client = Client([sys.executable, str(ROOT / "examples" / "stream_consumer.py")], tmp_path, env)
    counts = await run_across_keepalives(patchwork, settings, client)
    assert max(counts.values()) == 1


async def test_a_keepalive_is_a_comment_line_that_no_client_can_take_for_an_event(
    patchwork, settings
):
    """On the wire: ``: ping`` alone on its line, never followed by the blank line that
    would end an event (the SSE spec dispatches nothing there; httpx-sse 0.4.3 does)."""
    async with (
        producer(settings),
        stream_role(settings) as url,
        httpx.AsyncClient(timeout=httpx.Timeout(10, read=30)) as http,
        http.stream(
            "GET", f"{url}/v1/events", headers={"Authorization": f"Bearer {NIPA}"}
        ) as response,
    ):
        wire = b""
        added = False
        async with asyncio.timeout(30):
            async for chunk in response.aiter_raw():
                wire += chunk
                if not added and b": ping" in wire:
                    patchwork.add_events(2)  # an event between keep-alives
                    added = True
                if wire.count(b": ping") >= 3 and wire.count(b"\r\n\r\n") >= 2:
                    break
    assert b": ping\r\n" in wire
    assert b": ping\r\n\r\n" not in wire
    assert wire.count(b"event: patch-created") == 2
