"""The circuit breaker and the rate limit of a subscription, against the real broker and
real receivers: what a receiver down for a "weekend" (scaled to seconds) gets, and what
waits for it meanwhile."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Callable

import aio_pika
import pytest
from aiohttp import web

from bridge.cli.subscriptions import run_subscriptions
from bridge.delivery.breaker import Breaker, BreakerSpec
from bridge.delivery.outcomes import Delivered, GiveUp, RetryLater
from bridge.metrics import Metrics
from bridge.settings import Settings
from bridge.sinks.registry import load_sink
from bridge.webhook.subscriptions import Subscription
from tests.amqp_helpers import (
    delete_subscription_queues,
    lane,
    make_consumer,
    publish_events,
    queue_depth,
    running,
    subscription,
    wait_for,
)
from tests.receiver import Receiver

EVENTS = list(range(100, 120))


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(f"patchwork_bridge_{name}", labels) or 0.0


# -- the state, as a table ----------------------------------------------------------------

DOWN = RetryLater("connect", "refused")


@pytest.mark.parametrize(
    ("outcomes", "opens_at"),
    [
        ([DOWN, DOWN, DOWN], 3),
        ([DOWN, DOWN, Delivered(200), DOWN, DOWN, DOWN], 6),  # a success starts over
        ([DOWN, DOWN, GiveUp("http_4xx"), DOWN, DOWN], None),  # it answered: not down
        ([DOWN, RetryLater("http_429"), DOWN, DOWN], None),  # busy, not down
        ([RetryLater("timeout"), RetryLater("http_5xx"), DOWN], 3),
    ],
)
def test_failures_in_a_row_that_say_the_receiver_is_down_open_it(outcomes, opens_at):
    breaker = Breaker(BreakerSpec(3, 1.0, 4.0))
    opened = [n for n, outcome in enumerate(outcomes, start=1) if breaker.saw(outcome)]
    assert opened == ([] if opens_at is None else [opens_at])


def test_probes_back_off_to_the_cap_and_a_half_open_close_reopens_at_once():
    breaker = Breaker(BreakerSpec(3, 1.0, 4.0))
    breaker.opened(now=100.0)
    assert not breaker.probe_due(100.5) and breaker.probe_due(101.0)
    intervals = []
    for _ in range(4):
        breaker.probe_failed(now=0.0)
        intervals.append(breaker.interval_s)
    assert intervals == [2.0, 4.0, 4.0, 4.0]
    breaker.closed(half_open=True)
    assert breaker.saw(DOWN)  # nothing was proven: the first failure opens it again


def test_zero_failures_means_no_breaker():
    breaker = Breaker(BreakerSpec(0, 1.0, 4.0))
    assert not any(breaker.saw(DOWN) for _ in range(100))


# -- against the broker ---------------------------------------------------------------------


@pytest.fixture
async def subs(
    amqp: aio_pika.abc.AbstractConnection, exchange_name: str, unique: str
) -> AsyncIterator[Callable[..., Subscription]]:
    made: list[Subscription] = []

    def make(label: str, url: str, **fields: object) -> Subscription:
        sub = subscription(f"{label}-{unique}", url=url, allow_private_network=True, **fields)
        made.append(sub)
        return sub

    yield make
    await delete_subscription_queues(amqp, exchange_name, made)


@pytest.mark.timeout(120)
async def test_a_receiver_down_for_a_weekend_gets_only_probes_and_loses_nothing(
    amqp: aio_pika.abc.AbstractConnection,
    exchange_name: str,
    subs: Callable[..., Subscription],
) -> None:
    up = False

    async def down_until_up(request: web.Request) -> web.Response:
        return web.Response(status=204 if up else 503, text="" if up else "down for the weekend")

    async with Receiver(down_until_up) as down, Receiver() as healthy:
        # Without the breaker, three attempts 0.2 s apart would dead-letter every event.
        weekend = subs(
            "weekend",
            down.url(),
            concurrency=1,
            retry_schedule=[0.2, 0.2],
            breaker_failures=3,
            breaker_probe=0.3,
            breaker_probe_max=1.0,
        )
        steady = subs("steady", healthy.url())
        metrics = Metrics()
        pairs = [(weekend, load_sink(weekend)), (steady, load_sink(steady))]
        consumer = make_consumer(exchange_name, pairs, metrics=metrics)  # type: ignore[arg-type]
        async with running(consumer):
            await publish_events(exchange_name, [("patch-created", i) for i in EVENTS])

            def is_open() -> bool:
                return sample(metrics, "webhook_breaker_open", subscription=weekend.name) == 1

            await wait_for(is_open, 20, "the breaker to open")
            before_outage = len(down.requests)
            assert before_outage == 3  # the failures in a row that opened it, no more

            # What an operator sees meanwhile.
            ready, note = consumer.readiness()
            assert ready and f"circuit breaker open for {weekend.name}" in note
            out = io.StringIO()
            await run_subscriptions(Settings(exchange=exchange_name), [weekend], "list", None, out)
            assert out.getvalue().split("\t")[1] == "enabled,breaker-open"

            await asyncio.sleep(5)  # the weekend

            def failed_probes() -> float:
                return sample(
                    metrics,
                    "webhook_breaker_probes_total",
                    subscription=weekend.name,
                    result="failed",
                )

            # Nothing but probes (a probe's answer is counted a moment after it arrived).
            await wait_for(
                lambda: len(down.requests) - before_outage == failed_probes(),
                5,
                "every request of the outage to be a counted probe",
            )
            assert failed_probes() >= 3  # probed at growing intervals, the whole weekend
            assert await queue_depth(amqp, lane(exchange_name, weekend.name).dead) == 0
            # The healthy subscription on the same role got everything meanwhile.
            assert healthy.delivered() == {str(i) for i in EVENTS}

            up = True  # Monday
            await wait_for(lambda: down.delivered() == {str(i) for i in EVENTS}, 30, "Monday")
            await wait_for(lambda: not is_open(), 10, "the breaker to close")
        ok = sample(metrics, "webhook_breaker_probes_total", subscription=weekend.name, result="ok")
        assert ok == 1
    assert all(n == 1 for n in down.successes.values())  # every event once
    assert await queue_depth(amqp, lane(exchange_name, weekend.name).dead) == 0
    assert await queue_depth(amqp, lane(exchange_name, weekend.name).breaker) is None


async def test_an_open_breaker_is_followed_by_a_second_process_and_survives_a_restart(
    amqp: aio_pika.abc.AbstractConnection,
    exchange_name: str,
    subs: Callable[..., Subscription],
) -> None:
    async with Receiver() as receiver:
        sub = subs("shared", receiver.url(), breaker_failures=3, breaker_probe=60.0)
        queues = lane(exchange_name, sub.name)
        # Another process opened it (or this one did before a restart): the marker says so.
        first = make_consumer(exchange_name, [(sub, load_sink(sub))])  # type: ignore[list-item]
        async with running(first):
            pass  # declares the queues
        channel = await amqp.channel()
        await channel.declare_queue(queues.breaker, durable=True)
        await channel.close()
        metrics = Metrics()
        second = make_consumer(exchange_name, [(sub, load_sink(sub))], metrics=metrics)  # type: ignore[list-item]
        async with running(second):
            await publish_events(exchange_name, [("patch-created", i) for i in EVENTS[:3]])
            await asyncio.sleep(1)  # five marker checks
            assert receiver.requests == []  # no probe before its time, no delivery
            assert sample(metrics, "webhook_breaker_open", subscription=sub.name) == 1
            # An operator (or a process whose probe succeeded) closes it: delivery resumes.
            channel = await amqp.channel()
            await channel.queue_delete(queues.breaker)
            await channel.close()
            await wait_for(lambda: len(receiver.delivered()) == 3, 20, "delivery after closing")
        assert sample(metrics, "webhook_breaker_open", subscription=sub.name) == 0


# -- the rate limit -------------------------------------------------------------------------


def busiest_second(times: list[float]) -> int:
    """The most requests that arrived within any one second."""
    times = sorted(times)
    most, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= 1.0:
            start += 1
        most = max(most, end - start + 1)
    return most


@pytest.mark.timeout(120)
@pytest.mark.parametrize("processes", [1, 2])
async def test_a_burst_never_reaches_the_receiver_faster_than_its_rate(
    exchange_name: str, subs: Callable[..., Subscription], processes: int
) -> None:
    """Load can only slow a delivery: that it is never faster than ``rate`` holds on any
    machine. (The rate reached, within 10 %, is bench/rate.py's to measure.)"""
    arrivals: list[float] = []
    loop = asyncio.get_running_loop()

    async def record(request: web.Request) -> web.Response:
        arrivals.append(loop.time())
        return web.Response(status=204)

    async with Receiver(record) as receiver:
        sub = subs("paced", receiver.url(), rate=20.0, concurrency=8)
        consumers = [
            make_consumer(exchange_name, [(sub, load_sink(sub))])  # type: ignore[list-item]
            for _ in range(processes)
        ]
        async with running(consumers[0]):
            if processes == 2:
                async with running(consumers[1]):
                    await asyncio.sleep(1)  # each has seen the other on the queue
                    await publish_events(exchange_name, [("patch-created", i) for i in range(80)])
                    await wait_for(lambda: len(receiver.delivered()) == 80, 60, "all 80")
            else:
                await publish_events(exchange_name, [("patch-created", i) for i in range(80)])
                await wait_for(lambda: len(receiver.delivered()) == 80, 60, "all 80")
    # Spaced at least 1/20 s apart when sent; the receiver, in this busy process, may read
    # a few together. Without the limit (or with each process taking the whole rate) the
    # 80 would come in about 2 s or less.
    assert arrivals[-1] - arrivals[0] >= 79 / 20 - 0.5
    assert busiest_second(arrivals) <= 30
