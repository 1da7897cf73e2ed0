"""Peak RSS of a real ``python -m bridge run`` process over 100,000 events.

The Patchwork double (in this process) serves a backlog of ``--events`` events spread
over three days; ``run`` starts from the beginning, so its producer catches up while
its webhook role delivers to a receiver process answering 204, to each of
``--subscriptions`` subscriptions bound to every event. With ``--stream-clients N``,
``run`` also serves the event stream and N SSE clients here read every event from the
start, resuming with ``Last-Event-ID`` whenever the role drops them (as a slow client).
VmHWM (peak RSS) and VmRSS are read from /proc/<pid>/status at the first delivery (the
baseline) and at each quarter of the webhook deliveries; memory must not grow with the
count, so the figure to watch is the growth between the second sample and the last.

The double charges the serving cost measured on a real Patchwork (``--cost measured``),
so the producer catches up at the pace it would there. ``--probe FILE`` writes the
process's asyncio tasks and stream state to FILE (bench/probe) whenever a stream client has
had nothing for PROBE_AFTER_S while short of events.

    python bench/memory.py [--events 100000] [--subscriptions 1] [--stream-clients 0]
                           [--source patchwork|queue] [--cost measured|none] [--every N]
                           [--max-seconds S] [--idle-seconds S] [--probe FILE [--tracemalloc]]
                           [--log FILE] [--log-level L]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from bus import declare, delete_topology, preload
from common import (
    AMQP_URL,
    TZ,
    Hook,
    add_cost_option,
    backlog_events,
    bridge_env,
    fill_backlog,
    free_port,
    run_id,
    serving_cost,
    workdir,
    write_subscriptions,
)
from receiver import Receiver
from spy import proc_status_kib

from tests.patchwork_cost import CostedPatchwork

STOP_TIMEOUT_S = 30.0
TOKEN = "bench-memory-token-0123456789"
SINCE = "2000-01-01T00:00:00"  # before every event: each client reads the whole log
ID_LINE = re.compile(rb"(?:^|\n)id: ([^\r\n]+)")
RECONNECT_S = 3.0  # as the stream's retry: asks
PROBE_AFTER_S = 120.0
PROBE_DIR = Path(__file__).parent / "probe"
PROBED_TYPES = "Feed,Subscriber,Hub,RecycledConnection"


@dataclass(frozen=True, slots=True)
class Sample:
    deliveries: int
    elapsed_s: float
    hwm_kib: int
    rss_kib: int
    streamed: int = 0

    def line(self) -> str:
        streamed = f"   streamed {self.streamed:>10,}" if self.streamed else ""
        return (
            f"  {self.deliveries:>9,} deliveries{streamed}  {self.elapsed_s:6.1f} s   peak RSS "
            f"(VmHWM) {self.hwm_kib / 1024:7.1f} MiB   RSS now {self.rss_kib / 1024:7.1f} MiB"
        )


class StreamClient:
    """One SSE client of the whole log: keeps the last id and reconnects with it when the
    stream ends (the role drops a client that falls behind). Log offsets are
    consecutive, so the ids' offsets tell an event missed or sent twice."""

    def __init__(self) -> None:
        self.received = 0
        self.connections = 0
        self.skipped = 0
        """Offsets jumped over: events this client never got."""
        self.repeated = 0
        self.last_id: bytes | None = None
        self.got_at = time.monotonic()
        """When it last got an event (or started)."""
        self._last_offset = -1

    async def run(self, session: aiohttp.ClientSession, url: str) -> None:
        while True:
            headers = {"Authorization": f"Bearer {TOKEN}"}
            if self.last_id is not None:
                headers["Last-Event-ID"] = self.last_id.decode()
            try:
                async with session.get(url, params={"since": SINCE}, headers=headers) as response:
                    if response.status != 503:  # 503: no log yet, or the broker is away
                        response.raise_for_status()
                        self.connections += 1
                        await self._read(response)
            except aiohttp.ClientResponseError:
                raise  # a refusal: the bench asked for something wrong
            except (aiohttp.ClientError, TimeoutError):
                pass  # not listening yet, or dropped: resume from the last whole block
            await asyncio.sleep(RECONNECT_S)

    async def _read(self, response: aiohttp.ClientResponse) -> None:
        carry = b""
        async for chunk in response.content.iter_any():
            data = carry + chunk
            end = data.rfind(b"\r\n\r\n")
            if end < 0:
                carry = data
                continue
            whole, carry = data[:end], data[end + 4 :]
            for event_id in ID_LINE.findall(whole):
                offset = int(event_id.partition(b"-")[0])
                if offset <= self._last_offset:
                    self.repeated += 1
                    continue
                self.skipped += offset - self._last_offset - 1
                self._last_offset = offset
                self.received += 1
                self.last_id = event_id
            self.got_at = time.monotonic()


