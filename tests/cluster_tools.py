"""A three-node RabbitMQ cluster under test, and the whole bridge on it while nodes fail.

The cluster is ``.ci/rabbitmq cluster`` (three nodes of RabbitMQ 4.3 on this machine),
as tests/broker.py names it. ``Scenario`` runs ``patchwork-bridge run`` against it
with webhook receivers, a CI queue made by ``bind`` and stream clients, feeds Patchwork
events, applies faults, and counts what every reader got: tests/test_cluster.py and
bench/cluster.py use it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from aiohttp import web
from httpx_sse import aconnect_sse

from bridge.broker.connect import connect
from bridge.cli.bind import bind
from bridge.demo.patchwork_double import FakePatchwork
from bridge.settings import Settings
from tests.broker import CLUSTER_CTL, CLUSTER_URLS
from tests.receiver import Receiver

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "cluster-stream-token-0123456789"
TZ = "Australia/Canberra"


class Cluster:
    """The nodes of ``TEST_CLUSTER_URLS``, numbered from 1, and what can be done to them."""

    def __init__(self, urls: str = CLUSTER_URLS) -> None:
        self.urls = [u.strip() for u in urls.split(",") if u.strip()]
        self.ports = [int(re.search(r":(\d+)/", u).group(1)) for u in self.urls]  # type: ignore[union-attr]

    def number_of(self, address: str) -> int:
        """Which node ``host:port`` is."""
        return self.ports.index(int(address.rsplit(":", 1)[1])) + 1

    async def ctl(self, *args: str, timeout: float = 120) -> str:
        def run() -> str:
            result = subprocess.run(
                [*CLUSTER_CTL, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
            )
            if result.returncode != 0:
                raise RuntimeError(f"{' '.join(args)}: {result.stderr.strip()[-500:]}")
            return result.stdout

        return await asyncio.to_thread(run)

    async def kill(self, node: int) -> None:
        await self.ctl("kill", str(node))

    async def pause(self, node: int) -> None:
        await self.ctl("pause", str(node))

    async def resume(self, node: int) -> None:
        await self.ctl("resume", str(node))

    async def restart(self, node: int) -> None:
        await self.ctl("restart", str(node))

    async def whole(self, via: int) -> None:
        """Until all three nodes are running again, asked of node ``via``."""
        await self.ctl("ctl", str(via), "await_online_nodes", str(len(self.urls)))

    async def leaders(self, via: int, prefix: str) -> dict[str, int]:
        """Queue name -> the node leading it, for the queues whose name starts with ``prefix``."""
        out = await self.ctl(
            "ctl", str(via), "list_queues", "name", "leader", "--formatter", "json"
        )
        found = json.loads(out or "[]")
        return {
            q["name"]: int(re.search(r"cluster(\d+)@", q["leader"]).group(1))  # type: ignore[union-attr]
            for q in found
            if q["name"].startswith(prefix) and q.get("leader")
        }

    async def ask(self, *args: str) -> str:
        """rabbitmqctl ARGS on the first node that answers."""
        failures = []
        for node in range(1, len(self.urls) + 1):
            try:
                return await self.ctl("ctl", str(node), *args, timeout=60)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                failures.append(f"node {node}: {exc}")
        raise RuntimeError("; ".join(failures))

    async def delete(self, via: int, *queues: str) -> None:
        for queue in queues:
            await self.ctl("ctl", str(via), "delete_queue", queue)


class SingleNode(Cluster):
    """One node of ``.ci/rabbitmq`` (``VERSION``): a Scenario on it, for comparison; no faults."""

    def __init__(self, version: str = "4.3") -> None:
        url = subprocess.run(
            [str(ROOT / ".ci/rabbitmq"), "url", version], capture_output=True, text=True,
            check=True,
        ).stdout.strip()  # fmt: skip
        super().__init__(url)
        self.version = version

    async def ask(self, *args: str) -> str:
        def run() -> str:
            return subprocess.run(
                [str(ROOT / ".ci/rabbitmq"), "ctl", self.version, *args], capture_output=True,
                text=True, timeout=60, check=True,
            ).stdout  # fmt: skip

        return await asyncio.to_thread(run)


@dataclass
class Fault:
    """One fault applied, and how long until the first event Patchwork created after it
    reached a receiver: the whole path working again."""

    kind: str
    node: int
    at: float
    first_after_s: float | None = None


@dataclass
class Readers:
    """What every reader got: event id -> times it arrived, per reader."""

    webhooks: dict[str, Counter[int]] = field(default_factory=dict)
    ci: Counter[int] = field(default_factory=Counter)
    stream: list[Counter[int]] = field(default_factory=list)
    arrivals: list[tuple[float, int]] = field(default_factory=list)
    """(``time.monotonic()``, event id) of every webhook delivery."""


class Scenario:
    """``patchwork-bridge run`` on the cluster, with its readers and a Patchwork feed."""

    def __init__(
        self,
        cluster: Cluster,
        tmp: Path,
        unique: str,
        *,
        patchwork: FakePatchwork,
        subscriptions: int = 3,
        stream_clients: int = 20,
        rate_per_s: float = 5.0,
    ) -> None:
        self.cluster = cluster
        self.tmp = tmp
        self.exchange = f"test-cluster-{unique}"
        self.ci_queue = f"test-cluster-ci-{unique}"
        self.patchwork = patchwork
        self.subscriptions = subscriptions
        self.stream_clients = stream_clients
        self.rate_per_s = rate_per_s
        self.readers = Readers()
        self.added: list[int] = []
        self.added_at: dict[int, float] = {}
        self.faults: list[Fault] = []
        self.http_port = 0
        self.stream_port = 0
        self._receivers: list[Receiver] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._feeding = asyncio.Event()
        self._stop = asyncio.Event()
        self._process: asyncio.subprocess.Process | None = None
        self._ci_connection: AbstractRobustConnection | None = None

    @property
    def settings(self) -> Settings:
        return Settings(
            amqp_url=",".join(self.cluster.urls),  # type: ignore[arg-type]
            exchange=self.exchange,
            queue_type="quorum",
        )

    # -- setting it up ---------------------------------------------------------------------

    async def start(self, *, feeding: bool = True) -> None:
        """Everything up and ready; Patchwork gets mail from then on if ``feeding``."""
        await self.patchwork.start()
        lines = []
        for i in range(self.subscriptions):
            name = f"hook{i}"
            self.readers.webhooks[name] = Counter()
            receiver = Receiver(self._receiving(name))
            await receiver.start()
            self._receivers.append(receiver)
            lines.append(
                f'[[webhook]]\nname = "{name}"\nurl = "{receiver.url()}"\n'
                "allow_private_network = true\nretry_schedule = [1, 1, 1, 1, 1, 1, 1, 1]\n"
            )
        (self.tmp / "subscriptions.toml").write_text("\n".join(lines))
        (self.tmp / "consumers.toml").write_text(f'[[consumer]]\nname = "ci"\ntoken = "{TOKEN}"\n')
        await bind(self.settings, self.ci_queue, ["#"])
        self.http_port, self.stream_port = _free_port(), _free_port()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")},
            "BRIDGE_AMQP_URL": ",".join(self.cluster.urls),
            "BRIDGE_EXCHANGE": self.exchange,
            "BRIDGE_QUEUE_TYPE": "quorum",
            "BRIDGE_LOG_REPLICAS": str(len(self.cluster.urls)),
            "BRIDGE_PATCHWORK_URL": self.patchwork.url,
            "BRIDGE_PATCHWORK_TIMEZONE": TZ,
            "BRIDGE_START": "beginning",
            "BRIDGE_POLL_INTERVAL": "0.5",
            "BRIDGE_STATE_DIR": str(self.tmp / "state"),
            "BRIDGE_SUBSCRIPTIONS": str(self.tmp / "subscriptions.toml"),
            "BRIDGE_STREAM_CONSUMERS": str(self.tmp / "consumers.toml"),
            "BRIDGE_STREAM_HOST": "127.0.0.1",
            "BRIDGE_STREAM_PORT": str(self.stream_port),
            "BRIDGE_HTTP_PORT": str(self.http_port),
        }
        with (self.tmp / "bridge.log").open("wb") as log:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bridge", "run", env=env, stderr=log
            )
        await self.until_ready()
        self._ci_connection = await connect(self.settings, "test cluster CI")
        self._tasks = [
            asyncio.create_task(self._consume_ci(), name="ci"),
            *(
                asyncio.create_task(self._read_stream(i), name=f"stream {i}")
                for i in range(self.stream_clients)
            ),
            asyncio.create_task(self._feed(), name="feed"),
        ]
        self.feeding(feeding)

    def _receiving(self, name: str):  # type: ignore[no-untyped-def]
        async def handler(request: web.Request) -> web.Response:
            event = json.loads(await request.read())
            self.readers.webhooks[name][event["id"]] += 1
            self.readers.arrivals.append((time.monotonic(), event["id"]))
            return web.Response(status=204)

        return handler

    async def until_ready(self, timeout_s: float = 60) -> str:
        """Until /readyz answers 200; its text (which node each role is on)."""
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            while True:
                assert self._process is not None and self._process.returncode is None, self.log()[
                    -3000:
                ]
                try:
                    async with http.get(f"http://127.0.0.1:{self.http_port}/readyz") as r:
                        text = await r.text()
                        if r.status == 200:
                            return text
                except (aiohttp.ClientError, TimeoutError):
                    text = ""
                assert time.monotonic() < deadline, f"not ready: {text}"
                await asyncio.sleep(0.2)

    async def producer_node(self) -> int:
        """The node the producer (the role publishing) is on now."""
        text = await self.until_ready()
        found = re.search(r"producer: on RabbitMQ node (\S+)", text)
        assert found, text
        return self.cluster.number_of(found.group(1))

    async def main_queues_node(self) -> int:
        """The node leading most of the webhook queues and the CI queue, among those the
        producer is not on when one of them leads any (a fault of the queues alone)."""
        producer = await self.producer_node()
        leaders = await self.cluster.leaders(producer, f"{self.exchange}.webhook.")
        leaders.update(await self.cluster.leaders(producer, self.ci_queue))
        counts = Counter(leaders.values())
        others = [(n, c) for n, c in counts.most_common() if n != producer]
        return others[0][0] if others else counts.most_common(1)[0][0]

    def log(self) -> str:
        return (self.tmp / "bridge.log").read_text(errors="replace")

    # -- the readers -------------------------------------------------------------------------

    async def _consume_ci(self) -> None:
        assert self._ci_connection is not None
        channel = await self._ci_connection.channel()
        await channel.set_qos(prefetch_count=100)
        # Passive: the robust channel declares it again on every reconnect, as it is.
        queue = await channel.declare_queue(self.ci_queue, passive=True)

        async def take(message: AbstractIncomingMessage) -> None:
            self.readers.ci[json.loads(message.body)["id"]] += 1
            await message.ack()

        await queue.consume(take)
        await self._stop.wait()

    async def _read_stream(self, index: int) -> None:
        """A CI reading the stream, resuming with its last id after every break."""
        got: Counter[int] = Counter()
        self.readers.stream.append(got)
        headers = {"Authorization": f"Bearer {TOKEN}"}
        url = f"http://127.0.0.1:{self.stream_port}/v1/events"
        async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=60)) as client:
            while not self._stop.is_set():
                try:
                    async with aconnect_sse(client, "GET", url, headers=headers) as source:
                        if source.response.status_code != 200:
                            await asyncio.sleep(1)
                            continue
                        async for event in source.aiter_sse():
                            if not event.data or event.event == "gap":
                                continue
                            got[json.loads(event.data)["id"]] += 1
                            headers["Last-Event-ID"] = event.id
                except (httpx.HTTPError, ValueError):
                    await asyncio.sleep(0.5)

    async def _feed(self) -> None:
        """Patchwork keeps getting mail while the faults happen (until ``settle``)."""
        while not self._stop.is_set():
            await self._feeding.wait()
            for event in self.patchwork.add_events(1):
                self.added.append(event["id"])
                self.added_at[event["id"]] = time.monotonic()
            await asyncio.sleep(1 / self.rate_per_s)

    def feeding(self, on: bool) -> None:
        if on:
            self._feeding.set()
        else:
            self._feeding.clear()

    # -- faults -----------------------------------------------------------------------------

    async def fault(self, kind: str, node: int, *, pause_s: float = 60.0) -> Fault:
        """``kill`` (kill -9, then restart it) or ``pause`` (SIGSTOP for ``pause_s``, then
        SIGCONT); back when the cluster is whole again and the bridge is ready."""
        other = next(n for n in range(1, len(self.cluster.urls) + 1) if n != node)
        if kind == "kill":
            await self.cluster.kill(node)  # returns once the node is gone
            fault = Fault(kind, node, time.monotonic())
            self.faults.append(fault)
            await self.first_delivery_after(fault)
            await self.cluster.restart(node)
        else:
            await self.cluster.pause(node)
            fault = Fault(kind, node, time.monotonic())
            self.faults.append(fault)
            await self.first_delivery_after(fault)
            await asyncio.sleep(max(0.0, fault.at + pause_s - time.monotonic()))
            await self.cluster.resume(node)
        await self.cluster.whole(via=other)
        await self.until_ready(120)
        return fault

    async def first_delivery_after(self, fault: Fault, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            after = [t for t, i in self.readers.arrivals if self.added_at.get(i, 0.0) > fault.at]
            if after:
                fault.first_after_s = min(after) - fault.at
                return
            await asyncio.sleep(0.05)

    # -- the end -------------------------------------------------------------------------------

    def missing(self) -> dict[str, int]:
        """Events not (yet) at each reader."""
        wanted = set(self.added)
        out = {f"webhook {n}": len(wanted - set(c)) for n, c in self.readers.webhooks.items()}
        out["ci queue"] = len(wanted - set(self.readers.ci))
        out["stream clients"] = sum(len(wanted - set(c)) for c in self.readers.stream)
        return out

    def duplicates(self) -> dict[str, int]:
        out = {
            f"webhook {n}": sum(v - 1 for v in c.values()) for n, c in self.readers.webhooks.items()
        }
        out["ci queue"] = sum(v - 1 for v in self.readers.ci.values())
        out["stream clients"] = sum(sum(v - 1 for v in c.values()) for c in self.readers.stream)
        return out

    async def settle(self, timeout_s: float = 180) -> None:
        """Stop the mail, then wait until every reader has every event (or the time is up)."""
        self.feeding(False)
        deadline = time.monotonic() + timeout_s
        while any(self.missing().values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.5)

    async def stop(self) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._process is not None and self._process.returncode is None:
            self._process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(self._process.wait(), 60)
        if self._ci_connection is not None:
            await self._ci_connection.close()
        for receiver in self._receivers:
            await receiver.stop()
        await self.patchwork.stop()

    async def clean(self) -> None:
        """Delete everything the scenario made on the cluster: every queue and exchange
        whose name holds its exchange's (unique) name, and the CI queue."""
        mine = (self.exchange, self.ci_queue)
        connection = await connect(self.settings, "test cluster clean-up")
        try:
            channel = await connection.channel()
            for kind, delete in (("queues", channel.queue_delete),
                                 ("exchanges", channel.exchange_delete)):  # fmt: skip
                out = await self.cluster.ask(f"list_{kind}", "name", "-q", "--no-table-headers")
                for name in out.split():
                    if any(m in name for m in mine):
                        await delete(name)
        finally:
            await connection.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
