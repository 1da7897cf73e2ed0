"""The stream role with many clients, against each client consuming the log itself.

`patchwork-bridge stream` runs as a process of its own (its RSS is read from /proc); the
clients run here, reading the SSE stream with aiohttp. The baseline, in the same run: as
many plain aio-pika consumers, each on its own channel, reading the event log (a stream
queue) from its tail: what every CI would do with AMQP access. Events are published here,
each carrying its publish time, so the latency is publish -> a client holding it.

Steady: ``--rate`` events/s for ``--steady`` events (latency). Burst: ``--burst`` events
as fast as the broker confirms them (deliveries/s to all clients together). The baseline
gets a quarter of each: its clients cost this process far more, and its figures are rates.

Last, ``--stuck`` clients that never read while ``--stuck-events`` go by: the role's RSS
before and after, and how many it dropped as slow.

With ``--resume N`` instead: a day away. The log holds N events; ``--clients`` (the most
of them) SSE clients connect at once, each resuming (``Last-Event-ID``) from a position
spread over those N, and read until they hold the last: the time until every one is live,
the broker's CPU and the role's RSS meanwhile. Baseline: as many aio-pika consumers, each
reading the log from the same offset on a connection of its own, in this process.

    python bench/stream.py [--clients 10 200] [--rate 100] [--steady 1000] [--burst 2000]
    python bench/stream.py --resume 20000 [--clients 200]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aio_pika
import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import AMQP_URL, bridge_settings, free_port, run_id, workdir
from bridge.broker.topology import declare_exchange
from bridge.eventlog import declare_log, log_queue

TOKEN = "bench-token-0123456789abcdef"
PAD = "x" * 1100  # about the size of a Patchwork event
STAMP = b'"bench_sent":'


def body(n: int) -> bytes:
    return (
        f'{{"bench_sent":{time.time():.6f},"id":{n},"category":"patch-created",'
        f'"project":{{"link_name":"netdevbpf"}},"pad":"{PAD}"}}'
    ).encode()


def sent_at(data: bytes) -> float:
    start = data.index(STAMP) + len(STAMP)
    return float(data[start : data.index(b",", start)])


class Tally:
    """What all clients together received: counts and publish -> receipt latencies."""

    def __init__(self) -> None:
        self.received = 0
        self.latencies: list[float] = []
        self.changed = asyncio.Event()

    def got(self, data: bytes) -> None:
        self.received += 1
        self.latencies.append(time.time() - sent_at(data))
        if self.received % 1000 == 0:
            self.changed.set()

    async def until(self, total: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.received < total:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.received} of {total} deliveries")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), 0.2)

    def reset(self) -> None:
        self.received = 0
        self.latencies = []


async def sse_client(session: aiohttp.ClientSession, url: str, tally: Tally) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with session.get(f"{url}/v1/events", headers=headers) as response:
        response.raise_for_status()
        async for line in response.content:
            if line.startswith(b"data: "):
                tally.got(line)


async def amqp_clients(n: int, exchange: str, tally: Tally) -> aio_pika.abc.AbstractConnection:
    connection = await aio_pika.connect(AMQP_URL)
    for _ in range(n):
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=100)
        queue = await channel.declare_queue(log_queue(exchange), passive=True)

        async def arrived(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            tally.got(message.body)
            await message.ack()

        await queue.consume(arrived, arguments={"x-stream-offset": "next"})
    return connection


async def publish(exchange: str, count: int, rate: float | None) -> float:
    """Publish ``count`` events (at ``rate``/s, or as fast as confirmed); returns seconds."""
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel(publisher_confirms=True)
        target = await channel.get_exchange(exchange)
        began = time.monotonic()
        pending: set[asyncio.Future[object]] = set()
        for n in range(count):
            if rate is not None:
                await asyncio.sleep(max(0.0, began + n / rate - time.monotonic()))
            message = aio_pika.Message(body(n), message_id=str(n))
            pending.add(asyncio.ensure_future(target.publish(message, "netdevbpf.patch-created")))
            if len(pending) >= 500:
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.gather(*pending)
        return time.monotonic() - began
    finally:
        await connection.close()


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def broker_pid() -> int:
    """The RabbitMQ under test (AMQP_URL's port 5672): the machine's own beam, not the
    4.x one in its chroot."""
    out = subprocess.run(["pgrep", "-x", "beam.smp"], capture_output=True, text=True)
    pids = [int(p) for p in out.stdout.split() if os.readlink(f"/proc/{p}/root") == "/"]
    if len(pids) != 1:
        raise RuntimeError(f"expected one RabbitMQ beam.smp, found {pids}")
    return pids[0]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


async def measure(
    label: str,
    clients: int,
    tally: Tally,
    exchange: str,
    args: argparse.Namespace,
    role_pid: int | None,
) -> dict[str, float]:
    steady, burst = (args.steady, args.burst) if role_pid else (args.steady // 4, args.burst // 4)
    tally.reset()
    await publish(exchange, steady, args.rate)
    await tally.until(clients * steady, 300)
    lat = tally.latencies
    figures = {
        "p50_ms": percentile(lat, 50) * 1000,
        "p99_ms": percentile(lat, 99) * 1000,
    }
    tally.reset()
    broker = broker_pid()
    broker_before = cpu_s(broker)
    role_before = cpu_s(role_pid) if role_pid is not None else 0.0
    began = time.monotonic()
    await publish(exchange, burst, None)
    await tally.until(clients * burst, 600)
    figures["deliveries_per_s"] = clients * burst / (time.monotonic() - began)
    figures["broker_cpu_us_per_delivery"] = (
        (cpu_s(broker) - broker_before) / (clients * burst) * 1e6
    )
    if role_pid is not None:
        figures["role_cpu_us_per_delivery"] = (
            (cpu_s(role_pid) - role_before) / (clients * burst) * 1e6
        )
        figures["rss_mib"] = rss_mib(role_pid)
    shown = ", ".join(f"{k} {v:,.1f}" for k, v in figures.items())
    print(f"{label:<28} {clients:>4} clients: {shown}", flush=True)
    return figures


async def stuck_clients(n: int, port: int) -> list[socket.socket]:
    """Clients that send their GET and never read a byte (a hung CI, a dead NAT entry)."""
    loop = asyncio.get_running_loop()
    sockets = []
    for _ in range(n):
        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.setblocking(False)
        await loop.sock_connect(stuck, ("127.0.0.1", port))
        request = f"GET /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
        await loop.sock_sendall(stuck, request.encode())
        sockets.append(stuck)
    return sockets


async def slow_dropped(session: aiohttp.ClientSession, http_port: int) -> float:
    async with session.get(f"http://127.0.0.1:{http_port}/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith('patchwork_bridge_stream_disconnects_total{reason="slow"}'):
            return float(line.split()[-1])
    return 0.0


RESUMED: list[int] = []
"""Streams that ended (or got a 503) before their client was live, in this run."""


async def resuming_sse(
    session: aiohttp.ClientSession, url: str, last_id: str, expect: int
) -> float:
    """Resume after ``last_id`` until ``expect`` events, as a CI does (a stream that ends or
    gets a 503 resumes from its last id); the time."""
    got = 0
    while True:
        headers = {"Authorization": f"Bearer {TOKEN}", "Last-Event-ID": last_id}
        async with session.get(f"{url}/v1/events", headers=headers) as response:
            if response.status == 503:
                RESUMED.append(1)
                await asyncio.sleep(RETRY_S)
                continue
            response.raise_for_status()
            async for line in response.content:
                if line.startswith(b"id: "):
                    last_id = line[4:].decode().strip()
                elif line.startswith(b"data: "):
                    got += 1
                    if got >= expect:
                        return time.monotonic()
        RESUMED.append(1)


async def log_ids(session: aiohttp.ClientSession, url: str, n: int) -> list[str]:
    """The SSE ids of the next ``n`` events, from one client reading them as they come."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    ids: list[str] = []
    async with session.get(f"{url}/v1/events", headers=headers) as response:
        response.raise_for_status()
        async for line in response.content:
            if line.startswith(b"id: "):
                ids.append(line[4:].decode().strip())
                if len(ids) >= n:
                    return ids
    raise RuntimeError(f"stream ended after {len(ids)} of {n} ids")


async def resuming_amqp(exchange: str, offset: int, expect: int) -> float:
    """A CI reading the log itself from ``offset``, on a connection of its own (200 consumers
    on one connection's channels end in CHANNEL_ERROR under this load)."""
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=100)
    queue = await channel.declare_queue(log_queue(exchange), passive=True)
    done: asyncio.Future[float] = asyncio.get_running_loop().create_future()
    got = 0

    async def arrived(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        nonlocal got
        got += 1
        await message.ack()
        if got >= expect and not done.done():
            done.set_result(time.monotonic())

    await queue.consume(arrived, arguments={"x-stream-offset": offset})
    try:
        return await done
    finally:
        await connection.close()


def offset_after(sse_id: str) -> int:
    """The log offset just after the event of this SSE id (``<offset>-<log tag>``)."""
    return int(sse_id.split("-")[0]) + 1


RESUME_TIMEOUT_S = 900.0
RETRY_S = 1.0


async def resume(
    args: argparse.Namespace,
    session: aiohttp.ClientSession,
    url: str,
    exchange: str,
    role_pid: int,
) -> None:
    """``--resume N``: every client back at once from a position over the last N events."""
    n, clients = args.resume, max(args.clients)
    reading = asyncio.create_task(asyncio.wait_for(log_ids(session, url, n), 300))
    await asyncio.sleep(1.0)  # connected, at the tail
    await publish(exchange, n, None)
    ids = await reading
    positions = [round(i * (n - 1) / max(1, clients - 1)) for i in range(clients)]
    # Resuming after ids[p] leaves n - p - 1 events; from the start (p = -1), n.
    broker = broker_pid()
    rows = []
    for label in ("stream role (SSE)", "plain AMQP consumer each"):
        began, broker_before = time.monotonic(), cpu_s(broker)
        if label.startswith("stream"):
            done = await asyncio.wait_for(
                asyncio.gather(
                    *(
                        resuming_sse(session, url, ids[p], n - p - 1)
                        for p in positions
                        if n - p - 1 > 0
                    )
                ),
                RESUME_TIMEOUT_S,
            )
            rss = rss_mib(role_pid)
        else:
            done = await asyncio.wait_for(
                asyncio.gather(
                    *(
                        resuming_amqp(exchange, offset_after(ids[p]), n - p - 1)
                        for p in positions
                        if n - p - 1 > 0
                    )
                ),
                RESUME_TIMEOUT_S,
            )
            rss = float("nan")
        took = max(done) - began
        events = sum(n - p - 1 for p in positions)
        broker_us = (cpu_s(broker) - broker_before) / max(1, events) * 1e6
        rows.append((label, took, events, broker_us, rss))
        print(
            f"{label:<28} {len(done)} clients resuming over the last {n:,} events "
            f"({events:,} deliveries): all live after {took:.1f} s, broker CPU "
            f"{broker_us:.1f} us/delivery"
            + (f", role RSS {rss:.1f} MiB, {len(RESUMED)} streams resumed" if rss == rss else ""),
            flush=True,
        )
    (_, ours, *_), (_, theirs, *_) = rows
    print(f"time until every client is live, stream / plain: {ours / theirs:.2f}")


async def connect_clients(
    n: int, start: Callable[[], Awaitable[None]], tasks: list[asyncio.Task[None]]
) -> None:
    for _ in range(n):
        tasks.append(asyncio.create_task(start()))
    await asyncio.sleep(1.0 + n / 100)  # every one connected and reading the tail


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 200])
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--steady", type=int, default=1000)
    parser.add_argument("--burst", type=int, default=2000)
    parser.add_argument("--stuck", type=int, default=20, help="clients that never read")
    parser.add_argument("--stuck-events", type=int, default=10_000)
    parser.add_argument("--resume", type=int, metavar="N", help="a day away: see above")
    args = parser.parse_args()

    exchange = f"bench-stream-{run_id()}"
    settings = bridge_settings(exchange=exchange)
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel()
    await declare_exchange(channel, exchange)
    await declare_log(channel, settings)
    results: dict[str, dict[str, float]] = {}
    with workdir() as tmp:
        consumers = tmp / "consumers.toml"
        consumers.write_text(f'[[consumer]]\nname = "bench"\ntoken = "{TOKEN}"\n')
        port, http_port = free_port(), free_port()
        env = {
            **os.environ,
            "BRIDGE_AMQP_URL": AMQP_URL,
            "BRIDGE_EXCHANGE": exchange,
            "BRIDGE_STREAM_CONSUMERS": str(consumers),
            "BRIDGE_STREAM_HOST": "127.0.0.1",
            "BRIDGE_STREAM_PORT": str(port),
            "BRIDGE_HTTP_PORT": str(http_port),
            "BRIDGE_LOG_LEVEL": "WARNING",
        }
        role = subprocess.Popen([sys.executable, "-m", "bridge", "stream"], env=env)
        url = f"http://127.0.0.1:{port}"
        tasks: list[asyncio.Task[None]] = []
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        try:
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                for _ in range(100):
                    with contextlib.suppress(aiohttp.ClientError):
                        async with session.get(f"http://127.0.0.1:{http_port}/readyz") as r:
                            if r.status == 200:
                                break
                    await asyncio.sleep(0.2)
                print(
                    f"stream role: pid {role.pid}, RSS {rss_mib(role.pid):.1f} MiB idle", flush=True
                )
                if args.resume:
                    await resume(args, session, url, exchange, role.pid)
                    return
                connected = 0
                tally = Tally()
                for clients in sorted(args.clients):
                    await connect_clients(
                        clients - connected, lambda: sse_client(session, url, tally), tasks
                    )
                    connected = clients
                    results[f"stream {clients}"] = await measure(
                        "stream role (SSE)",
                        clients,
                        tally,
                        exchange,
                        args,
                        role.pid,
                    )
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await asyncio.sleep(1.0)
                before = rss_mib(role.pid)
                stuck = await stuck_clients(args.stuck, port)
                await asyncio.sleep(1.0)
                await publish(exchange, args.stuck_events, None)
                await asyncio.sleep(2.0)
                dropped = await slow_dropped(session, http_port)
                print(
                    f"{args.stuck} clients that never read, {args.stuck_events:,} events: RSS "
                    f"{before:.1f} -> {rss_mib(role.pid):.1f} MiB, {dropped:.0f} dropped as slow",
                    flush=True,
                )
                for one in stuck:
                    one.close()
            plain_tally = Tally()
            most = max(args.clients)
            plain = await amqp_clients(most, exchange, plain_tally)
            await asyncio.sleep(1.0)
            results["plain"] = await measure(
                "plain AMQP consumer each", most, plain_tally, exchange, args, None
            )
            await plain.close()
        finally:
            role.terminate()
            role.wait(30)
            await channel.queue_delete(log_queue(exchange))
            await channel.exchange_delete(exchange)
            await connection.close()
    most = max(args.clients)
    stream, base = results[f"stream {most}"], results["plain"]
    print(
        f"\n{most} clients, stream/plain: deliveries/s "
        f"{stream['deliveries_per_s'] / base['deliveries_per_s']:.2f}, "
        f"p50 {stream['p50_ms'] / base['p50_ms']:.2f}x, "
        f"p99 {stream['p99_ms'] / base['p99_ms']:.2f}x, "
        "broker CPU per delivery "
        f"{stream['broker_cpu_us_per_delivery'] / base['broker_cpu_us_per_delivery']:.2f}x"
    )
    if len(args.clients) > 1:
        least = min(args.clients)
        print(
            f"stream role RSS: {results[f'stream {least}']['rss_mib']:.1f} MiB at {least} "
            f"clients, {stream['rss_mib']:.1f} MiB at {most}"
        )


if __name__ == "__main__":
    asyncio.run(main())
