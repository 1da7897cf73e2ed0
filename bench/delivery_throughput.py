"""Webhook delivery rate of ``run`` against the floor: a plain consume + POST + ack loop.

Both drain the same subscription queue, pre-loaded with the same backlog (published
with the producer's properties and headers), into the same receiver process that
answers 204, with prefetch = in-flight POSTs = the subscription's concurrency. The
rate is taken at the receiver, from the first delivery to the last, so connecting
and declaring do not count. The plain loop does nothing else: no signature, no
outcome mapping, no metrics. A second plain loop sends the headers docs/webhooks.md requires
(Standard Webhooks signature, ce-*, User-Agent), to tell what the contract costs from
what the consumer costs. Then, separately, the whole path: the backlog served by the
Patchwork double, polled, published and delivered by ``run`` from its start.

    python bench/delivery_throughput.py [--events 20000] [--concurrency 16] [--rounds 2]
                                        [--only run|plain|plain-signed] [--py-spy PREFIX]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import aiohttp
from aio_pika.abc import AbstractIncomingMessage
from bus import declare, delete_topology, forget_log, preload, queue_depth
from common import (
    AMQP_URL,
    SECRET,
    TZ,
    Hook,
    InProcessBridge,
    backlog_events,
    bridge_settings,
    fill_backlog,
    run_id,
    workdir,
    write_subscriptions,
)
from figures import best_line, round_ratios
from receiver import Receiver
from spy import py_spy, py_spy_summary

from bridge.delivery.queues import subscription_queues
from bridge.demo.patchwork_double import FakePatchwork
from bridge.events import USER_AGENT, Event
from bridge.signing import decode_secret, sign_with_key

SEGMENT = "fast"
DRAIN_TIMEOUT_S = 300.0
SECRET_KEY = decode_secret(SECRET)
VARIANTS = {
    "run": "patchwork-bridge run (in-process roles)",
    "plain": "plain aio-pika consume + aiohttp POST + ack",
    "plain-signed": "plain loop sending the contract's headers",
}
"""The drains of each round, in the first round's order (the next round reverses it)."""


@dataclass(frozen=True, slots=True)
class Measure:
    rate: float
    """Deliveries/s at the receiver."""
    cpu_ms: float
    """CPU time of this process per delivery (the consumer's cost; the receiver and the
    broker run in other processes). Less noisy than the rate on a shared machine."""


def bare_headers(message: AbstractIncomingMessage) -> dict[str, str]:
    return {"Content-Type": "application/json", "webhook-id": message.message_id or ""}


def contract_headers(message: AbstractIncomingMessage) -> dict[str, str]:
    """What docs/webhooks.md makes every POST carry: Standard Webhooks (signed) and ce-* headers."""
    timestamp_s = int(time.time())
    message_id = message.message_id or ""
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp_s),
        "webhook-signature": sign_with_key(SECRET_KEY, message_id, timestamp_s, message.body),
    }
    for name, value in (message.headers or {}).items():
        if name.startswith("ce-"):
            headers[name] = str(value)
    return headers


async def plain_loop(
    queue_name: str,
    url: str,
    prefetch: int,
    receiver: Receiver,
    n: int,
    headers_of: Callable[[AbstractIncomingMessage], dict[str, str]],
) -> Measure:
    """The floor: aio-pika consume, one aiohttp POST per message, ack on 2xx."""
    cpu_started = time.process_time()
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.get_queue(queue_name)
        connector = aiohttp.TCPConnector(limit=prefetch)
        timeout = aiohttp.ClientTimeout(total=15.0)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            async def handle(message: AbstractIncomingMessage) -> None:
                # aiormq runs each delivery in its own task: prefetch bounds concurrency.
                headers = headers_of(message)
                async with session.post(url, data=message.body, headers=headers) as response:
                    await response.read()
                if 200 <= response.status < 300:
                    await message.ack()
                else:
                    await message.nack(requeue=True)

            tag = await queue.consume(handle)
            stats = await receiver.wait_for(SEGMENT, n, DRAIN_TIMEOUT_S)
            cpu_s = time.process_time() - cpu_started
            await queue.cancel(tag)
    finally:
        await connection.close()
    return Measure(stats.rate(), 1000 * cpu_s / n)


