"""Shared pieces of the benchmarks: a receiver process, backlogs on the bus, a bridge to run.

The receiver runs in a process of its own (``python bench/common.py receiver``), so
its CPU never counts against the consumer being measured. It timestamps every POST
with ``time.monotonic()`` (CLOCK_MONOTONIC, the same clock in every process of the
machine), keyed by the first path segment: ``/fast/...`` answers 204 at once,
``/hang/...`` never answers until released. Control endpoints live under ``/_/``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aio_pika
import aiohttp
from aiohttp import web

from bridge.broker.topology import declare_exchange, replay_exchange
from bridge.delivery.history import history_queue
from bridge.delivery.queues import subscription_queues
from bridge.demo.patchwork_double import CATEGORIES, FakePatchwork
from bridge.eventlog import log_queue
from bridge.events import Event, parse_event
from bridge.metrics import Metrics
from bridge.producer.publisher import Publisher
from bridge.runtime import InProcess, build_roles
from bridge.settings import Settings
from bridge.webhook.role import declare_subscription
from bridge.webhook.subscriptions import Subscription, load_subscriptions
from tests.broker import AMQP_URL  # TEST_AMQP_URL, as for the tests
from tests.patchwork_cost import MEASURED, ServingCost

TZ = "Australia/Canberra"
# The ce-source of pre-loaded messages; any Patchwork API base URL will do.
SOURCE = "http://127.0.0.1:8000/api/1.3"
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
CONTROL_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 30.0
PRELOAD_CHUNK = 1000


# -- the receiver process ---------------------------------------------------------------


@dataclass
class _Lane:
    """What one path segment has seen."""

    requests: int = 0
    first_s: float | None = None
    last_new_s: float | None = None
    arrivals: dict[str, float] = field(default_factory=dict)
    """webhook-id -> monotonic time of its first arrival."""


class _ReceiverState:
    def __init__(self) -> None:
        self.lanes: dict[str, _Lane] = {}
        self.released = asyncio.Event()

    def reset(self) -> None:
        self.lanes.clear()
        self.released = asyncio.Event()


def _receiver_app() -> web.Application:
    state = _ReceiverState()

    async def post(request: web.Request) -> web.StreamResponse:
        segment = request.match_info["segment"]
        lane = state.lanes.setdefault(segment, _Lane())
        lane.requests += 1
        if segment == "hang":
            released = state.released
            await released.wait()
            return web.Response(status=503)
        if segment == "down":  # a receiver that is not there: every answer a 503
            await request.read()
            return web.Response(status=503, text="down")
        await request.read()
        now = time.monotonic()
        if lane.first_s is None:
            lane.first_s = now
        webhook_id = request.headers.get("webhook-id", f"anonymous-{lane.requests}")
        if webhook_id not in lane.arrivals:
            lane.arrivals[webhook_id] = now
            lane.last_new_s = now
        return web.Response(status=204)

    async def stats(_: web.Request) -> web.Response:
        return web.json_response(
            {
                name: {
                    "requests": lane.requests,
                    "unique": len(lane.arrivals),
                    "first_s": lane.first_s,
                    "last_new_s": lane.last_new_s,
                }
                for name, lane in state.lanes.items()
            }
        )

    async def arrivals(request: web.Request) -> web.Response:
        lane = state.lanes.get(request.query["segment"], _Lane())
        return web.json_response(lane.arrivals)

    async def reset(_: web.Request) -> web.Response:
        state.released.set()  # let anything still hung go before forgetting it
        state.reset()
        return web.Response(status=204)

    async def release(_: web.Request) -> web.Response:
        state.released.set()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_get("/_/stats", stats)
    app.router.add_get("/_/arrivals", arrivals)
    app.router.add_post("/_/reset", reset)
    app.router.add_post("/_/release", release)
    app.router.add_post("/{segment}/{tail:.*}", post)
    return app


async def _serve_receiver() -> None:
    runner = web.AppRunner(_receiver_app(), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(runner.addresses[0][1], flush=True)  # the first line: the bench reads the port
    try:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until EOF
    finally:
        await runner.cleanup()


@dataclass(frozen=True, slots=True)
class LaneStats:
    requests: int
    unique: int
    first_s: float | None
    last_new_s: float | None

    def rate(self) -> float:
        """Deliveries/s from the first arrival to the last new one."""
        if self.first_s is None or self.last_new_s is None or self.unique < 2:
            return 0.0
        return (self.unique - 1) / max(self.last_new_s - self.first_s, 1e-9)


class Receiver:
    """Handle on the receiver process; ``async with Receiver.start() as receiver``."""

    def __init__(self, process: asyncio.subprocess.Process, port: int) -> None:
        self._process = process
        self.port = port
        self._base = f"http://127.0.0.1:{port}"
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=CONTROL_TIMEOUT_S)
        )

    @classmethod
    @contextlib.asynccontextmanager
    async def start(cls) -> AsyncIterator[Receiver]:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "receiver",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert process.stdout is not None
        try:
            line = await asyncio.wait_for(process.stdout.readline(), CONTROL_TIMEOUT_S)
            receiver = cls(process, int(line))
        except BaseException:
            process.kill()
            await process.wait()
            raise
        try:
            yield receiver
        finally:
            await receiver._close()

    def url(self, segment: str) -> str:
        return f"{self._base}/{segment}/hooks/patchwork"

    async def lanes(self) -> dict[str, LaneStats]:
        """Every segment that has seen a POST, in one request."""
        async with self._session.get(f"{self._base}/_/stats") as response:
            lanes = await response.json()
        return {segment: LaneStats(**lane) for segment, lane in lanes.items()}

    async def stats(self, segment: str) -> LaneStats:
        lanes = await self.lanes()
        return lanes.get(segment, LaneStats(requests=0, unique=0, first_s=None, last_new_s=None))

    async def arrivals(self, segment: str) -> dict[str, float]:
        async with self._session.get(
            f"{self._base}/_/arrivals", params={"segment": segment}
        ) as response:
            return dict(await response.json())

    async def reset(self) -> None:
        async with self._session.post(f"{self._base}/_/reset") as response:
            response.raise_for_status()

    async def release(self) -> None:
        """Hung requests, and every later one to ``/hang``, get a 503."""
        async with self._session.post(f"{self._base}/_/release") as response:
            response.raise_for_status()

    async def wait_for(
        self,
        segment: str,
        unique: int,
        timeout_s: float,
        check: Callable[[], None] | None = None,
        poll_s: float = 0.05,
    ) -> LaneStats:
        """Until ``unique`` distinct webhook-ids reached ``segment``; ``check`` raises to abort."""
        deadline = time.monotonic() + timeout_s
        while True:
            stats = await self.stats(segment)
            if stats.unique >= unique:
                return stats
            if check is not None:
                check()
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"/{segment}: {stats.unique} of {unique} events after {timeout_s:g}s"
                )
            await asyncio.sleep(poll_s)

    async def _close(self) -> None:
        await self._session.close()
        assert self._process.stdin is not None
        self._process.stdin.close()
        try:
            await asyncio.wait_for(self._process.wait(), 5.0)
        except TimeoutError:
            self._process.kill()
            await self._process.wait()


# -- events, subscriptions, topology ----------------------------------------------------


def add_cost_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cost",
        choices=["measured", "none"],
        default="measured",
        help="the double's serving cost: as measured on a real Patchwork, or none",
    )


def serving_cost(args: argparse.Namespace) -> ServingCost | None:
    """What ``--cost`` asks the Patchwork double to charge each request."""
    return MEASURED if args.cost == "measured" else None


def fill_backlog(fake: FakePatchwork, n: int, days: float = 3.0) -> None:
    """``n`` events of every category spread over the last ``days``, as a producer
    restarting after an outage sees them (so the dedup window stays small)."""
    categories = itertools.cycle(CATEGORIES)
    first = datetime.now() - timedelta(days=days)
    step = timedelta(days=days) / n
    for i in range(n):
        fake.add_event(next(categories), date=first + i * step)


def backlog_events(n: int) -> list[Event]:
    """``n`` bus events exactly as the producer would read them from Patchwork."""
    fake = FakePatchwork(tz=TZ)
    fill_backlog(fake, n)
    events = []
    for event_id in range(1, n + 1):
        raw = fake.item_bytes(event_id).decode()
        events.append(parse_event(json.loads(raw), raw))
    return events


@dataclass(frozen=True)
class Hook:
    """One ``[[webhook]]`` of a subscriptions file written for a benchmark."""

    name: str
    url: str
    concurrency: int = 16
    timeout: float = 15.0
    secret: str | None = SECRET
    rate: float | None = None
    extra: tuple[str, ...] = ()
    """More ``key = value`` lines, as written."""

    def toml(self) -> str:
        lines = [
            "[[webhook]]",
            f'name = "{self.name}"',
            f'url = "{self.url}"',
            f"concurrency = {self.concurrency}",
            f"timeout = {self.timeout}",
            "allow_private_network = true",
        ]
        if self.secret is not None:
            lines.append(f'secret = "{self.secret}"')
        if self.rate is not None:
            lines.append(f"rate = {self.rate}")
        lines.extend(self.extra)
        return "\n".join(lines) + "\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_id() -> str:
    return uuid.uuid4().hex[:8]


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="patchwork-bridge-bench-") as tmp:
        yield Path(tmp)


def write_subscriptions(path: Path, hooks: Sequence[Hook]) -> Path:
    path.write_text("\n".join(hook.toml() for hook in hooks), encoding="utf-8")
    return path


async def declare(exchange: str, subscriptions_file: Path) -> None:
    """The exchange and every queue of the file's subscriptions, as the bridge declares them."""
    connection = await aio_pika.connect(AMQP_URL, timeout=CONTROL_TIMEOUT_S)
    try:
        channel = await connection.channel()
        await declare_exchange(channel, exchange)
        for subscription in load_subscriptions(subscriptions_file):
            await declare_subscription(channel, exchange, subscription, "classic")
    finally:
        await connection.close()


