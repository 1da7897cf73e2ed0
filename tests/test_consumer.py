"""The webhook consumer against the real broker, with fake sinks standing in for receivers."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path

import aio_pika
import pytest
from aiohttp import web
from standardwebhooks import Webhook

from bridge.broker.connect import connection_name
from bridge.broker.errors import TopologyError
from bridge.broker.topology import declare_exchange
from bridge.cli.subscriptions import run_subscriptions
from bridge.delivery.engine import DeliveryRole
from bridge.delivery.messages import (
    ATTEMPTS,
    DEAD_AT,
    LAST_ERROR,
    LAST_REASON,
    LAST_STATUS,
    ROUTING_KEY,
)
from bridge.delivery.queues import QueueControl
from bridge.delivery.settle import SETTLE_BUG_TRIES
from bridge.metrics import Metrics
from bridge.runtime import InProcess, build_roles
from bridge.settings import Settings, SettingsError
from bridge.sinks.base import Delivered, Delivery, Disable, GiveUp, RetryLater
from bridge.sinks.registry import load_sink
from bridge.webhook.role import declare_subscription
from bridge.webhook.subscriptions import Subscription
from tests.amqp_helpers import (
    FakeSink,
    HangingSink,
    cut_connection,
    delete_subscription_queues,
    get_all,
    lane,
    make_consumer,
    publish_events,
    publish_raw,
    queue_depth,
    recorded_event,
    running,
    subscription,
    wait_for,
)
from tests.receiver import Receiver

MakeSub = Callable[..., Subscription]


@pytest.fixture(params=["classic", "quorum"])
def queue_type(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
async def make_sub(
    amqp: aio_pika.abc.AbstractConnection, exchange_name: str, unique: str
) -> AsyncIterator[MakeSub]:
    """Subscriptions named ``<label>-<unique>``; all their queues are deleted after the test."""
    made: list[Subscription] = []

    def make(label: str, **fields: object) -> Subscription:
        sub = subscription(f"{label}-{unique}", **fields)
        made.append(sub)
        return sub

    yield make
    await delete_subscription_queues(amqp, exchange_name, made)


def in_flight(metrics: Metrics, name: str) -> float | None:
    return metrics.registry.get_sample_value(
        "patchwork_bridge_webhook_in_flight", {"subscription": name}
    )


def count(metrics: Metrics, name: str, outcome: str) -> float:
    value = metrics.registry.get_sample_value(
        "patchwork_bridge_webhook_deliveries_total", {"subscription": name, "outcome": outcome}
    )
    return value or 0.0


def failures(metrics: Metrics, name: str, reason: str) -> float:
    value = metrics.registry.get_sample_value(
        "patchwork_bridge_webhook_failures_total", {"subscription": name, "reason": reason}
    )
    return value or 0.0


def enabled(metrics: Metrics, name: str) -> float | None:
    return metrics.registry.get_sample_value(
        "patchwork_bridge_subscription_enabled", {"subscription": name}
    )


async def test_event_reaches_only_matching_subscriptions_once_each(
    exchange_name: str, make_sub: MakeSub, queue_type: str
) -> None:
    netdev = make_sub("netdev", events=["netdevbpf.*"])
    series = make_sub("series", events=["*.series-created", "*.series-completed"])
    everything = make_sub("all")
    sinks = {sub.name: FakeSink() for sub in (netdev, series, everything)}
    consumer = make_consumer(
        exchange_name,
        [(s, sinks[s.name]) for s in (netdev, series, everything)],
        queue_type=queue_type,
    )
    async with running(consumer):
        await publish_events(
            exchange_name,
            [("patch-created", 1), ("series-completed", 2), ("patch-relation-changed", 3)],
        )
        await wait_for(lambda: len(sinks[everything.name].deliveries) == 3, what="all 3 events")
        await wait_for(lambda: len(sinks[netdev.name].deliveries) == 2, what="netdev's 2 events")
        await wait_for(lambda: len(sinks[series.name].deliveries) == 1, what="series' event")

    assert sorted(sinks[everything.name].ids) == ["1", "2", "3"]
    assert sorted(sinks[netdev.name].ids) == ["1", "2"]
    assert sinks[series.name].ids == ["2"]
    first = next(d for d in sinks[netdev.name].deliveries if d.message_id == "1")
    assert first.routing_key == "netdevbpf.patch-created"
    assert first.attempt == 1
    assert json.loads(first.body) == json.loads(recorded_event("patch-created", 1))
    assert first.headers["ce-id"] == "1"
    assert first.headers["x-patchwork-category"] == "patch-created"
    assert all(sink.closed for sink in sinks.values())


async def test_narrowed_events_are_not_delivered_though_the_old_binding_stays(
    exchange_name: str, make_sub: MakeSub, caplog: pytest.LogCaptureFixture
) -> None:
    wide = make_sub("narrowed", events=["*.patch-created", "*.series-completed"])
    async with running(make_consumer(exchange_name, [(wide, FakeSink())])):
        pass  # the queue is now bound with both patterns, as after an earlier start
    narrow = make_sub("narrowed", events=["*.series-completed"])
    sink, metrics = FakeSink(), Metrics()
    with caplog.at_level(logging.WARNING, logger="bridge.delivery.carry_out"):
        async with running(make_consumer(exchange_name, [(narrow, sink)], metrics=metrics)):
            await publish_events(
                exchange_name,
                [("patch-created", 41), ("series-completed", 42), ("patch-created", 43)],
            )
            await wait_for(lambda: count(metrics, narrow.name, "unmatched") == 2, what="2 acked")
            await wait_for(lambda: sink.ids == ["42"], what="the series event")

    assert count(metrics, narrow.name, "delivered") == 1
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name == "bridge.delivery.carry_out" and r.levelno >= logging.WARNING
    ]
    assert len(warnings) == 1  # once per routing key
    assert "netdevbpf.patch-created" in warnings[0] and "list_bindings" in warnings[0]


async def test_failed_attempts_are_retried_until_the_receiver_accepts(
    exchange_name: str, make_sub: MakeSub, queue_type: str
) -> None:
    flaky = make_sub("flaky", retry_schedule=[0.2, 0.2])

    def answer(d: Delivery) -> RetryLater | Delivered:
        if d.attempt < 3:
            return RetryLater("http_5xx", "HTTP 503 Service Unavailable", status=503)
        return Delivered(200)

    sink, metrics = FakeSink(answer), Metrics()
    consumer = make_consumer(exchange_name, [(flaky, sink)], queue_type=queue_type, metrics=metrics)
    async with running(consumer):
        await publish_events(exchange_name, [("patch-created", 7)])
        await wait_for(lambda: count(metrics, flaky.name, "delivered") == 1, what="delivery")

    assert [(d.message_id, d.attempt) for d in sink.deliveries] == [("7", 1), ("7", 2), ("7", 3)]
    # The event keeps its identity and routing key through the retry queues.
    assert {d.routing_key for d in sink.deliveries} == {"netdevbpf.patch-created"}
    assert {d.headers["ce-id"] for d in sink.deliveries} == {"7"}
    assert count(metrics, flaky.name, "retried") == 2
    assert failures(metrics, flaky.name, "http_5xx") == 2


@pytest.mark.timeout(120)
async def test_retry_after_is_honoured_to_within_a_second(
    exchange_name: str, make_sub: MakeSub
) -> None:
    """Real receivers answer the first attempt of each event 429 or 503 with Retry-After 2,
    7 and 45 s: each retry comes no earlier, and less than a second later. Classic and
    quorum queues side by side, in one run of the 45 s."""
    asked = {
        f"{kind}-{label}": answer
        for kind in ("classic", "quorum")
        for label, answer in (
            ("two", ("2", 429)),
            ("seven", ("7", 503)),
            ("fortyfive", ("45", 429)),
        )
    }
    first: dict[str, float] = {}
    gaps: dict[str, float] = {}
    loop = asyncio.get_running_loop()

    def handler(label: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def answer(request: web.Request) -> web.Response:
            key = f"{label}/{request.headers['webhook-id']}"
            if key not in first:
                first[key] = loop.time()
                seconds, status = asked[label]
                return web.Response(status=status, headers={"Retry-After": seconds})
            gaps.setdefault(key, loop.time() - first[key])
            return web.Response(status=204)

        return answer

    receivers = {label: Receiver(handler(label)) for label in asked}
    pairs: dict[str, list] = {"classic": [], "quorum": []}
    for label, receiver in receivers.items():
        url = await receiver.start()
        sub = make_sub(label, url=url, allow_private_network=True, retry_schedule=[600.0])
        pairs[label.split("-")[0]].append((sub, load_sink(sub)))
    try:
        async with (
            running(make_consumer(exchange_name, pairs["classic"], queue_type="classic")),
            running(make_consumer(exchange_name, pairs["quorum"], queue_type="quorum")),
        ):
            await publish_events(exchange_name, [("patch-created", i) for i in (11, 12)])
            await wait_for(lambda: len(gaps) == 12, 90, "the retry of every event")
    finally:
        for receiver in receivers.values():
            await receiver.stop()
    for key, gap in sorted(gaps.items()):
        wanted = float(asked[key.split("/")[0]][0])
        assert wanted <= gap < wanted + 1.0, f"{key}: asked {wanted:g}s, retried after {gap:.3f}s"
    assert all(r.successes == {"11": 1, "12": 1} for r in receivers.values())


async def test_exhausted_retries_land_in_the_dead_letter_queue_with_the_last_failure(
    exchange_name: str, make_sub: MakeSub, queue_type: str, amqp: aio_pika.abc.AbstractConnection
) -> None:
    broken = make_sub("broken", retry_schedule=[0.2, 0.2])
    sink = FakeSink(lambda d: RetryLater("http_5xx", "HTTP 500 Internal\nServer Error", status=500))
    metrics = Metrics()
    consumer = make_consumer(
        exchange_name, [(broken, sink)], queue_type=queue_type, metrics=metrics
    )
    async with running(consumer):
        await publish_events(exchange_name, [("series-completed", 9)])
        await wait_for(lambda: count(metrics, broken.name, "dead_lettered") == 1, what="dead")

    assert [d.attempt for d in sink.deliveries] == [1, 2, 3]
    [dead] = await get_all(amqp, lane(exchange_name, broken.name).dead)
    assert dead.message_id == "9"
    assert json.loads(dead.body) == json.loads(recorded_event("series-completed", 9))
    assert dead.content_type == "application/json"
    headers = dead.headers
    assert headers[LAST_STATUS] == 500
    assert headers[LAST_REASON] == "http_5xx"
    assert headers[LAST_ERROR] == "HTTP 500 Internal Server Error"
    assert headers[ATTEMPTS] == 3
    assert headers[ROUTING_KEY] == "netdevbpf.series-completed"
    assert datetime.fromisoformat(headers[DEAD_AT]).tzinfo is not None
    assert headers["ce-id"] == "9"
    assert not any(k.startswith("x-death") for k in headers)
    assert await queue_depth(amqp, lane(exchange_name, broken.name).main) == 0


async def test_give_up_dead_letters_at_once(
    exchange_name: str, make_sub: MakeSub, amqp: aio_pika.abc.AbstractConnection
) -> None:
    refused = make_sub("refused", retry_schedule=[0.2, 0.2])
    sink, metrics = FakeSink(lambda d: GiveUp("ssrf", "resolves to 127.0.0.1")), Metrics()
    async with running(make_consumer(exchange_name, [(refused, sink)], metrics=metrics)):
        await publish_events(exchange_name, [("patch-created", 10)])
        await wait_for(lambda: count(metrics, refused.name, "dead_lettered") == 1, what="dead")

    assert sink.ids == ["10"]
    [dead] = await get_all(amqp, lane(exchange_name, refused.name).dead)
    assert dead.headers[LAST_REASON] == "ssrf"
    assert dead.headers[ATTEMPTS] == 1
    assert LAST_STATUS not in dead.headers
    assert failures(metrics, refused.name, "ssrf") == 1


async def test_poison_messages_are_dead_lettered_and_the_next_event_is_delivered(
    exchange_name: str, make_sub: MakeSub, queue_type: str, amqp: aio_pika.abc.AbstractConnection
) -> None:
    target = make_sub("poison")
    sink, metrics = FakeSink(), Metrics()
    consumer = make_consumer(
        exchange_name, [(target, sink)], queue_type=queue_type, metrics=metrics
    )
    main = lane(exchange_name, target.name).main
    async with running(consumer):
        await publish_raw(main, b"<html>502</html>", message_id="p1")
        await publish_raw(main, b"[1, 2]", message_id="p2")
        # Valid JSON to Python's json.loads, which guesses UTF-16; not what receivers expect.
        await publish_raw(main, '{"id": 1}'.encode("utf-16"), message_id="p3")
        # No message_id (pika, kombu and most clients set none): delivered under an id
        # derived from its routing key and body, the same for every copy of it.
        await publish_raw(main, recorded_event("patch-created", 11))
        await publish_events(exchange_name, [("patch-created", 12)])
        await wait_for(lambda: len(sink.ids) == 2, what="the good events")
        await wait_for(lambda: count(metrics, target.name, "refused") == 3, what="3 refusals")

    dead = await get_all(amqp, lane(exchange_name, target.name).dead)
    assert {m.headers[LAST_REASON] for m in dead} == {"invalid"}
    assert sorted(m.headers[LAST_ERROR] for m in dead) == [
        "body is a JSON list, not an object",
        "body is not UTF-8 JSON",
        "body is not UTF-8 JSON",
    ]
    assert {m.headers[ATTEMPTS] for m in dead} == {0}
    assert failures(metrics, target.name, "invalid") == 3
    good, derived = sorted(sink.ids)
    assert good == "12" and re.fullmatch(r"sha256-[0-9a-f]{32}", derived)


async def test_sink_that_raises_is_retried_as_a_sink_error(
    exchange_name: str, make_sub: MakeSub
) -> None:
    buggy = make_sub("buggy", retry_schedule=[0.2])

    def answer(d: Delivery) -> Delivered:
        if d.attempt == 1:
            raise KeyError("a bug in the sink")
        return Delivered(200)

    sink, metrics = FakeSink(answer), Metrics()
    async with running(make_consumer(exchange_name, [(buggy, sink)], metrics=metrics)):
        await publish_events(exchange_name, [("patch-created", 13)])
        await wait_for(lambda: count(metrics, buggy.name, "delivered") == 1, what="delivery")
    assert [d.attempt for d in sink.deliveries] == [1, 2]
    assert failures(metrics, buggy.name, "sink_error") == 1


async def test_a_bug_while_settling_ends_in_dead_after_bounded_tries(
    exchange_name: str,
    make_sub: MakeSub,
    queue_type: str,
    amqp: aio_pika.abc.AbstractConnection,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from bridge.delivery import attempts

    def broken(message: object) -> object:
        raise KeyError("a bug of ours")

    monkeypatch.setattr(attempts, "delivery_from", broken)
    target = make_sub("settle-bug")
    sink, metrics = FakeSink(), Metrics()
    consumer = make_consumer(
        exchange_name, [(target, sink)], queue_type=queue_type, metrics=metrics
    )
    async with running(consumer):
        await publish_events(exchange_name, [("patch-created", 14), ("patch-created", 15)])
        await wait_for(
            lambda: count(metrics, target.name, "dead_lettered") == 2, 30, "both in .dead"
        )
        assert await queue_depth(amqp, lane(exchange_name, target.name).main) == 0

    assert sink.ids == []
    dead = await get_all(amqp, lane(exchange_name, target.name).dead)
    assert sorted(m.message_id for m in dead) == ["14", "15"]
    assert {m.headers[LAST_REASON] for m in dead} == {"bug"}
    assert {m.headers[LAST_ERROR] for m in dead} == {"KeyError: 'a bug of ours'"}
    # Two retries each, then dead: bounded, and a traceback once for the kind of bug.
    assert count(metrics, target.name, "retried") == 2 * (SETTLE_BUG_TRIES - 1)
    tracebacks = [r for r in caplog.records if "bug while settling" in r.getMessage()]
    assert len(tracebacks) == 1 and tracebacks[0].exc_info is not None


async def test_gone_receiver_disables_until_enabled_and_nothing_is_lost(
    exchange_name: str, make_sub: MakeSub, queue_type: str, amqp: aio_pika.abc.AbstractConnection
) -> None:
    gone = make_sub("gone")
    main = lane(exchange_name, gone.name).main
    settings = Settings(exchange=exchange_name, queue_type=queue_type)  # type: ignore[arg-type]
    metrics = Metrics()
    first = FakeSink(lambda d: Disable("http_410", "HTTP 410 Gone", status=410))
    consumer = make_consumer(exchange_name, [(gone, first)], queue_type=queue_type, metrics=metrics)
    async with running(consumer):
        await publish_events(exchange_name, [("patch-created", 21)])
        await wait_for(lambda: enabled(metrics, gone.name) == 0, what="the subscription disabled")

        async def waiting(n: int) -> bool:
            return await queue_depth(amqp, main) == n

        await wait_for(lambda: waiting(1), what="the 410'd event back in its queue")
        await publish_events(exchange_name, [("patch-created", 22), ("patch-created", 23)])
        await wait_for(lambda: waiting(3), what="new events piling up")
    assert first.ids == ["21"]

    # The state is on the broker: a new consumer starts disabled and takes nothing.
    second = FakeSink()
    metrics = Metrics()
    consumer = make_consumer(
        exchange_name, [(gone, second)], queue_type=queue_type, metrics=metrics
    )
    async with running(consumer):
        assert enabled(metrics, gone.name) == 0
        assert (await QueueControl(amqp).inspect(main)).consumer_count == 0
        await run_subscriptions(settings, [gone], "enable", gone.name)
        await wait_for(lambda: second.delivered_ids() == {"21", "22", "23"}, what="all 3 events")
        assert enabled(metrics, gone.name) == 1
    assert await queue_depth(amqp, lane(exchange_name, gone.name).marker) is None


async def test_disable_from_the_cli_stops_a_running_consumer(
    exchange_name: str, make_sub: MakeSub, amqp: aio_pika.abc.AbstractConnection, capsys
) -> None:
    paused = make_sub("paused", events=["netdevbpf.#"])
    settings = Settings(exchange=exchange_name)
    sink, metrics = FakeSink(), Metrics()
    async with running(make_consumer(exchange_name, [(paused, sink)], metrics=metrics)):
        await run_subscriptions(settings, [paused], "disable", paused.name)
        await wait_for(lambda: enabled(metrics, paused.name) == 0, what="the consumer to stop")
        await publish_events(exchange_name, [("patch-created", 31)])

        async def waiting() -> bool:
            return await queue_depth(amqp, lane(exchange_name, paused.name).main) == 1

        await wait_for(waiting, what="the event to wait in its queue")
        await run_subscriptions(settings, [paused], "list", None)
        await run_subscriptions(settings, [paused], "enable", paused.name)
        await wait_for(lambda: sink.ids == ["31"], what="delivery after enable")
    out = capsys.readouterr().out
    assert f"{paused.name}\tdisabled\twebhook\tnetdevbpf.#" in out
    assert f"{paused.name}: enabled" in out


async def test_events_waiting_in_retry_queues_survive_a_consumer_restart(
    exchange_name: str, make_sub: MakeSub, queue_type: str, amqp: aio_pika.abc.AbstractConnection
) -> None:
    later = make_sub("later", retry_schedule=[1.0])
    failing, metrics = FakeSink(lambda d: RetryLater("http_5xx", "HTTP 502", status=502)), Metrics()
    ids = [str(i) for i in range(40, 45)]
    consumer = make_consumer(
        exchange_name, [(later, failing)], queue_type=queue_type, metrics=metrics
    )
    async with running(consumer):
        await publish_events(exchange_name, [("patch-created", int(i)) for i in ids])
        await wait_for(lambda: count(metrics, later.name, "retried") == 5, what="5 retries")

    # Nobody consumes while the retry TTL runs out: the broker moves them back by itself.
    async def back_in_main() -> bool:
        return await queue_depth(amqp, lane(exchange_name, later.name).main) == 5

    await wait_for(back_in_main, what="the retries back in the main queue")
    fixed = FakeSink()
    async with running(make_consumer(exchange_name, [(later, fixed)], queue_type=queue_type)):
        await wait_for(lambda: fixed.delivered_ids() == set(ids), what="all 5 after restart")
    assert {d.attempt for d in fixed.deliveries} == {2}


async def test_hanging_receiver_holds_only_its_own_slots(
    exchange_name: str, make_sub: MakeSub, amqp: aio_pika.abc.AbstractConnection
) -> None:
    slow, fast = make_sub("slow", concurrency=3), make_sub("fast", concurrency=4)
    hanging, quick = HangingSink(), FakeSink()
    ids = {str(i) for i in range(100, 140)}
    metrics = Metrics()
    consumer = make_consumer(
        exchange_name, [(slow, hanging), (fast, quick)], drain_timeout_s=0.5, metrics=metrics
    )
    async with running(consumer):
        await publish_events(exchange_name, [("patch-created", int(i)) for i in sorted(ids)])
        await wait_for(lambda: quick.delivered_ids() == ids, what="the fast receiver's 40 events")
        assert len(hanging.deliveries) == 3  # its concurrency, and no more
        # What the dashboard shows: the hanging lane full, the fast one idle.
        assert in_flight(metrics, slow.name) == 3
        assert in_flight(metrics, fast.name) == 0
    assert len(quick.deliveries) == 40
    assert in_flight(metrics, slow.name) == 0
    # Cancelled on shutdown, never acked: the hanging receiver's events are all still queued.
    assert await queue_depth(amqp, lane(exchange_name, slow.name).main) == 40


async def test_competing_consumers_deliver_every_event_once_in_total(
    exchange_name: str, make_sub: MakeSub, queue_type: str
) -> None:
    shared = make_sub("shared", concurrency=4)
    one, two = FakeSink(), FakeSink()
    ids = {str(i) for i in range(200, 260)}
    a = make_consumer(exchange_name, [(shared, one)], queue_type=queue_type)
    b = make_consumer(exchange_name, [(shared, two)], queue_type=queue_type)
    async with running(a), running(b):
        await publish_events(exchange_name, [("patch-created", int(i)) for i in sorted(ids)])
        await wait_for(lambda: one.delivered_ids() | two.delivered_ids() == ids, what="60 events")
    assert len(one.deliveries) + len(two.deliveries) == 60


async def test_many_subscriptions_with_a_backlog_start_and_deliver_everything_once(
    amqp: aio_pika.abc.AbstractConnection,
    exchange_name: str,
    make_sub: MakeSub,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The first lanes' acks fill the connection while later lanes start: their marker
    checks (passive declares the broker answers by closing the channel) once made the
    broker close the whole connection, and the role died on every start."""
    receiver = Receiver()
    await receiver.start()
    try:
        subs = [
            make_sub(f"fan{i}", concurrency=16, allow_private_network=True).model_copy(
                update={"url": receiver.url(f"/fan{i}")}
            )
            for i in range(20)
        ]
        channel = await amqp.channel()
        await declare_exchange(channel, exchange_name)
        for sub in subs:
            await declare_subscription(channel, exchange_name, sub, "classic")
        await channel.close()
        ids = await publish_events(exchange_name, [("patch-created", i) for i in range(1, 501)])
        consumer = make_consumer(exchange_name, [(sub, load_sink(sub)) for sub in subs])
        async with InProcess([consumer]) as bridge:

            def all_delivered() -> bool:
                bridge.check()  # the role must not have died meanwhile
                return sum(receiver.successes.values()) >= len(ids) * len(subs)

            try:
                await wait_for(all_delivered, timeout=120)
            except AssertionError:
                got, want = sum(receiver.successes.values()), len(ids) * len(subs)
                raise AssertionError(f"{got} of {want} deliveries after 120 s") from None
            assert consumer.readiness() == (True, "")
    finally:
        await receiver.stop()
    for i in range(len(subs)):
        got = [json.loads(hit.body)["id"] for hit in receiver.requests if hit.path == f"/fan{i}"]
        assert sorted(got) == sorted(int(event_id) for event_id in ids), "each event once"
    lost = [
        r.getMessage() for r in caplog.records if "lost its RabbitMQ connection" in r.getMessage()
    ]
    assert lost == [], "the broker never closed the webhook role's connection"


