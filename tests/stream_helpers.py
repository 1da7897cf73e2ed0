"""Stream test helpers: consumers, the role in-process, an independent SSE client (httpx-sse)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from httpx_sse import ServerSentEvent, aconnect_sse

from bridge.demo.patchwork_double import FakePatchwork
from bridge.metrics import Metrics
from bridge.producer.role import Producer
from bridge.runtime import InProcess
from bridge.settings import Settings
from bridge.stream.consumers import load_consumers
from bridge.stream.role import StreamRole
from tests.amqp_helpers import wait_for
from tests.test_producer import make_settings

NIPA = "nipa-token-0123456789abcdef"
DPDK = "dpdk-token-0123456789abcdef"


def write_consumers(tmp_path: Path) -> Path:
    path = tmp_path / "consumers.toml"
    path.write_text(
        f'[[consumer]]\nname = "nipa"\ntoken = "{NIPA}"\n\n'
        f'[[consumer]]\nname = "dpdk"\ntoken = "{DPDK}"\nevents = ["dpdk.*"]\n'
    )
    return path


def stream_settings(patchwork: FakePatchwork, exchange_name: str, tmp_path: Path) -> Settings:
    """A producer's settings against the double, with two stream consumers, any port."""
    return make_settings(
        patchwork,
        exchange_name,
        tmp_path / "state",
        stream_consumers=write_consumers(tmp_path),
        stream_host="127.0.0.1",
        stream_port=0,
    )


_METRICS: dict[str, Metrics] = {}
"""Each running stream role's metrics, by its URL: ``connected`` reads its client count."""


@asynccontextmanager
async def stream_role(settings: Settings, metrics: Metrics | None = None) -> AsyncIterator[str]:
    """A stream role in this process; yields its base URL once it follows the log."""
    metrics = metrics or Metrics()
    role = StreamRole(settings, metrics, load_consumers(settings.stream_consumers))
    async with InProcess([role]) as bridge:
        await bridge.wait_ready()
        url = f"http://127.0.0.1:{role.port}"
        _METRICS[url] = metrics
        try:
            yield url
        finally:
            del _METRICS[url]


async def connected(url: str, clients: int = 1) -> None:
    """Until the stream role at ``url`` serves ``clients`` clients: from then on each gets
    what is published (a client joins the hub before the role counts it)."""

    def serving() -> bool:
        metric = _METRICS[url].registry.get_sample_value
        return (
            sum(
                metric("patchwork_bridge_stream_clients", {"consumer": name}) or 0
                for name in ("nipa", "dpdk")
            )
            >= clients
        )

    await wait_for(serving, what=f"{clients} stream clients connected")


@asynccontextmanager
async def producer(settings: Settings) -> AsyncIterator[None]:
    async with InProcess([Producer(settings, Metrics())]) as bridge:
        await bridge.wait_ready()
        yield


async def read_events(
    url: str,
    count: int,
    *,
    token: str = NIPA,
    last_id: str | None = None,
    params: dict[str, str | list[str]] | None = None,
    timeout_s: float = 60,
) -> list[ServerSentEvent]:
    """The first ``count`` events (gap events included) of a stream, then hang up."""
    headers = {"Authorization": f"Bearer {token}"}
    if last_id is not None:
        headers["Last-Event-ID"] = last_id
    got: list[ServerSentEvent] = []
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(30, read=None)) as client,
        asyncio.timeout(timeout_s),
        aconnect_sse(client, "GET", f"{url}/v1/events", headers=headers, params=params) as source,
    ):
        source.response.raise_for_status()
        async for event in source.aiter_sse():
            got.append(event)
            if len(got) == count:
                break
    return got


async def publish_and_read(
    patchwork: FakePatchwork, url: str, count: int
) -> tuple[list[dict[str, object]], list[ServerSentEvent]]:
    """``count`` new events, read live by a client that connected first; afterwards the
    hub has handed all of them out."""
    reader = asyncio.create_task(read_events(url, count))
    await connected(url)
    added = patchwork.add_events(count)
    return added, await reader


async def read_resuming(
    url: str, count: int, *, params: dict[str, str] | None = None, timeout_s: float = 60
) -> tuple[list[ServerSentEvent], int]:
    """``count`` events as a CI would read them: whenever its stream ends or fails, it
    connects again with its last id. Returns the events and how many times it did."""
    headers = {"Authorization": f"Bearer {NIPA}"}
    got: list[ServerSentEvent] = []
    resumes = -1
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(30, read=None)) as client,
        asyncio.timeout(timeout_s),
    ):
        while len(got) < count:
            resumes += 1
            if got:
                headers["Last-Event-ID"] = got[-1].id
            try:
                async with aconnect_sse(
                    client, "GET", f"{url}/v1/events", headers=headers, params=params
                ) as source:
                    if source.response.status_code == 503:  # the broker is away: again
                        await asyncio.sleep(0.5)
                        continue
                    source.response.raise_for_status()
                    async for event in source.aiter_sse():
                        got.append(event)
                        if len(got) == count:
                            break
            except httpx.TransportError:
                await asyncio.sleep(0.2)
    return got, resumes


def event_ids(events: list[ServerSentEvent]) -> list[int]:
    return [json.loads(e.data)["id"] for e in events if e.event != "gap"]