async def park(exchange: str, queue: str) -> None:
    """A durable queue bound to every event that nobody reads: a CI system that is away."""
    connection = await aio_pika.connect(AMQP_URL, timeout=CONTROL_TIMEOUT_S)
    try:
        channel = await connection.channel()
        parked = await channel.declare_queue(queue, durable=True)
        await parked.bind(exchange, "#")
    finally:
        await connection.close()


async def preload(exchange: str, events: Sequence[Event]) -> None:
    """Publish ``events`` through the producer's own publisher, every one confirmed."""
    connection = await aio_pika.connect(AMQP_URL, timeout=CONTROL_TIMEOUT_S)
    try:
        channel = await connection.channel(publisher_confirms=True)
        target = await channel.get_exchange(exchange)
        publisher = Publisher(target, SOURCE, ZoneInfo(TZ), Metrics(), PRELOAD_CHUNK)
        for start in range(0, len(events), PRELOAD_CHUNK):
            result = await publisher.publish(events[start : start + PRELOAD_CHUNK])
            if result.failed:
                raise RuntimeError(f"pre-loading: {len(result.failed)} publishes not confirmed")
    finally:
        await connection.close()


async def forget_log(exchange: str) -> None:
    """Delete the exchange's event log, so the next producer's first start is a first start:
    with the log, a producer without a cursor resumes after what the log holds."""
    connection = await aio_pika.connect(AMQP_URL, timeout=CONTROL_TIMEOUT_S)
    try:
        channel = await connection.channel()
        await channel.queue_delete(log_queue(exchange))
        await channel.queue_delete(history_queue(exchange))  # the webhook role's attempt history
    finally:
        await connection.close()


