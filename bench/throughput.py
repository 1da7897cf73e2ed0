"""Throughput of the bridge against the plain script doing the same job, one case at a time.

    publish   the producer catching up on a backlog (empty cursor), until every event is
              confirmed; against GET page + publish with confirms.
    deliver   ``run`` draining a pre-loaded subscription queue into a 204 receiver; against
              consume + POST + ack on the same queue, same prefetch (= concurrency).
    whole     ``run`` from a first start, Patchwork double to receiver; against one script
              doing pages, publish with confirms, consume, POST, ack.
    fanout    the webhook role over many subscriptions bound ``#``, each pre-loaded; against
              one plain consume + POST + ack loop per queue, one connection.

Every case also runs the plain script sending what the contract requires (docs/bus.md's
properties and headers when publishing; the signature, ce-* and User-Agent when
delivering), to tell the contract's cost from the bridge's (``plain-contract``; not in
``fanout``). Rates are taken at the receiver, first delivery to last (``publish``: start to
last confirm); CPU is this process's per event (the receiver is a process of its own).
Rounds alternate which side goes first.

    python bench/throughput.py CASE [--events N] [--rounds R] [--concurrency 16]
                               [--loop asyncio|uvloop] [--only SIDE] [--py-spy PREFIX]
    python bench/throughput.py whole [--cost measured|none]
    python bench/throughput.py fanout [--subscriptions 20]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aio_pika
from bus import declare, delete_topology, forget_log, preload, queue_depth
from common import (
    AMQP_URL,
    TZ,
    Hook,
    InProcessBridge,
    add_cost_option,
    add_loop_option,
    backlog_events,
    bridge_settings,
    fill_backlog,
    run_id,
    run_on,
    serving_cost,
    workdir,
    write_subscriptions,
)
from figures import best_line, round_ratios
from plain import bare_headers, contract_headers, drain, http_session, post_each, publish_pages
from receiver import Receiver
from spy import py_spy, py_spy_summary

from bridge.delivery.queues import subscription_queues
from bridge.demo.patchwork_double import FakePatchwork
from bridge.events import Event
from bridge.metrics import Metrics
from bridge.producer.role import Producer
from bridge.runtime import InProcess
from bridge.settings import Settings
from tests.patchwork_cost import CostedPatchwork

TIMEOUT_S = 600.0
SEGMENT = "fast"


@dataclass(frozen=True, slots=True)
class Measure:
    rate: float
    """Events (or deliveries) per second."""
    cpu_ms: float
    """CPU time of this process per event: less noisy than the rate on a shared machine."""
    first_s: float | None = None
    """``whole``: start to the first delivery (connecting, declaring, a first start)."""
    job_rate: float | None = None
    """``whole``: events/s from the start to the last delivery."""


Side = Callable[[int], Awaitable[Measure]]
"""One side of a comparison: round number -> its measure."""


@dataclass
class Case:
    sides: dict[str, tuple[str, Side]]
    """name -> (label, run); the first is ours, the second the plain script of the goal."""
    unit: str
    title: str


# -- the cases ---------------------------------------------------------------------------


@asynccontextmanager
async def publish_case(args: argparse.Namespace) -> AsyncIterator[Case]:
    fake = FakePatchwork(tz=TZ)
    fill_backlog(fake, args.events)
    base_url = await fake.start()
    exchange_name = f"bench-publish-{run_id()}"
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(f"{exchange_name}-all", durable=True)
        await queue.bind(exchange, "#")

        async def producer(_: int) -> Measure:
            await queue.purge()
            await forget_log(exchange_name)  # else it resumes after the last round's events
            return await producer_catch_up(base_url, exchange_name, args.events)

        def plain(contract: bool) -> Side:
            async def side(_: int) -> Measure:
                await queue.purge()
                return await plain_publish(base_url, exchange_name, args.events, contract)

            return side

        yield Case(
            {
                "producer": ("patchwork-bridge producer", producer),
                "plain": ("plain script: pages, publish with confirms", plain(False)),
                "plain-contract": ("plain script with the contract's headers", plain(True)),
            },
            "events/s",
            f"catch-up of a {args.events}-event backlog, until confirmed",
        )
    finally:
        await queue.delete(if_unused=False, if_empty=False)
        await exchange.delete()
        await connection.close()
        await forget_log(exchange_name)
        await fake.stop()


async def producer_catch_up(base_url: str, exchange: str, n: int) -> Measure:
    metrics = Metrics()
    with workdir() as state_dir:
        settings = Settings(
            amqp_url=AMQP_URL,
            exchange=exchange,
            patchwork_url=base_url,
            patchwork_timezone=TZ,
            state_dir=state_dir,
            start="beginning",
            poll_interval=0.05,
        )
        started, cpu_started = time.perf_counter(), time.process_time()
        async with InProcess([Producer(settings, metrics)]) as bridge:
            while published(metrics) < n:
                bridge.check()
                await asyncio.sleep(0.005)
            elapsed, cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    return Measure(n / elapsed, 1000 * cpu_s / n)


def published(metrics: Metrics) -> float:
    samples = metrics.events_published.collect()[0].samples
    return sum(s.value for s in samples if s.name.endswith("_total"))


async def plain_publish(base_url: str, exchange_name: str, n: int, contract: bool) -> Measure:
    started, cpu_started = time.perf_counter(), time.process_time()
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(exchange_name)
        async with http_session(4) as http:
            count = await publish_pages(http, base_url, exchange, contract)
        elapsed, cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    finally:
        await connection.close()
    if count != n:
        raise RuntimeError(f"the plain script published {count} events, not {n}")
    return Measure(n / elapsed, 1000 * cpu_s / n)


@asynccontextmanager
async def deliver_case(args: argparse.Namespace) -> AsyncIterator[Case]:
    rid = run_id()
    name, exchange = f"bench-{rid}", f"bench-delivery-{rid}"
    events = backlog_events(args.events)
    idle = FakePatchwork(tz=TZ)  # `run`'s producer polls it and finds nothing
    queue = subscription_queues(exchange, name).main
    async with AsyncExitStack() as stack:
        stack.push_async_callback(idle.stop)
        stack.push_async_callback(delete_topology, exchange, [name])
        receiver = await stack.enter_async_context(Receiver.start())
        tmp = stack.enter_context(workdir())
        hook = Hook(name, receiver.url(SEGMENT), concurrency=args.concurrency)
        subscriptions = write_subscriptions(tmp / "subscriptions.toml", [hook])
        await declare(exchange, subscriptions)
        idle_url = await idle.start()

        def drained(run: Callable[[], Awaitable[Measure]]) -> Side:
            return preloaded(receiver, exchange, events, [queue], run)

        async def bridge() -> Measure:
            settings = bridge_settings(
                exchange=exchange,
                patchwork_url=idle_url,
                subscriptions=subscriptions,
                state_dir=tmp / f"state-{run_id()}",
                start="now",
                poll_interval=1.0,
            )
            measure, _ = await run_bridge(settings, "run", receiver, [SEGMENT], args.events)
            return measure

        def plain(headers_of: Callable) -> Callable[[], Awaitable[Measure]]:
            async def run() -> Measure:
                d = await drain(queue, receiver, SEGMENT, args.events, args.concurrency, headers_of)
                return Measure(d.rate, d.cpu_ms)

            return run

        yield Case(
            {
                "run": ("patchwork-bridge run (in-process roles)", drained(bridge)),
                "plain": ("plain consume + POST + ack", drained(plain(bare_headers))),
                "plain-contract": (
                    "plain loop sending the contract's headers",
                    drained(plain(contract_headers)),
                ),
            },
            "deliveries/s",
            f"delivery of a pre-loaded {args.events}-event backlog to a 204 receiver, "
            f"concurrency = prefetch = {args.concurrency}",
        )


@asynccontextmanager
async def whole_case(args: argparse.Namespace) -> AsyncIterator[Case]:
    fake = CostedPatchwork(tz=TZ, cost=serving_cost(args))
    fill_backlog(fake, args.events)
    n = args.events
    async with AsyncExitStack() as stack:
        stack.push_async_callback(fake.stop)
        base_url = await fake.start()
        receiver = await stack.enter_async_context(Receiver.start())
        tmp = stack.enter_context(workdir())

        async def bridge(_: int) -> Measure:
            await receiver.reset()
            rid = run_id()
            exchange = name = f"bench-path-{rid}"
            hook = Hook(name, receiver.url(SEGMENT), concurrency=args.concurrency)
            settings = bridge_settings(
                exchange=exchange,
                patchwork_url=base_url,
                subscriptions=write_subscriptions(tmp / f"subscriptions-{rid}.toml", [hook]),
                state_dir=tmp / f"state-{rid}",
                start="beginning",
                poll_interval=1.0,
            )
            try:
                measure, started = await run_bridge(settings, "run", receiver, [SEGMENT], n)
            finally:
                await delete_topology(exchange, [name])
            return await with_job_figures(measure, started, receiver, n)

        def plain(contract: bool) -> Side:
            async def side(_: int) -> Measure:
                await receiver.reset()
                measure, started = await plain_whole(args, base_url, receiver, contract)
                return await with_job_figures(measure, started, receiver, n)

            return side

        yield Case(
            {
                "run": ("patchwork-bridge run (producer + webhook)", bridge),
                "plain": ("plain script: pages, publish, POST, ack", plain(False)),
                "plain-contract": ("plain script with the contract's headers", plain(True)),
            },
            "deliveries/s",
            f"{n} events, Patchwork double -> exchange -> queue -> 204 receiver, concurrency "
            f"{args.concurrency}, serving cost {args.cost}",
        )


async def plain_whole(
    args: argparse.Namespace, base_url: str, receiver: Receiver, contract: bool
) -> tuple[Measure, float]:
    """Pages, publish with confirms, consume, POST, ack, in one process, one connection:
    its measure and when it started."""
    exchange_name = queue_name = f"bench-path-plain-{run_id()}"
    headers_of = contract_headers if contract else bare_headers
    started, cpu_started = time.monotonic(), time.process_time()
    connection = await aio_pika.connect(AMQP_URL)
    try:
        publishing = await connection.channel(publisher_confirms=True)
        exchange = await publishing.declare_exchange(
            exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
        )
        consuming = await connection.channel()
        await consuming.set_qos(prefetch_count=args.concurrency)
        queue = await consuming.declare_queue(queue_name, durable=True)
        try:
            await queue.bind(exchange, "#")
            async with http_session(args.concurrency) as http:
                tag = await post_each(queue, http, receiver.url(SEGMENT), headers_of)
                await publish_pages(http, base_url, exchange, contract)
                await receiver.wait_for(SEGMENT, args.events, TIMEOUT_S)
                cpu_s = time.process_time() - cpu_started
                await queue.cancel(tag)
        finally:
            await consuming.queue_delete(queue_name)
            await consuming.exchange_delete(exchange_name)
    finally:
        await connection.close()
    stats = await receiver.stats(SEGMENT)
    return Measure(stats.rate(), 1000 * cpu_s / args.events), started


async def with_job_figures(measure: Measure, started: float, receiver: Receiver, n: int) -> Measure:
    """``measure`` with the time from ``started`` to the first delivery and the whole job's
    rate."""
    stats = await receiver.stats(SEGMENT)
    assert stats.first_s is not None and stats.last_new_s is not None
    return Measure(
        measure.rate, measure.cpu_ms, stats.first_s - started, n / (stats.last_new_s - started)
    )


@asynccontextmanager
async def fanout_case(args: argparse.Namespace) -> AsyncIterator[Case]:
    rid = run_id()
    exchange = f"bench-fanout-{rid}"
    names = [f"bench-fan{i}-{rid}" for i in range(args.subscriptions)]
    segments = [f"fan{i}" for i in range(args.subscriptions)]
    queues = [subscription_queues(exchange, name).main for name in names]
    events = backlog_events(args.events)
    async with AsyncExitStack() as stack:
        stack.push_async_callback(delete_topology, exchange, names)
        receiver = await stack.enter_async_context(Receiver.start())
        tmp = stack.enter_context(workdir())
        urls = [receiver.url(segment) for segment in segments]
        hooks = [
            Hook(name, url, concurrency=args.concurrency)
            for name, url in zip(names, urls, strict=True)
        ]
        subscriptions = write_subscriptions(tmp / "subscriptions.toml", hooks)
        await declare(exchange, subscriptions)

        def drained(run: Callable[[], Awaitable[Measure]]) -> Side:
            return preloaded(receiver, exchange, events, queues, run)

        async def webhook() -> Measure:
            # The webhook role alone. Not `run`: its producer, started without a cursor,
            # would read back every event the rounds before published into the event log
            # while the webhook role drains, costing more CPU each round.
            settings = bridge_settings(exchange=exchange, subscriptions=subscriptions)
            measure, _ = await run_bridge(settings, "webhook", receiver, segments, args.events)
            return measure

        async def plain() -> Measure:
            cpu_started = time.process_time()
            connection = await aio_pika.connect(AMQP_URL)
            try:
                async with AsyncExitStack() as sessions:
                    for queue_name, url in zip(queues, urls, strict=True):
                        channel = await connection.channel()
                        await channel.set_qos(prefetch_count=args.concurrency)
                        queue = await channel.get_queue(queue_name)
                        http = await sessions.enter_async_context(http_session(args.concurrency))
                        await post_each(queue, http, url, bare_headers)
                    rate = await delivery_rate(receiver, segments, args.events)
                    cpu_s = time.process_time() - cpu_started
            finally:
                await connection.close()
            return Measure(rate, 1000 * cpu_s / (args.events * len(segments)))

        yield Case(
            {
                "webhook": ("webhook role", drained(webhook)),
                "plain": (f"{len(names)} plain consume + POST + ack loops", drained(plain)),
            },
            "deliveries/s",
            f"{len(names)} subscriptions bound '#', {args.events} events each "
            f"({args.events * len(names):,} deliveries), concurrency = prefetch = "
            f"{args.concurrency}",
        )


# -- what the cases share ----------------------------------------------------------------


async def run_bridge(
    settings: Settings, command: str, receiver: Receiver, segments: list[str], n: int
) -> tuple[Measure, float]:
    """The roles of ``command`` in this process until every segment has ``n`` deliveries:
    their measure and when they started."""
    bridge = InProcessBridge(settings, command=command)
    started, cpu_started = time.monotonic(), time.process_time()
    bridge.start()
    try:
        rate = await delivery_rate(receiver, segments, n, check=bridge.check)
        cpu_s = time.process_time() - cpu_started
    finally:
        await bridge.close()
    return Measure(rate, 1000 * cpu_s / (n * len(segments))), started


def preloaded(
    receiver: Receiver,
    exchange: str,
    events: list[Event],
    queues: list[str],
    run: Callable[[], Awaitable[Measure]],
) -> Side:
    """A side that drains ``events``, pre-loaded through ``exchange``, from ``queues``: each
    round starts from a reset receiver and must leave the queues empty."""

    async def side(_: int) -> Measure:
        await receiver.reset()
        await preload(exchange, events)
        measure = await run()
        await expect_empty(queues)
        return measure

    return side


async def delivery_rate(
    receiver: Receiver, segments: list[str], n: int, check: Callable[[], None] | None = None
) -> float:
    """Deliveries/s over all ``segments``, once each has ``n``: first arrival to last."""
    deadline = time.monotonic() + TIMEOUT_S
    for segment in segments:
        await receiver.wait_for(segment, n, max(1.0, deadline - time.monotonic()), check=check)
    lanes = [await receiver.stats(segment) for segment in segments]
    first = min(lane.first_s for lane in lanes if lane.first_s is not None)
    last = max(lane.last_new_s for lane in lanes if lane.last_new_s is not None)
    return (n * len(segments) - 1) / max(last - first, 1e-9)


async def expect_empty(queues: list[str]) -> None:
    for queue in queues:
        if left := await queue_depth(queue):
            raise RuntimeError(f"{queue} still holds {left} messages after a run")


async def compare(args: argparse.Namespace, case: Case) -> dict[str, list[Measure]]:
    names = [args.only] if args.only else list(case.sides)
    results: dict[str, list[Measure]] = {name: [] for name in names}
    width = max(len(label) for label, _ in case.sides.values())
    for round_no in range(args.rounds):
        # Reversed every other round, so no side always runs first on a cold machine.
        for name in names if round_no % 2 == 0 else reversed(names):
            label, side = case.sides[name]
            spy = Path(f"{args.py_spy}-{name}-{round_no + 1}.txt") if args.py_spy else None
            async with py_spy(spy):
                measure = await side(round_no)
            results[name].append(measure)
            first = "" if measure.first_s is None else f"  first after {measure.first_s:5.2f} s"
            job = "" if measure.job_rate is None else f"  whole job {measure.job_rate:6,.0f}/s"
            print(
                f"  round {round_no + 1} {label:{width}s} {measure.rate:8,.0f} {case.unit}"
                f"{first}{job}  {measure.cpu_ms:.3f} ms CPU each",
                flush=True,
            )
            if spy is not None:
                print("\n" + py_spy_summary(spy, args.events * args.fan, top=60))
    return results


def report(args: argparse.Namespace, case: Case, results: dict[str, list[Measure]]) -> None:
    print(f"\n{case.title}; {args.rounds} rounds, event loop {args.loop}")
    for name, measures in results.items():
        print(best_line(case.sides[name][0], [m.rate for m in measures], case.unit))
    ours, goal_baseline, *_ = case.sides
    if ours not in results:
        return
    for baseline in results:
        if baseline == ours:
            continue
        rates_ours = [m.rate for m in results[ours]]
        rates_base = [m.rate for m in results[baseline]]
        goal = "   (goal >= 0.80)" if baseline == goal_baseline else ""
        print(
            f"  ratio {ours} / {baseline}: {max(rates_ours) / max(rates_base):.2f} best-of"
            f"{goal}; {round_ratios(rates_ours, rates_base)}"
        )
        jobs_ours = [m.job_rate for m in results[ours] if m.job_rate is not None]
        jobs_base = [m.job_rate for m in results[baseline] if m.job_rate is not None]
        if jobs_ours and jobs_base:
            print(
                f"  whole job (start to last delivery), {ours} / {baseline}: "
                f"{max(jobs_ours) / max(jobs_base):.2f} best-of; "
                f"{round_ratios(jobs_ours, jobs_base)}"
            )
    cpu = ", ".join(f"{name} {min(m.cpu_ms for m in ms):.3f} ms" for name, ms in results.items())
    print(f"  CPU of this process per event, best: {cpu}")
    firsts = {
        name: [m.first_s for m in ms if m.first_s is not None] for name, ms in results.items()
    }
    if all(firsts.values()):
        first = ", ".join(f"{name} {min(values):.2f} s" for name, values in firsts.items())
        print(f"  start to first delivery, best: {first}")


CASES = {
    "publish": (publish_case, 20_000, 2),
    "deliver": (deliver_case, 20_000, 2),
    "whole": (whole_case, 4_000, 3),
    "fanout": (fanout_case, 2_000, 3),
}
"""case -> (its setup, default --events, default --rounds)."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cases = parser.add_subparsers(dest="case", required=True)
    for name, (_, events, rounds) in CASES.items():
        case = cases.add_parser(name)
        case.add_argument("--events", type=int, default=events)
        case.add_argument("--rounds", type=int, default=rounds)
        case.add_argument("--concurrency", type=int, default=16, help="also the plain prefetch")
        case.add_argument("--only", help="run this side alone (to profile it)")
        case.add_argument(
            "--py-spy",
            metavar="PREFIX",
            help="sample each side with py-spy into PREFIX-<side>-<round>.txt and summarise "
            "(pip install py-spy)",
        )
        add_loop_option(case)
        if name == "whole":
            add_cost_option(case)
        if name == "fanout":
            case.add_argument("--subscriptions", type=int, default=20)
    args = parser.parse_args()
    args.fan = getattr(args, "subscriptions", 1)
    return args


async def main(args: argparse.Namespace) -> None:
    setup = CASES[args.case][0]
    async with setup(args) as case:
        if args.only and args.only not in case.sides:
            raise SystemExit(f"--only: one of {', '.join(case.sides)}")
        # The fixtures live as long as the run: keep the collector from walking them over
        # and over, which would charge whichever side allocates more.
        gc.freeze()
        results = await compare(args, case)
    report(args, case, results)


if __name__ == "__main__":
    arguments = parse_args()
    run_on(arguments.loop, lambda: main(arguments))
