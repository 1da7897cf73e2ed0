"""Two deployments on one vhost (a test site and a real one, or two Patchwork instances),
each its own `run` process with the webhook and checks roles: nothing of one reaches the
other, and each site's operator commands touch only its own queues."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pika
import pytest
from aiohttp import web

from bridge.__main__ import main
from bridge.broker.topology import replay_exchange
from bridge.checks.result import results_exchange
from bridge.delivery.history import history_queue
from bridge.delivery.queues import checks_queues, subscription_queues
from bridge.demo.patchwork_double import FakePatchwork
from bridge.eventlog import log_queue
from tests.amqp_helpers import queue_depth, wait_for
from tests.broker import AMQP_URL
from tests.receiver import Receiver

pytestmark = pytest.mark.broker

TZ = "Australia/Canberra"
SCHEDULE = [0.2]


@dataclass
class Site:
    """One deployment: its exchange, its Patchwork (token), its receiver, its process."""

    name: str
    exchange: str
    token: str
    refused_id: int
    """The event its receiver answers 400: it ends in this site's dead letters."""
    dir: Path
    patchwork: FakePatchwork = field(init=False)
    receiver: Receiver = field(init=False)
    events: list[dict] = field(default_factory=list)
    process: asyncio.subprocess.Process | None = None

    @property
    def source(self) -> str:
        return f"{self.patchwork.url}/api/1.3"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "BRIDGE_EXCHANGE": self.exchange,
            "BRIDGE_PATCHWORK_URL": self.patchwork.url,
            "BRIDGE_PATCHWORK_TIMEZONE": TZ,
            "BRIDGE_PATCHWORK_TOKEN": self.token,
            "BRIDGE_STATE_DIR": str(self.dir / "state"),
            "BRIDGE_START": "beginning",
            "BRIDGE_POLL_INTERVAL": "0.2",
            "BRIDGE_SUBSCRIPTIONS": str(self.dir / "subscriptions.toml"),
            "BRIDGE_CHECKS": "true",
            "BRIDGE_CHECKS_RATE": "50",
            "BRIDGE_HTTP_PORT": "0",
        }

    async def start(self) -> None:
        self.patchwork = FakePatchwork(tz=TZ, maintainers={self.token: {"netdevbpf", "dpdk"}})
        self.events = self.patchwork.add_events(6)
        await self.patchwork.start()

        async def answer(request: web.Request) -> web.Response:
            body = json.loads(await request.read())
            return web.Response(status=400 if body["id"] == self.refused_id else 204)

        self.receiver = Receiver(answer)
        await self.receiver.start()
        self.dir.mkdir()
        (self.dir / "subscriptions.toml").write_text(
            f'[[webhook]]\nname = "all"\nurl = "{self.receiver.url()}"\n'
            f"retry_schedule = {SCHEDULE}\nallow_private_network = true\n"
        )
        with (self.dir / "log").open("wb") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bridge", "run", env=self.env(), stderr=log
            )

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(self.process.wait(), 30)
        await self.receiver.stop()
        await self.patchwork.stop()

    def sources(self) -> set[str]:
        return {hit.headers["ce-source"] for hit in self.receiver.requests}

    def cli(self, *argv: str) -> int:
        """An operator command of this site, in this process (settings from its env)."""
        saved, env = dict(os.environ), self.env()
        os.environ.clear()
        os.environ.update(env)
        try:
            return main(list(argv))
        finally:
            os.environ.clear()
            os.environ.update(saved)


@asynccontextmanager
async def two_sites(unique: str, tmp_path: Path, amqp) -> AsyncIterator[tuple[Site, Site]]:
    a = Site("a", f"test-a-{unique}", "token-of-site-a-0123456789", 3, tmp_path / "a")
    b = Site("b", f"test-b-{unique}", "token-of-site-b-0123456789", 4, tmp_path / "b")
    try:
        await a.start()
        await b.start()
        yield a, b
    finally:
        for site in (a, b):
            await site.stop()
        channel = await amqp.channel()
        for site in (a, b):
            lane = subscription_queues(site.exchange, "all")
            for queue in [
                *lane.watched(SCHEDULE),
                lane.marker,
                *checks_queues(site.exchange).watched(
                    [5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0]
                ),
                log_queue(site.exchange),
                history_queue(site.exchange),
            ]:
                await channel.queue_delete(queue)
            for exchange in (
                site.exchange,
                results_exchange(site.exchange),
                replay_exchange(site.exchange, lane.main),
            ):
                await channel.exchange_delete(exchange)
        await channel.close()