async def bridge_run(settings_kw: dict[str, object], receiver: Receiver, n: int) -> Measure:
    """``run`` (producer idle on an empty Patchwork, webhook role draining the queue)."""
    bridge = InProcessBridge(bridge_settings(**settings_kw))
    cpu_started = time.process_time()
    bridge.start()
    try:
        stats = await receiver.wait_for(SEGMENT, n, DRAIN_TIMEOUT_S, check=bridge.check)
        cpu_s = time.process_time() - cpu_started
    finally:
        await bridge.close()
    return Measure(stats.rate(), 1000 * cpu_s / n)


async def end_to_end(settings_kw: dict[str, object], receiver: Receiver, n: int) -> float:
    """Deliveries/s of ``run`` from its start, empty cursor, to the last event delivered."""
    bridge = InProcessBridge(bridge_settings(**settings_kw))
    started = time.monotonic()
    bridge.start()
    try:
        stats = await receiver.wait_for(SEGMENT, n, DRAIN_TIMEOUT_S, check=bridge.check)
    finally:
        await bridge.close()
    assert stats.last_new_s is not None
    return n / (stats.last_new_s - started)


@dataclass
class Bench:
    """What every round shares: one subscription queue, one receiver, one backlog."""

    args: argparse.Namespace
    receiver: Receiver
    exchange: str
    name: str
    subscriptions: Path
    tmp: Path
    events: list[Event]
    idle_url: str
    """A Patchwork double without events: the producer of `run` polls it and finds nothing."""
    full_url: str
    """A Patchwork double serving the whole backlog, for the end-to-end run."""
    profiles: list[Path]
    """py-spy outputs written so far."""

    async def one_round(self, round_no: int, results: dict[str, list[Measure]]) -> float | None:
        """Every drain, the order reversed each round, then one end-to-end run."""
        order = list(VARIANTS) if round_no % 2 == 0 else list(reversed(VARIANTS))
        if self.args.only:
            order = [self.args.only]
        n = self.args.events
        queue = subscription_queues(self.exchange, self.name).main
        for which in order:
            await self.receiver.reset()
            await preload(self.exchange, self.events)
            spy = self.args.py_spy
            spy_path = Path(f"{spy}-{which}-{round_no + 1}.txt") if spy else None
            async with py_spy(spy_path):
                if which != "run":
                    url = self.receiver.url(SEGMENT)
                    headers_of = bare_headers if which == "plain" else contract_headers
                    measure = await plain_loop(
                        queue, url, self.args.concurrency, self.receiver, n, headers_of
                    )
                else:
                    settings_kw = self.settings(self.idle_url, f"state-{round_no}", start="now")
                    measure = await bridge_run(settings_kw, self.receiver, n)
            if spy_path is not None:
                self.profiles.append(spy_path)
            results[which].append(measure)
            print(
                f"  round {round_no + 1} {VARIANTS[which]:44s} {measure.rate:8,.0f} deliveries/s"
                f"  {measure.cpu_ms:.3f} ms CPU/delivery",
                flush=True,
            )
            await _expect_empty(queue)
        if self.args.only:
            return None
        await self.receiver.reset()
        await forget_log(self.exchange)  # the backlog was preloaded: it is all in the log
        settings_kw = self.settings(
            self.full_url, f"state-e2e-{round_no}", start="beginning", poll_interval=0.5
        )
        rate = await end_to_end(settings_kw, self.receiver, n)
        label = "run end to end, Patchwork double to receiver"
        print(f"  round {round_no + 1} {label:44s} {rate:8,.0f} deliveries/s", flush=True)
        await _expect_empty(queue)
        return rate

    def settings(self, patchwork_url: str, state: str, **more: object) -> dict[str, object]:
        return {
            "exchange": self.exchange,
            "patchwork_url": patchwork_url,
            "subscriptions": self.subscriptions,
            "state_dir": self.tmp / state,
            "poll_interval": 1.0,
            **more,
        }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=16, help="also the plain prefetch")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--py-spy",
        metavar="PREFIX",
        help="sample each drain with py-spy into PREFIX-<run|plain>-<round>.txt and summarise",
    )
    parser.add_argument(
        "--only",
        choices=list(VARIANTS),
        help="drain with this one only, no end-to-end run (to profile it with py-spy)",
    )
    args = parser.parse_args()

    rid = run_id()
    name, exchange = f"bench-{rid}", f"bench-delivery-{rid}"
    print(f"building a {args.events}-event backlog ...", flush=True)
    events = backlog_events(args.events)
    idle, full = FakePatchwork(tz=TZ), FakePatchwork(tz=TZ)
    fill_backlog(full, args.events)
    # The fixtures live as long as the run: keep the collector from walking them over and
    # over, which would charge whichever side allocates more for the benchmark's own data.
    gc.freeze()
    results: dict[str, list[Measure]] = {which: [] for which in VARIANTS}
    e2e: list[float] = []
    profiles: list[Path] = []
    try:
        async with Receiver.start() as receiver:
            with workdir() as tmp:
                hook = Hook(name, receiver.url(SEGMENT), concurrency=args.concurrency)
                subscriptions = write_subscriptions(tmp / "subscriptions.toml", [hook])
                await declare(exchange, subscriptions)
                bench = Bench(
                    args,
                    receiver,
                    exchange,
                    name,
                    subscriptions,
                    tmp,
                    events,
                    await idle.start(),
                    await full.start(),
                    profiles,
                )
                for round_no in range(args.rounds):
                    rate = await bench.one_round(round_no, results)
                    if rate is not None:
                        e2e.append(rate)
    finally:
        await delete_topology(exchange, [name])
        await idle.stop()
        await full.stop()
    report(args, results, e2e)
    for path in profiles:
        print("\n" + py_spy_summary(path, args.events, top=70))