class StreamClients:
    """``n`` clients of ``run``'s stream, each on its own connection."""

    def __init__(self, n: int, port: int) -> None:
        self.clients = [StreamClient() for _ in range(n)]
        self._url = f"http://127.0.0.1:{port}/v1/events"
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    def start(self) -> None:
        if not self.clients:
            return
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=None, connect=5.0, sock_read=60.0),
        )
        self._tasks = [
            asyncio.create_task(client.run(self._session, self._url)) for client in self.clients
        ]

    def received(self) -> int:
        return sum(client.received for client in self.clients)

    def lagging(self, events: int) -> int:
        """Clients without every event yet; raises if a client gave up."""
        for task in self._tasks:
            if task.done():
                task.result()
        return sum(client.received < events for client in self.clients)

    def stuck(self, events: int, for_s: float) -> int:
        """Clients short of events that got none in the last ``for_s`` seconds."""
        now = time.monotonic()
        return sum(c.received < events and now - c.got_at > for_s for c in self.clients)

    def resumes(self) -> int:
        return sum(max(client.connections - 1, 0) for client in self.clients)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--subscriptions", type=int, default=1, help="each bound to every event")
    parser.add_argument(
        "--stream-clients", type=int, default=0, help="SSE clients reading every event"
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=0.0,
        help="give up after this (default: 300 s plus 1 s per 1,000 deliveries)",
    )
    parser.add_argument(
        "--source",
        choices=["patchwork", "queue"],
        default="patchwork",
        help="patchwork: the producer catches up on the backlog while the webhook role "
        "delivers (the whole of run); queue: the backlog is pre-loaded into the "
        "subscription queues and the producer idles (the webhook role alone)",
    )
    parser.add_argument(
        "--every", type=int, default=0, help="also print a sample every N deliveries (a trace)"
    )
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=0.0,
        help="then leave run idle this long, sampling every quarter: growth with time "
        "(marker checks, depth samples) rather than with deliveries",
    )
    add_cost_option(parser)
    parser.add_argument("--log", type=Path, help="keep the process's log here")
    parser.add_argument("--log-level", default="WARNING", help="BRIDGE_LOG_LEVEL of the process")
    parser.add_argument(
        "--probe", type=Path, help="append the process's tasks and stream state here when stuck"
    )
    parser.add_argument(
        "--tracemalloc",
        action="store_true",
        help="with --probe: trace the process's allocations and probe at every sample, "
        "writing the lines that grew most (slows the process down)",
    )
    args = parser.parse_args()
    if args.tracemalloc and args.probe is None:
        parser.error("--tracemalloc writes into the --probe file")
    if args.source == "queue" and args.stream_clients:
        parser.error("--stream-clients reads the event log, which only the producer fills")
    total = args.events * args.subscriptions
    if args.max_seconds <= 0:
        args.max_seconds = 300.0 + total / 1000

    rid = run_id()
    names = [f"bench-{rid}-{i}" for i in range(args.subscriptions)]
    segments = [f"fast{i}" for i in range(args.subscriptions)]
    exchange = f"bench-memory-{rid}"
    fake = CostedPatchwork(tz=TZ, cost=serving_cost(args))
    if args.source == "patchwork":
        print(f"building a {args.events}-event backlog in the Patchwork double ...", flush=True)
        fill_backlog(fake, args.events)
    await fake.start()
    marks = [total * q // 4 for q in (1, 2, 3, 4)]
    samples: list[Sample] = []
    idle: list[Sample] = []
    stream_port = free_port()
    clients = StreamClients(args.stream_clients, stream_port)
    try:
        async with Receiver.start() as receiver:
            with workdir() as tmp:
                hooks = [
                    Hook(name, receiver.url(segment))
                    for name, segment in zip(names, segments, strict=True)
                ]
                subscriptions = write_subscriptions(tmp / "subscriptions.toml", hooks)
                if args.source == "queue":
                    print(f"pre-loading {args.events} events into the queues ...", flush=True)
                    await declare(exchange, subscriptions)
                    await preload(exchange, backlog_events(args.events))
                settings = {
                    "amqp_url": AMQP_URL,
                    "exchange": exchange,
                    "patchwork_url": fake.url,
                    "patchwork_timezone": TZ,
                    "start": "beginning" if args.source == "patchwork" else "now",
                    "state_dir": str(tmp / "state"),
                    "poll_interval": "1",
                    "subscriptions": str(subscriptions),
                    "http_host": "127.0.0.1",
                    "http_port": "0",
                    "log_level": args.log_level,
                }
                if args.stream_clients:
                    consumers = tmp / "consumers.toml"
                    consumers.write_text(f'[[consumer]]\nname = "bench"\ntoken = "{TOKEN}"\n')
                    settings |= {
                        "stream_consumers": str(consumers),
                        "stream_host": "127.0.0.1",
                        "stream_port": str(stream_port),
                    }
                log_path = args.log or tmp / "bridge.log"
                with log_path.open("wb") as log:
                    process = await asyncio.create_subprocess_exec(
                        sys.executable,
                        "-m",
                        "bridge",
                        "run",
                        env=probe_env(args.probe, bridge_env(**settings), args.tracemalloc),
                        stderr=log,
                    )
                clients.start()
                try:
                    await sample_until_done(
                        args, receiver, segments, clients, process, marks, samples
                    )
                    if args.idle_seconds > 0:
                        idle = await sample_idle(
                            args.idle_seconds, process, samples[-1], args.tracemalloc
                        )
                except BaseException:
                    print(_tail(log_path), file=sys.stderr)
                    raise
                finally:
                    await clients.close()
                    await _stop(process)
    finally:
        await delete_topology(exchange, names)
        await fake.stop()
    report(args, samples, clients)
    if idle:
        report_idle(idle)


def probe_env(probe: Path | None, env: dict[str, str], trace: bool = False) -> dict[str, str]:
    """``env`` with bench/probe loaded at start when ``--probe`` asks for it."""
    if probe is None:
        return env
    path = os.pathsep.join(filter(None, [str(PROBE_DIR), env.get("PYTHONPATH")]))
    return env | {
        "PYTHONPATH": path,
        "BENCH_PROBE_FILE": str(probe.resolve()),
        "BENCH_PROBE_TYPES": PROBED_TYPES,
        **({"PYTHONTRACEMALLOC": "1"} if trace else {}),
    }


async def delivered(receiver: Receiver, segments: list[str]) -> int:
    lanes = await receiver.lanes()
    return sum(lanes[segment].unique for segment in segments if segment in lanes)


async def sample_until_done(
    args: argparse.Namespace,
    receiver: Receiver,
    segments: list[str],
    clients: StreamClients,
    process: asyncio.subprocess.Process,
    marks: list[int],
    samples: list[Sample],
) -> None:
    """Sample at the first delivery and at each mark, then wait for the stream clients to
    have every event; stop early (saying so) at the time limit."""
    started = time.monotonic()
    trace = set(range(args.every, marks[-1], args.every)) if args.every > 0 else set()
    pending = sorted({1, *marks, *trace})

    def sample(deliveries: int) -> Sample:
        return read_sample(process, deliveries, time.monotonic() - started, clients.received())

    probe_next = 0.0
    while clients.lagging(args.events) or pending:  # lagging() raises if a client gave up
        if process.returncode is not None:
            raise RuntimeError(f"python -m bridge run exited with {process.returncode}")
        count = await delivered(receiver, segments)
        if time.monotonic() - started > args.max_seconds:
            print(
                f"  stopped at the {args.max_seconds:g} s limit: {count:,} of {marks[-1]:,} "
                f"deliveries, {clients.lagging(args.events)} stream clients short",
                flush=True,
            )
            samples.append(sample(count))
            print(samples[-1].line(), flush=True)
            return
        while pending and count >= pending[0]:
            mark = pending.pop(0)
            if mark == 1 or mark in marks:
                samples.append(sample(count))
                print(samples[-1].line(), flush=True)
            else:
                print(sample(count).line() + "   (trace)", flush=True)
            if args.tracemalloc:
                process.send_signal(signal.SIGUSR1)
        stuck = clients.stuck(args.events, PROBE_AFTER_S)
        if args.probe is not None and stuck and time.monotonic() >= probe_next:
            process.send_signal(signal.SIGUSR1)
            print(f"  {stuck} stream clients stuck; probe written to {args.probe}", flush=True)
            probe_next = time.monotonic() + PROBE_AFTER_S
        await asyncio.sleep(0.1)
    if args.stream_clients:
        print(sample(count).line() + "   (every stream client has every event)", flush=True)
        if args.tracemalloc:
            process.send_signal(signal.SIGUSR1)


async def sample_idle(
    seconds: float, process: asyncio.subprocess.Process, last: Sample, trace: bool
) -> list[Sample]:
    """RSS while nothing arrives: at the start and each quarter of ``seconds``. RSS hides
    a slow leak at first (it fills memory the deliveries freed), so ``trace`` (with
    ``--tracemalloc``) also probes Python's traced heap at each sample."""
    started = time.monotonic()
    samples = []
    for quarter in range(5):
        await asyncio.sleep(max(0.0, started + seconds * quarter / 4 - time.monotonic()))
        if process.returncode is not None:
            raise RuntimeError(f"python -m bridge run exited with {process.returncode}")
        idle_s = time.monotonic() - started
        samples.append(read_sample(process, last.deliveries, last.elapsed_s + idle_s))
        print(samples[-1].line() + f"   (idle {idle_s:5.0f} s)", flush=True)
        if trace:
            process.send_signal(signal.SIGUSR1)
    return samples


def read_sample(
    process: asyncio.subprocess.Process, deliveries: int, elapsed_s: float, streamed: int = 0
) -> Sample:
    status = proc_status_kib(process.pid)
    return Sample(deliveries, elapsed_s, status["VmHWM"], status["VmRSS"], streamed)


def report_idle(samples: list[Sample]) -> None:
    first, last = samples[0], samples[-1]
    idle_s = last.elapsed_s - first.elapsed_s
    rss_mib = (last.rss_kib - first.rss_kib) / 1024
    print(
        f"  idle for {idle_s:.0f} s after the last delivery: RSS {first.rss_kib / 1024:.1f} "
        f"-> {last.rss_kib / 1024:.1f} MiB ({rss_mib * 3600 / max(idle_s, 1e-9):+.1f} MiB/hour), "
        f"peak {first.hwm_kib / 1024:.1f} -> {last.hwm_kib / 1024:.1f} MiB"
    )


def report(args: argparse.Namespace, samples: list[Sample], clients: StreamClients) -> None:
    quarters = samples[1:]  # samples[0] is the baseline at the first delivery
    if len(quarters) < 3:
        print("too few samples for a growth figure")
        return
    first, second, last = samples[0], quarters[1], quarters[-1]
    growth_kib = last.hwm_kib - second.hwm_kib
    rss_growth_kib = last.rss_kib - second.rss_kib
    span = last.deliveries - second.deliveries
    rate = (last.deliveries - first.deliveries) / max(last.elapsed_s - first.elapsed_s, 1e-9)
    source = "from the Patchwork double" if args.source == "patchwork" else "pre-loaded queues"
    print(
        f"\npeak RSS of python -m bridge run over {args.events:,} events, "
        f"{args.subscriptions} subscription(s), {args.stream_clients} stream clients, {source}"
    )
    print(f"  {last.deliveries:,} webhook deliveries ({rate:,.0f}/s)")
    if args.stream_clients:
        received = [client.received for client in clients.clients]
        print(
            f"  {sum(received):,} stream events, per client {min(received):,} to "
            f"{max(received):,} of {args.events:,}; {clients.resumes()} resumes with "
            "Last-Event-ID after the role dropped a client; events missed "
            f"{sum(c.skipped for c in clients.clients)}, sent twice "
            f"{sum(c.repeated for c in clients.clients)}"
        )
    print(f"  baseline, at the first delivery: {first.hwm_kib / 1024:.1f} MiB")
    print(
        f"  growth of the peak from {second.deliveries:,} to {last.deliveries:,} deliveries: "
        f"{growth_kib / 1024:+.1f} MiB ({growth_kib / max(second.hwm_kib, 1):+.1%}), "
        f"{1024 * growth_kib / max(span, 1):+.1f} bytes/delivery"
    )
    print(f"  growth of the RSS over the same span: {rss_growth_kib / 1024:+.1f} MiB")
    print(f"  ratio last / baseline peak: {last.hwm_kib / max(first.hwm_kib, 1):.2f}")


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
    except TimeoutError:
        print(f"  run did not stop within {STOP_TIMEOUT_S:g}s of SIGTERM; killed", file=sys.stderr)
        process.kill()
        await process.wait()


def _tail(path: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


async def _stoppable() -> None:
    """main(), cancelled (so its cleanup runs) by SIGINT or SIGTERM: a job a shell starts
    in the background has SIGINT ignored, and SIGTERM would end it without cleanup."""
    task = asyncio.ensure_future(main())
    loop = asyncio.get_running_loop()

    def cancel_once() -> None:
        # A second signal (`timeout` passes its own on) must not cut the cleanup short.
        if not task.cancelling():
            task.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, cancel_once)
    try:
        await task
    except asyncio.CancelledError:
        print("stopped by a signal; the queues and exchange are deleted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    asyncio.run(_stoppable())