def publish_results(exchange: str, patches: list[int]) -> None:
    """Results as a CI written with pika sends them: no message_id, confirmed."""
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for patch in patches:
            body = json.dumps({"patch": patch, "state": "success", "context": "ci"})
            channel.basic_publish(exchange, "netdevbpf.check", body.encode(), mandatory=True)
    finally:
        connection.close()


@pytest.mark.timeout(180)
async def test_two_deployments_on_one_vhost_never_touch_each_others_work(
    unique, tmp_path, amqp, capsys
):
    async with two_sites(unique, tmp_path, amqp) as (a, b):
        for site in (a, b):
            wanted = {str(e["id"]) for e in site.events} - {str(site.refused_id)}
            await wait_for(lambda s=site, w=wanted: s.receiver.delivered() >= w, 60)

            async def dead(s: Site = site) -> bool:
                return await queue_depth(amqp, subscription_queues(s.exchange, "all").dead) == 1

            await wait_for(dead, 60, f"site {site.name}'s dead letter")
        # Webhooks: each site's receiver got its own site's events, and only those.
        assert a.sources() == {a.source} and b.sources() == {b.source}

        # Checks: results published to a site's exchange reach that site's Patchwork only.
        await asyncio.to_thread(publish_results, results_exchange(a.exchange), [1, 2, 3, 4, 5])
        await asyncio.to_thread(publish_results, results_exchange(b.exchange), [11, 12, 13])
        await wait_for(lambda: len(a.patchwork.checks.checks) == 5, 60, "site a's checks")
        await wait_for(lambda: len(b.patchwork.checks.checks) == 3, 60, "site b's checks")
        assert sorted(a.patchwork.checks.checks) == [1, 2, 3, 4, 5]
        assert sorted(b.patchwork.checks.checks) == [11, 12, 13]

        # Operator commands: each site's see and change only its own queues.
        capsys.readouterr()
        assert await asyncio.to_thread(a.cli, "dlq", "list", "all") == 0
        listed = capsys.readouterr().out.splitlines()
        assert [line.split()[0] for line in listed] == [str(a.refused_id)]
        assert await asyncio.to_thread(b.cli, "dlq", "list", "all") == 0
        listed = capsys.readouterr().out.splitlines()
        assert [line.split()[0] for line in listed] == [str(b.refused_id)]

        # Each site's receiver: its 6 events (one of them twice, retried) and the
        # check-created events of its own checks, before site a replays its log.
        await wait_for(lambda: len(a.receiver.requests) >= 7 + 5, 30, "site a's check events")
        await wait_for(lambda: len(b.receiver.requests) >= 7 + 3, 30, "site b's check events")
        before_a, before = len(a.receiver.requests), len(b.receiver.requests)
        since = min(e["date"] for e in a.events)
        code = await asyncio.to_thread(a.cli, "replay", "--since", since, "--subscription", "all")
        assert code == 0, capsys.readouterr().err
        assert "replayed 11 events" in capsys.readouterr().out
        await wait_for(lambda: len(a.receiver.requests) >= before_a + 11, 30, "a's replay")
        await asyncio.sleep(1.0)
        assert len(b.receiver.requests) == before  # nothing of site a's replay
        assert a.sources() == {a.source} and b.sources() == {b.source}

        b.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        await asyncio.wait_for(b.process.wait(), 30)  # type: ignore[union-attr]
        capsys.readouterr()
        assert await asyncio.to_thread(b.cli, "subscriptions", "remove", "all", "--yes") == 0
        shown = [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()[:-1]]
        assert shown and all(q.startswith(f"{b.exchange}.webhook.all") for q in shown), shown
        assert await queue_depth(amqp, subscription_queues(b.exchange, "all").main) is None
        assert await queue_depth(amqp, subscription_queues(a.exchange, "all").main) is not None
        assert await asyncio.to_thread(a.cli, "subscriptions", "list") == 0
        assert capsys.readouterr().out.split("\t")[:2] == ["all", "enabled"]