async def test_consuming_resumes_by_itself_after_the_connection_is_cut(
    exchange_name: str, make_sub: MakeSub, queue_type: str, unique: str
) -> None:
    steady = make_sub("steady")
    sink = FakeSink()
    role = f"webhook cut-{unique}"
    consumer = make_consumer(exchange_name, [(steady, sink)], queue_type=queue_type, role=role)
    async with running(consumer):
        await publish_events(exchange_name, [("patch-created", i) for i in range(300, 310)])
        await wait_for(lambda: len(sink.delivered_ids()) == 10, what="the first 10")
        assert await cut_connection(connection_name(role)) == 1
        await publish_events(exchange_name, [("patch-created", i) for i in range(310, 320)])
        want = {str(i) for i in range(300, 320)}
        await wait_for(lambda: sink.delivered_ids() == want, timeout=30, what="all 20 events")
        await wait_for(lambda: consumer.readiness()[0], what="ready again")


async def test_a_queue_deleted_under_the_consumer_is_noticed_and_consumed_again(
    exchange_name: str,
    make_sub: MakeSub,
    queue_type: str,
    amqp: aio_pika.abc.AbstractConnection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    target = make_sub("deleted")
    sink = FakeSink()
    consumer = make_consumer(
        exchange_name, [(target, sink)], queue_type=queue_type, marker_check_interval_s=0.2
    )
    async with running(consumer):
        await publish_events(exchange_name, [("patch-created", 31)])
        await wait_for(lambda: sink.ids == ["31"], what="the first event")
        channel = await amqp.channel()
        await channel.queue_delete(lane(exchange_name, target.name).main)  # an operator's mistake
        await channel.close()
        await wait_for(
            lambda: any("is gone" in r.getMessage() for r in caplog.records),
            what="one clear line saying so",
        )
        await wait_for(lambda: consumer.readiness()[0], 30, "ready again")
        back = f"consuming {lane(exchange_name, target.name).main} again"
        await wait_for(
            lambda: any(r.getMessage().endswith(back) for r in caplog.records), what="back"
        )
        await publish_events(exchange_name, [("patch-created", 32)])
        await wait_for(lambda: sink.ids == ["31", "32"], what="an event sent after the delete")


async def test_readiness_says_why_before_the_consumer_runs(exchange_name: str) -> None:
    consumer = make_consumer(exchange_name, [])
    ready, reason = consumer.readiness()
    assert not ready
    assert "webhook" in reason


def test_webhook_role_needs_a_subscriptions_file() -> None:
    with pytest.raises(SettingsError, match="BRIDGE_SUBSCRIPTIONS: required for the webhook role"):
        build_roles("webhook", Settings(), Metrics())


def test_webhook_role_with_an_empty_subscriptions_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "subscriptions.toml"
    path.write_text("# nothing yet\n")
    with pytest.raises(SettingsError, match="has no \\[\\[webhook\\]\\] tables"):
        build_roles("webhook", Settings(subscriptions=path), Metrics())


def test_build_roles_loads_subscriptions_and_their_sinks(tmp_path: Path) -> None:
    path = tmp_path / "subscriptions.toml"
    path.write_text('[[webhook]]\nname = "ci"\nurl = "https://ci.example.org/hook"\n')
    (consumer,) = build_roles("webhook", Settings(subscriptions=path), Metrics())
    assert isinstance(consumer, DeliveryRole)
    assert consumer.lane_names == ["ci"]


async def test_queue_of_another_type_stops_start_up_with_a_clear_error(
    exchange_name: str, make_sub: MakeSub, amqp: aio_pika.abc.AbstractConnection
) -> None:
    clash = make_sub("clash")
    channel = await amqp.channel()
    await channel.declare_queue(lane(exchange_name, clash.name).main, durable=True)  # classic
    await channel.close()
    consumer = make_consumer(exchange_name, [(clash, FakeSink())], queue_type="quorum")
    with pytest.raises(TopologyError, match="check BRIDGE_QUEUE_TYPE"):
        async with running(consumer):
            pass


async def test_real_webhook_sink_gets_a_second_attempt_after_retry_after(
    exchange_name: str, make_sub: MakeSub
) -> None:
    secret = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()

    async def hook(request: web.Request) -> web.Response:
        if len(receiver.requests) == 1:
            return web.Response(status=503, headers={"Retry-After": "1"})
        return web.Response(status=204)

    receiver = Receiver(hook)
    posts = receiver.requests
    await receiver.start()
    try:
        ci = make_sub("ci", retry_schedule=[60], allow_private_network=True, secret=secret)
        ci = ci.model_copy(update={"url": receiver.url()})
        metrics = Metrics()
        consumer = make_consumer(exchange_name, [(ci, load_sink(ci))], metrics=metrics)
        async with running(consumer):
            await publish_events(exchange_name, [("patch-created", 51)])
            await wait_for(lambda: count(metrics, ci.name, "delivered") == 1, what="delivery")
    finally:
        await receiver.stop()

    # Retry-After 1 s won over the schedule's 60 s; the webhook-id stayed the same.
    assert len(posts) == 2
    (_, first, _), (_, second, body) = posts
    assert first["webhook-id"] == second["webhook-id"]
    Webhook(secret).verify(body, second)
    assert json.loads(body) == json.loads(recorded_event("patch-created", 51))
    assert failures(metrics, ci.name, "http_5xx") + failures(metrics, ci.name, "http_429") == 1


async def test_a_queue_of_ours_bound_to_another_deployments_exchange_stops_the_role(
    exchange_name: str, make_sub: MakeSub, amqp: aio_pika.abc.AbstractConnection
) -> None:
    """Found at start (an event of the other exchange waits in it) or later (one arrives):
    the role stops with one line naming both exchanges, and the event stays in the queue."""
    other = f"{exchange_name}-other"
    shared = make_sub("shared")
    channel = await amqp.channel()
    try:
        await declare_exchange(channel, exchange_name)
        foreign = await declare_exchange(channel, other)
        queue = await declare_subscription(channel, exchange_name, shared, "classic")
        await queue.bind(foreign, "#")
        await publish_events(other, [("patch-created", 71)])
        sink = FakeSink()
        bridge = InProcess([make_consumer(exchange_name, [(shared, sink)])])
        with pytest.raises(TopologyError) as at_start:
            async with bridge:
                await bridge.wait_ready(20)
        assert f"is bound to exchange {other}, not only to this deployment's" in str(at_start.value)
        assert "\n" not in str(at_start.value)
        assert await queue_depth(amqp, lane(exchange_name, shared.name).main) == 1
        [waiting] = await get_all(amqp, lane(exchange_name, shared.name).main)
        assert waiting.message_id == "71"

        bridge = InProcess([make_consumer(exchange_name, [(shared, sink)])])
        with pytest.raises(TopologyError, match=f"bound to exchange {other}"):
            async with bridge:
                await bridge.wait_ready(20)
                await publish_events(other, [("patch-created", 72)])
                await bridge.until(asyncio.Event(), 20)  # ends when the role does
        assert sink.ids == []
        assert await queue_depth(amqp, lane(exchange_name, shared.name).main) == 1
    finally:
        await channel.exchange_delete(other)
        await channel.close()


async def test_one_at_a_time_delivers_in_queue_order(exchange_name: str, make_sub: MakeSub) -> None:
    """Issue 29, finding 12: what docs/webhooks.md says of order (concurrency = 1)."""
    ordered = make_sub("ordered", concurrency=1)
    sink = FakeSink()
    async with running(make_consumer(exchange_name, [(ordered, sink)])):
        await publish_events(exchange_name, [("patch-created", i) for i in range(1, 201)])
        await wait_for(lambda: len(sink.deliveries) == 200, 30, "all 200")
    assert sink.ids == [str(i) for i in range(1, 201)]