async def queue_depth(queue: str) -> int:
    connection = await aio_pika.connect(AMQP_URL, timeout=CONTROL_TIMEOUT_S)
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)
    finally:
        await connection.close()


async def delete_topology(
    exchange: str, names: Sequence[str], extra_queues: Sequence[str] = ()
) -> None:
    """Every queue the bridge may have declared for subscriptions ``names``, the
    ``extra_queues`` and the exchange."""
    connection = await aio_pika.connect(AMQP_URL, timeout=CONTROL_TIMEOUT_S)
    try:
        channel = await connection.channel()
        for queue in extra_queues:
            await channel.queue_delete(queue)
        for name in names:
            # The benchmarks keep the default retry schedule, so these are all its queues.
            subscription = Subscription(name=name)
            queues = subscription_queues(exchange, name)
            for queue in [
                *queues.watched(subscription.retry_schedule),
                queues.marker,
                queues.breaker,
            ]:
                await channel.queue_delete(queue)
            await channel.exchange_delete(replay_exchange(exchange, queues.main))
        await channel.exchange_delete(exchange)
        await channel.queue_delete(log_queue(exchange))
        await channel.queue_delete(history_queue(exchange))  # the webhook role's attempt history
    finally:
        await connection.close()


# -- the bridge, in this process or as `python -m bridge run` ---------------------------


def bridge_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "amqp_url": AMQP_URL,
        "patchwork_timezone": TZ,
        "log_level": "WARNING",
    }
    values.update(overrides)
    return Settings(**values)


class InProcessBridge(InProcess):
    """``run``'s roles (producer + webhook) as ``patchwork-bridge demo`` wires them, or the
    roles of another ``command``; a role's failure at the end is printed, so one bad run
    does not hide the figures of the others."""

    def __init__(self, settings: Settings, command: str = "run") -> None:
        self.metrics = Metrics()
        super().__init__(
            build_roles(command, settings, self.metrics), stop_timeout_s=STOP_TIMEOUT_S
        )

    def request_stop(self) -> None:
        self.stop.set()

    async def close(self) -> None:
        try:
            await super().close()
        except TimeoutError:
            print(f"  roles did not stop within {STOP_TIMEOUT_S:g}s", file=sys.stderr)
        except Exception as exc:
            print(f"  a role failed: {exc!r}", file=sys.stderr)