def report(args: argparse.Namespace, results: dict[str, list[Measure]], e2e: list[float]) -> None:
    if args.only:
        return  # the round lines say it all
    best = {which: max(m.rate for m in measures) for which, measures in results.items()}
    print(
        f"\ndelivery of a pre-loaded {args.events}-event backlog to a 204 receiver, "
        f"concurrency = prefetch = {args.concurrency}, {args.rounds} rounds, best of each"
    )
    for which, label in VARIANTS.items():
        print(best_line(label, [m.rate for m in results[which]]))
    rates = {which: [m.rate for m in measures] for which, measures in results.items()}
    print(
        f"  ratio run / plain loop: {best['run'] / best['plain']:.2f} best-of   (goal >= 0.80);"
        f" {round_ratios(rates['run'], rates['plain'])}"
    )
    print(
        f"  ratio run / plain loop sending the contract's headers: "
        f"{best['run'] / best['plain-signed']:.2f} best-of;"
        f" {round_ratios(rates['run'], rates['plain-signed'])}"
    )
    cpu = ", ".join(f"{which} {min(m.cpu_ms for m in results[which]):.3f} ms" for which in VARIANTS)
    print(f"  CPU of the consuming process per delivery, best: {cpu}")
    print(f"\nend to end: {args.events} events from the Patchwork double to the receiver")
    print(best_line("patchwork-bridge run, start to last delivery", e2e))
    print(f"  ratio end-to-end / plain loop: {max(e2e) / best['plain']:.2f}")


async def _expect_empty(queue: str) -> None:
    left = await queue_depth(queue)
    if left:
        raise RuntimeError(f"{queue} still holds {left} messages after a run")


if __name__ == "__main__":
    asyncio.run(main())
