"""Peak RSS of a real ``python -m bridge run`` process over 100,000 deliveries.

The Patchwork double (in this process) serves a backlog of ``--events`` events spread
over three days; ``run`` starts from the beginning, so its producer catches up while
its webhook role delivers to a receiver process answering 204. VmHWM (peak RSS) and
VmRSS are read from /proc/<pid>/status at the first delivery (the baseline) and at
each quarter of the deliveries; memory must not grow with the count, so the figure
to watch is the growth between the second sample and the last.

    python bench/memory.py [--events 100000] [--source patchwork|queue] [--every N]
                           [--max-seconds 300]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common import (
    AMQP_URL,
    TZ,
    Hook,
    Receiver,
    backlog_events,
    bridge_env,
    declare,
    delete_topology,
    fill_backlog,
    preload,
    proc_status_kib,
    run_id,
    workdir,
    write_subscriptions,
)

from bridge.demo.patchwork_double import FakePatchwork

SEGMENT = "fast"
STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class Sample:
    deliveries: int
    elapsed_s: float
    hwm_kib: int
    rss_kib: int

    def line(self) -> str:
        return (
            f"  {self.deliveries:>9,} deliveries  {self.elapsed_s:6.1f} s   peak RSS (VmHWM) "
            f"{self.hwm_kib / 1024:7.1f} MiB   RSS now {self.rss_kib / 1024:7.1f} MiB"
        )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--max-seconds", type=float, default=300.0, help="give up after this")
    parser.add_argument(
        "--source",
        choices=["patchwork", "queue"],
        default="patchwork",
        help="patchwork: the producer catches up on the backlog while the webhook role "
        "delivers (the whole of run); queue: the backlog is pre-loaded into the "
        "subscription queue and the producer idles (the webhook role alone)",
    )
    parser.add_argument(
        "--every", type=int, default=0, help="also print a sample every N deliveries (a trace)"
    )
    args = parser.parse_args()

    rid = run_id()
    name, exchange = f"bench-{rid}", f"bench-memory-{rid}"
    fake = FakePatchwork(tz=TZ)
    if args.source == "patchwork":
        print(f"building a {args.events}-event backlog in the Patchwork double ...", flush=True)
        fill_backlog(fake, args.events)
    await fake.start()
    marks = [args.events * q // 4 for q in (1, 2, 3, 4)]
    samples: list[Sample] = []
    try:
        async with Receiver.start() as receiver:
            with workdir() as tmp:
                hook = Hook(name, receiver.url(SEGMENT))
                subscriptions = write_subscriptions(tmp / "subscriptions.toml", [hook])
                if args.source == "queue":
                    print(f"pre-loading {args.events} events into the queue ...", flush=True)
                    await declare(exchange, subscriptions)
                    await preload(exchange, backlog_events(args.events))
                env = bridge_env(
                    amqp_url=AMQP_URL,
                    exchange=exchange,
                    patchwork_url=fake.url,
                    patchwork_timezone=TZ,
                    start="beginning" if args.source == "patchwork" else "now",
                    state_dir=str(tmp / "state"),
                    poll_interval="1",
                    subscriptions=str(subscriptions),
                    http_host="127.0.0.1",
                    http_port="0",
                    log_level="WARNING",
                )
                log_path = tmp / "bridge.log"
                with log_path.open("wb") as log:
                    process = await asyncio.create_subprocess_exec(
                        sys.executable, "-m", "bridge", "run", env=env, stderr=log
                    )
                try:
                    await sample_until_done(args, receiver, process, marks, samples)
                except BaseException:
                    print(_tail(log_path), file=sys.stderr)
                    raise
                finally:
                    await _stop(process)
    finally:
        await delete_topology(exchange, [name])
        await fake.stop()
    report(args, samples)


async def sample_until_done(
    args: argparse.Namespace,
    receiver: Receiver,
    process: asyncio.subprocess.Process,
    marks: list[int],
    samples: list[Sample],
) -> None:
    """Sample at the first delivery and at each mark; stop early (saying so) at the time limit."""

    def alive() -> None:
        if process.returncode is not None:
            raise RuntimeError(f"python -m bridge run exited with {process.returncode}")

    started = time.monotonic()
    trace = range(args.every, marks[-1], args.every) if args.every > 0 else range(0)
    quarter_marks = set(marks)
    for mark in sorted({1, *marks, *trace}):
        remaining_s = args.max_seconds - (time.monotonic() - started)
        try:
            stats = await receiver.wait_for(SEGMENT, mark, remaining_s, check=alive, poll_s=0.1)
        except TimeoutError:
            stats = await receiver.stats(SEGMENT)
            elapsed_s = time.monotonic() - started
            print(
                f"  stopped at the {args.max_seconds:g} s limit: {stats.unique:,} of "
                f"{args.events:,} deliveries, {stats.rate():,.0f} deliveries/s",
                flush=True,
            )
            status = proc_status_kib(process.pid)
            samples.append(Sample(stats.unique, elapsed_s, status["VmHWM"], status["VmRSS"]))
            print(samples[-1].line(), flush=True)
            return
        status = proc_status_kib(process.pid)
        sample = Sample(stats.unique, time.monotonic() - started, status["VmHWM"], status["VmRSS"])
        if mark == 1 or mark in quarter_marks:
            samples.append(sample)
            print(sample.line(), flush=True)
        else:
            print(sample.line() + "   (trace)", flush=True)


def report(args: argparse.Namespace, samples: list[Sample]) -> None:
    quarters = samples[1:]  # samples[0] is the baseline at the first delivery
    if len(quarters) < 3:
        print("too few samples for a growth figure")
        return
    first, second, last = samples[0], quarters[1], quarters[-1]
    growth_kib = last.hwm_kib - second.hwm_kib
    rss_growth_kib = last.rss_kib - second.rss_kib
    span = last.deliveries - second.deliveries
    rate = (last.deliveries - first.deliveries) / max(last.elapsed_s - first.elapsed_s, 1e-9)
    source = "from the Patchwork double" if args.source == "patchwork" else "pre-loaded queue"
    print(
        f"\npeak RSS of python -m bridge run over {last.deliveries:,} deliveries, {source} "
        f"({rate:,.0f} deliveries/s)"
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


if __name__ == "__main__":
    asyncio.run(main())
