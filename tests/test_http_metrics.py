"""What an operator scrapes: /metrics after real traffic; /readyz as the broker comes and goes."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from bridge.broker.topology import replay_exchange
from bridge.checks.result import results_exchange
from bridge.delivery.history import history_queue
from bridge.delivery.queues import checks_queues
from bridge.demo.patchwork_double import FakePatchwork
from bridge.eventlog import log_queue
from bridge.http import start_server
from bridge.metrics import Metrics
from bridge.producer.role import Producer
from bridge.runtime import InProcess
from bridge.settings import Settings
from tests.amqp_helpers import lane, wait_for
from tests.broker import AMQP_URL
from tests.receiver import Receiver
from tests.test_run_process import delete_topology


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def promtool() -> str | None:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    cached = cache / "patchwork-bridge-ci" / "promtool" / "usr" / "bin" / "promtool"
    return shutil.which("promtool") or (str(cached) if cached.exists() else None)


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def total(found: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in found.items() if n == name and want <= ls)


@pytest.mark.timeout(120)
async def test_metrics_after_real_traffic_count_what_happened(unique, tmp_path, amqp):
    async def ok_or_broken(request):
        return web.Response(status=204 if request.path == "/ok" else 500)

    hooks = Receiver(ok_or_broken)
    await hooks.start()
    receiver = hooks.url("")

    good, bad = f"good-{unique}", f"bad-{unique}"
    subscriptions = tmp_path / "subscriptions.toml"
    subscriptions.write_text(
        f'[[webhook]]\nname = "{good}"\nurl = "{receiver}/ok"\nallow_private_network = true\n'
        f'[[webhook]]\nname = "{bad}"\nurl = "{receiver}/broken"\nevents = ["dpdk.*"]\n'
        "retry_schedule = [0.1, 0.1]\nallow_private_network = true\nbreaker_failures = 0\n"
    )
    patchwork = FakePatchwork(tz="Australia/Canberra")
    events = [patchwork.add_event("patch-created", p) for p in ["dpdk", "netdevbpf"] * 10]
    patchwork.fail_next("500")
    await patchwork.start()
    port = free_port()
    exchange = f"test-{unique}"
    env = {
        **os.environ,
        "BRIDGE_PATCHWORK_URL": patchwork.url,
        "BRIDGE_PATCHWORK_TIMEZONE": "Australia/Canberra",
        "BRIDGE_EXCHANGE": exchange,
        "BRIDGE_STATE_DIR": str(tmp_path / "state"),
        "BRIDGE_START": "beginning",
        "BRIDGE_POLL_INTERVAL": "0.2",
        "BRIDGE_SUBSCRIPTIONS": str(subscriptions),
        "BRIDGE_HTTP_PORT": str(port),
        "BRIDGE_QUEUE_DEPTH_INTERVAL": "0.2",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "run", env=env, stderr=(tmp_path / "log").open("wb")
    )
    scraped = {}
    text = ""
    dpdk = sum(e["project"]["link_name"] == "dpdk" for e in events)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:

            async def settled() -> bool:
                nonlocal text, scraped
                try:
                    async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
                        text = await response.text()
                except aiohttp.ClientError:
                    return False
                scraped = samples(text)
                return (
                    total(scraped, "patchwork_bridge_webhook_deliveries_total", outcome="delivered")
                    == len(events)
                    and total(
                        scraped,
                        "patchwork_bridge_queue_messages_ready",
                        queue=lane(exchange, bad).dead,
                    )
                    == dpdk
                )

            await wait_for(settled, 60)
            async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
                assert response.status == 200
            async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
                assert response.status == 200, await response.text()
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 30)
        await delete_topology(amqp, subscriptions, exchange)
        await patchwork.stop()
        await hooks.stop()

    p = "patchwork_bridge_"
    assert total(scraped, f"{p}events_published_total") == len(events)
    assert total(scraped, f"{p}events_published_total", project="dpdk") == dpdk
    assert total(scraped, f"{p}poll_errors_total", reason="http_5xx") == 1
    assert (
        total(scraped, f"{p}webhook_deliveries_total", subscription=good, outcome="delivered") == 20
    )
    assert (
        total(scraped, f"{p}webhook_deliveries_total", subscription=bad, outcome="retried")
        == 2 * dpdk
    )
    assert (
        total(scraped, f"{p}webhook_deliveries_total", subscription=bad, outcome="dead_lettered")
        == dpdk
    )
    assert (
        total(scraped, f"{p}webhook_failures_total", subscription=bad, reason="http_5xx")
        == 3 * dpdk
    )
    assert total(scraped, f"{p}webhook_delivery_duration_seconds_count", subscription=good) == 20
    assert total(scraped, f"{p}queue_messages_ready", queue=lane(exchange, good).main) == 0
    assert (f"{p}cursor_lag_seconds", frozenset()) in scraped
    assert total(scraped, f"{p}subscription_enabled", subscription=good) == 1
    assert total(scraped, f"{p}broker_connected", role="producer") == 1
    assert total(scraped, f"{p}broker_connected", role="webhook") == 1
    tool = promtool()
    if tool is None:
        pytest.skip("promtool not installed; .ci/check-packaging fetches it")
    check = subprocess.run([tool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


CHECKS_SCHEDULE = [5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0]
"""The checks role's retry schedule (BRIDGE_CHECKS_RETRY_SCHEDULE's default)."""


def names_the_dashboard_and_alerts_use() -> set[str]:
    from tests.test_deploy import alert_expressions_text, dashboard_expressions

    text = alert_expressions_text() + "\n".join(dashboard_expressions())
    return set(re.findall(r"\bpatchwork_bridge_[a-z_]+", text))


@pytest.mark.timeout(120)
async def test_every_metric_a_panel_or_alert_names_is_exported_from_the_start(
    unique, tmp_path, amqp
):
    """A panel reads 0, not "No data", before anything happened: every role exports each
    child it can increment from its start. Events published by project are the one
    exception (a project appears with its first event); the dashboard adds `or vector(0)`."""
    patchwork = FakePatchwork(tz="UTC")  # no events: nothing will happen
    await patchwork.start()
    (tmp_path / "subscriptions.toml").write_text(
        f'[[webhook]]\nname = "s-{unique}"\nurl = "http://127.0.0.1:9/hook"\n'
        "allow_private_network = true\n"
    )
    (tmp_path / "consumers.toml").write_text(
        f'[[consumer]]\nname = "ci"\ntoken = "{"t" * 32}"\nevents = ["#"]\n'
    )
    port, exchange = free_port(), f"test-{unique}"
    env = {
        **os.environ,
        "BRIDGE_PATCHWORK_URL": patchwork.url,
        "BRIDGE_PATCHWORK_TIMEZONE": "UTC",
        "BRIDGE_PATCHWORK_TOKEN": "token-0123456789abcdef",
        "BRIDGE_EXCHANGE": exchange,
        "BRIDGE_STATE_DIR": str(tmp_path / "state"),
        "BRIDGE_SUBSCRIPTIONS": str(tmp_path / "subscriptions.toml"),
        "BRIDGE_STREAM_CONSUMERS": str(tmp_path / "consumers.toml"),
        "BRIDGE_STREAM_PORT": str(free_port()),
        "BRIDGE_CHECKS": "true",
        "BRIDGE_HTTP_PORT": str(port),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "run", env=env, stderr=(tmp_path / "log").open("wb")
    )
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:

            async def ready() -> bool:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
                        return response.status == 200
                except aiohttp.ClientError:
                    return False

            await wait_for(ready, 60, "readiness of producer+webhook+stream+checks")
            async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
                text = await response.text()
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 30)
        await delete_topology(amqp, tmp_path / "subscriptions.toml", exchange)
        checks = checks_queues(exchange)
        channel = await amqp.channel()
        for queue in (*checks.watched(CHECKS_SCHEDULE), checks.marker, checks.breaker):
            await channel.queue_delete(queue)
        for name in (results_exchange(exchange), replay_exchange(exchange, checks.main)):
            await channel.exchange_delete(name)
        await channel.close()
        await patchwork.stop()
    log = (tmp_path / "log").read_text()
    assert process.returncode == 0, log[-3000:]
    exported = {name for name, _ in samples(text)}
    missing = names_the_dashboard_and_alerts_use() - exported
    assert missing == {"patchwork_bridge_events_published_total"}, missing
    # Every closed label set is there at 0: a reason, an outcome, a status.
    assert total(samples(text), "patchwork_bridge_poll_errors_total", reason="timeout") == 0
    assert (
        "patchwork_bridge_webhook_failures_total",
        frozenset({("subscription", f"s-{unique}"), ("reason", "http_5xx")}),
    ) in samples(text)
    assert (
        "patchwork_bridge_webhook_failures_total",
        frozenset({("subscription", "checks"), ("reason", "wrong_project")}),
    ) in samples(text)
    assert ("patchwork_bridge_stream_requests_refused_total", frozenset({("status", "403")})) in (
        samples(text)
    )


class CuttableProxy:
    """A TCP proxy to RabbitMQ that the test can cut and restore, as a network would."""

    def __init__(self) -> None:
        self.target_port = urlsplit(AMQP_URL).port or 5672
        self.server: asyncio.Server | None = None
        self.port = free_port()
        self.pipes: set[asyncio.Task] = set()

    async def open(self) -> None:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", self.port)

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.pipes:
            task.cancel()
        await asyncio.gather(*self.pipes, return_exceptions=True)
        self.pipes.clear()
        await self.server.wait_closed()

    async def _client(self, reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pipe(src, dst) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            finally:
                dst.close()

        for task in (
            asyncio.create_task(pipe(reader, up_writer)),
            asyncio.create_task(pipe(up_reader, writer)),
        ):
            self.pipes.add(task)


@pytest.mark.broker
async def test_readiness_flips_when_the_broker_goes_away_and_comes_back(unique, tmp_path):
    proxy = CuttableProxy()
    await proxy.open()
    patchwork = FakePatchwork()
    await patchwork.start()
    settings = Settings(
        amqp_url=urlunsplit(
            urlsplit(AMQP_URL)._replace(netloc=f"guest:guest@127.0.0.1:{proxy.port}")
        ),
        exchange=f"test-{unique}",
        patchwork_url=patchwork.url,
        state_dir=tmp_path,
        poll_interval=0.1,
        start="beginning",
    )
    metrics = Metrics()
    producer = Producer(settings, metrics)
    runner, port = await start_server(metrics, [producer.readiness], "127.0.0.1", 0)
    bridge = InProcess([producer])
    bridge.start()

    async def ready() -> int:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/readyz") as r,
        ):
            return r.status

    try:
        await wait_for(lambda: producer.readiness()[0], 20)
        assert await ready() == 200
        await proxy.cut()
        await wait_for(lambda: not producer.readiness()[0], 20)
        assert await ready() == 503
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/healthz") as r,
        ):
            assert r.status == 200  # alive, just not ready
        await proxy.open()
        await wait_for(lambda: producer.readiness()[0], 30)
        assert await ready() == 200
    finally:
        await bridge.close()
        await runner.cleanup()
        await patchwork.stop()
        connection = await aio_pika.connect(AMQP_URL)
        channel = await connection.channel()
        await channel.exchange_delete(settings.exchange)
        await channel.queue_delete(log_queue(settings.exchange))
        await channel.queue_delete(
            history_queue(settings.exchange)
        )  # the webhook role's attempt history
        await connection.close()
