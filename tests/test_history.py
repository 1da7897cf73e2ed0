"""The attempt history against the real broker: what ``patchwork-bridge deliveries`` shows of
an event that failed twice then got through, and of one that was dead-lettered."""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import aio_pika
import pytest
from aiohttp import web

from bridge.cli.common import CliError
from bridge.cli.deliveries import parse_since, show
from bridge.delivery.history import Attempt, history_arguments, history_queue, records_json
from bridge.metrics import Metrics
from bridge.settings import Settings
from bridge.sinks.registry import load_sink
from bridge.webhook.subscriptions import Subscription
from tests.amqp_helpers import (
    delete_subscription_queues,
    make_consumer,
    publish_events,
    running,
    subscription,
    wait_for,
)
from tests.receiver import Receiver


@pytest.fixture
async def flaky_sub(
    amqp: aio_pika.abc.AbstractConnection, exchange_name: str, unique: str
) -> AsyncIterator[tuple[Receiver, Subscription]]:
    answers: Counter[str] = Counter()

    async def answer(request: web.Request) -> web.Response:
        event = request.headers["webhook-id"]
        answers[event] += 1
        if event == "41" and answers[event] <= 2:
            return web.Response(status=503, text="busy building")
        if event == "42":
            return web.Response(status=500, text="no such tree")
        return web.Response(status=204)

    async with Receiver(answer) as receiver:
        sub = subscription(
            f"hist-{unique}",
            url=receiver.url(),
            allow_private_network=True,
            retry_schedule=[0.2, 0.2],
            concurrency=1,
        )
        yield receiver, sub
        await delete_subscription_queues(amqp, exchange_name, [sub])


async def attempts(settings: Settings, name: str, **filters: object) -> list[list[str]]:
    out = io.StringIO()
    await show(settings, name, out, **filters)  # type: ignore[arg-type]
    return [line.split("\t") for line in out.getvalue().splitlines()]


async def test_deliveries_shows_every_attempt_with_the_answer_and_what_became_of_it(
    exchange_name: str, flaky_sub: tuple[Receiver, Subscription]
) -> None:
    receiver, sub = flaky_sub
    settings = Settings(exchange=exchange_name)
    metrics = Metrics()
    consumer = make_consumer(exchange_name, [(sub, load_sink(sub))], metrics=metrics)  # type: ignore[list-item]
    async with running(consumer):
        await publish_events(exchange_name, [("patch-created", 41), ("patch-created", 42)])
        await wait_for(lambda: len(receiver.requests) == 6, 30, "3 attempts of each")

    async def written() -> bool:
        return len(await attempts(settings, sub.name)) == 6

    await wait_for(written, 20, "the six records")

    shape = [(a[1], a[2], a[3], a[4], a[5]) for a in await attempts(settings, sub.name, event="41")]
    assert shape == [
        ("41", "attempt 1", "retried", "503", "http_5xx"),
        ("41", "attempt 2", "retried", "503", "http_5xx"),
        ("41", "attempt 3", "delivered", "204", "-"),
    ]
    dead = await attempts(settings, sub.name, event="42")
    assert [(a[2], a[3], a[4]) for a in dead] == [
        ("attempt 1", "retried", "500"),
        ("attempt 2", "retried", "500"),
        ("attempt 3", "dead_lettered", "500"),
    ]
    assert all("no such tree" in a[7] and a[6].endswith("ms") for a in dead)
    # Times are UTC and in order; --failed leaves out the one delivery.
    times = [datetime.fromisoformat(a[0]) for a in await attempts(settings, sub.name)]
    assert times == sorted(times) and all(t.tzinfo is not None for t in times)
    failed = await attempts(settings, sub.name, failed=True)
    assert len(failed) == 5 and all(a[3] != "delivered" for a in failed)
    # --since after all of them: nothing; other subscriptions' records are not shown.
    later = datetime.now(UTC) + timedelta(minutes=5)
    assert await attempts(settings, sub.name, since=later) == []
    assert await attempts(settings, "someone-else") == []
    assert metrics.registry.get_sample_value("patchwork_bridge_attempt_history_records_total") == 6
    assert (
        metrics.registry.get_sample_value("patchwork_bridge_attempt_history_bytes_total") or 0
    ) > 0


async def test_records_written_one_a_message_before_batching_still_read(
    exchange_name: str, amqp: aio_pika.abc.AbstractConnection
) -> None:
    """A history written by the previous version (one record a message) beside a batch."""
    settings = Settings(exchange=exchange_name)

    def record(event: str, attempt: int, outcome: str) -> Attempt:
        at = f"2026-12-07T10:00:0{attempt}.000Z"
        return Attempt("ci", event, "dpdk.patch-created", attempt, at, 12.5, outcome, 204, None, "")

    old = record("7", 1, "delivered")
    batch = [record("8", 1, "retried"), record("8", 2, "delivered")]
    channel = await amqp.channel()
    try:
        await channel.declare_queue(
            history_queue(exchange_name), durable=True, arguments=history_arguments(settings)
        )
        for body in (json.dumps(old.as_dict()).encode(), records_json(batch), b"not ours"):
            await channel.default_exchange.publish(
                aio_pika.Message(body), routing_key=history_queue(exchange_name)
            )
        out = io.StringIO()
        assert await show(settings, "ci", out) == 3
        assert [line.split()[1:3] for line in out.getvalue().splitlines()] == [
            ["7", "attempt"],
            ["8", "attempt"],
            ["8", "attempt"],
        ]
    finally:
        await channel.close()


async def test_without_a_history_yet_it_says_so(exchange_name: str) -> None:
    with pytest.raises(CliError, match=f"no attempt history {history_queue(exchange_name)} yet"):
        await show(Settings(exchange=exchange_name), "ci", io.StringIO())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30m", datetime(2026, 12, 7, 11, 30, tzinfo=UTC)),
        ("2h", datetime(2026, 12, 7, 10, 0, tzinfo=UTC)),
        ("2026-12-06T08:00", datetime(2026, 12, 6, 8, 0, tzinfo=UTC)),
        ("2026-12-06T08:00+01:00", datetime(2026, 12, 6, 7, 0, tzinfo=UTC)),
    ],
)
def test_since_takes_an_age_or_a_time(text: str, expected: datetime) -> None:
    assert parse_since(text, datetime(2026, 12, 7, 12, 0, tzinfo=UTC)) == expected


def test_a_since_that_is_neither_is_a_usage_error() -> None:
    with pytest.raises(CliError, match="--since 'yesterday'"):
        parse_since("yesterday", datetime.now(UTC))