def bridge_env(**settings: str) -> dict[str, str]:
    """The environment of a ``python -m bridge`` process: ours minus any BRIDGE_* plus these."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("BRIDGE_")}
    env.update({f"BRIDGE_{k.upper()}": v for k, v in settings.items()})
    return env


def proc_status_kib(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS) and friends of a live process, in KiB, from /proc."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key.startswith("Vm") and rest.strip().endswith("kB"):
            values[key] = int(rest.split()[0])
    return values


# -- profiling ---------------------------------------------------------------------------


PY_SPY_RATE_HZ = 250


@contextlib.asynccontextmanager
async def py_spy(path: Path | None, rate_hz: int = PY_SPY_RATE_HZ) -> AsyncIterator[None]:
    """Sample this process with py-spy (on-CPU only) while the block runs; raw stacks to ``path``.

    py-spy attaches by pid, so only the block is profiled, not building or pre-loading
    the backlog. ``path=None`` does nothing.
    """
    if path is None:
        yield
        return
    process = await asyncio.create_subprocess_exec(
        "py-spy",
        "record",
        "--pid",
        str(os.getpid()),
        "--rate",
        str(rate_hz),
        "--format",
        "raw",
        "--output",
        str(path),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    await asyncio.sleep(0.5)  # attached before the work starts
    try:
        yield
    finally:
        process.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            await asyncio.wait_for(process.wait(), 30.0)
        except TimeoutError:
            process.kill()
            await process.wait()


def py_spy_summary(
    path: Path, deliveries: int, top: int = 40, rate_hz: int = PY_SPY_RATE_HZ
) -> str:
    """Total (inclusive) and self share of the main thread's samples per function, also
    as CPU microseconds per delivery (samples / rate / deliveries).

    Other threads (asyncio's child watcher, the default executor) only wait, but py-spy
    does not always see a thread blocked in ``waitpid`` as idle, so they are left out.
    """
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = other_threads = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        samples = int(count)
        frames = [_frame_name(f) for f in stack.split(";")]
        if not frames[0].startswith("<module>"):
            other_threads += samples
            continue
        total += samples
        for name in set(frames):
            inclusive[name] += samples
        own[frames[-1]] += samples
    per_us = 1e6 / rate_hz / max(deliveries, 1)
    lines = [
        f"{path.name}: {total} on-CPU samples of the event-loop thread at {rate_hz} Hz "
        f"({other_threads} of other threads left out), {total * per_us:.0f} us per delivery",
        "   total   self  total us/delivery  function",
    ]
    for name, samples in inclusive.most_common(top):
        share, self_share = 100 * samples / total, 100 * own[name] / total
        lines.append(f"  {share:5.1f}% {self_share:5.1f}%  {samples * per_us:7.1f}  {name}")
    lines.append("  top self time:   self  self us/delivery")
    for name, samples in own.most_common(top // 2):
        lines.append(f"  {'':6s} {100 * samples / total:5.1f}%  {samples * per_us:7.1f}  {name}")
    return "\n".join(lines)


def _frame_name(frame: str) -> str:
    """``func (path/to/file.py:12)`` -> ``func (file.py)``: one entry per function."""
    func, _, where = frame.partition(" (")
    return f"{func} ({where.rsplit('/', 1)[-1].split(':', 1)[0]})" if where else func


# -- reporting ---------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted sequence."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), math.ceil(fraction * len(sorted_values))))
    return sorted_values[rank - 1]


def best_line(name: str, rates: Sequence[float], unit: str = "deliveries/s") -> str:
    rounds = ", ".join(f"{r:,.0f}" for r in rates)
    return f"  {name:44s} {max(rates):8,.0f} {unit}   (rounds: {rounds})"


def round_ratios(ours: Sequence[float], baseline: Sequence[float]) -> str:
    """Each round's ratio and their median: the two sides of one round ran minutes
    apart at most, so this holds up better than best-of when the machine's speed drifts."""
    ratios = [a / b for a, b in zip(ours, baseline, strict=True)]
    listed = ", ".join(f"{r:.2f}" for r in ratios)
    return f"median of the rounds' ratios {statistics.median(ratios):.2f} ({listed})"


if __name__ == "__main__":
    if sys.argv[1:] != ["receiver"]:
        sys.exit("usage: python bench/common.py receiver")
    asyncio.run(_serve_receiver())
