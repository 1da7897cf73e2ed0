"""The event log: what it keeps, a producer that lost its state directory, standbys taking
over, and replay into one queue. Real RabbitMQ (the log is a stream queue)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import aio_pika
import pytest

from bridge.__main__ import main
from bridge.broker.connect import RecycledConnection, connection_name
from bridge.eventlog import is_marker, log_queue, logged_start, read_log
from bridge.metrics import Metrics
from bridge.producer.role import Producer
from bridge.runtime import InProcess
from tests.amqp_helpers import connection_pids, drain, wait_for
from tests.broker import rabbitmqctl
from tests.test_producer import make_settings, running

pytestmark = pytest.mark.broker


def active(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("patchwork_bridge_producer_active") or 0.0


async def test_the_log_keeps_every_published_event_with_its_id_and_headers(
    patchwork, exchange_name, bound_queue, tmp_path, amqp
):
    patchwork.add_events(300)
    async with running(make_settings(patchwork, exchange_name, tmp_path)):
        published = await drain(bound_queue, expected=300)
    start, *logged = [m async for m in read_log(amqp, exchange_name, "first")]
    assert is_marker(start) and logged_start(start) is not None  # BRIDGE_START, recorded first
    assert [m.message_id for m in logged] == [m.message_id for m in published]
    for kept, sent in zip(logged, published, strict=True):
        assert kept.body == sent.body
        assert kept.routing_key == sent.routing_key
        assert {k: v for k, v in kept.headers.items() if k != "x-stream-offset"} == sent.headers


async def test_reads_cancelled_at_any_moment_leave_the_connection_reading(
    patchwork, exchange_name, bound_queue, tmp_path, amqp
):
    """A stream client that hangs up cancels its read of the log, whatever it was doing.
    aiormq answers a cancelled Basic.Consume or Channel.Close in ways that stopped every
    channel of the connection (bridge.broker.calls.uncancelled); the connection must read on."""
    patchwork.add_events(300)
    async with running(make_settings(patchwork, exchange_name, tmp_path)):
        await drain(bound_queue, expected=300)

    async def take_some() -> None:
        async for _ in read_log(amqp, exchange_name, "first", prefetch=100):
            await asyncio.sleep(0)

    for delay_s in [0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05] * 6:
        reader = asyncio.create_task(take_some())
        await asyncio.sleep(delay_s)
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    async with asyncio.timeout(30):
        logged = [m async for m in read_log(amqp, exchange_name, "first")]
    assert len(logged) == 1 + 300  # the start marker, then the events
    assert not amqp.is_closed


async def test_reads_take_a_new_connection_every_few_channels_and_close_the_old_after_use(
    patchwork, exchange_name, bound_queue, tmp_path, unique
):
    """aio-pika keeps memory for every channel a connection ever opened (RecycledConnection),
    so the stream's reads take turns on connections that are replaced and closed."""
    patchwork.add_events(50)
    settings = make_settings(patchwork, exchange_name, tmp_path)
    async with running(settings):
        await drain(bound_queue, expected=50)
    name = f"test history {unique}"
    reads = RecycledConnection(settings, name, per_connection=2)

    def on_broker(count: int) -> Callable[[], Awaitable[bool]]:
        async def listed() -> bool:
            return len(await asyncio.to_thread(connection_pids, connection_name(name))) == count

        return listed

    async def read_all(connection: aio_pika.abc.AbstractConnection) -> int:
        logged = [m async for m in read_log(connection, exchange_name, "first")]
        return len([m for m in logged if not is_marker(m)])

    try:
        async with reads.lease() as first:
            async with reads.lease() as same:
                assert same is first
                assert await read_all(same) == 50
            async with reads.lease() as second:
                assert second is not first
                assert not first.is_closed  # a read still holds it
                assert await read_all(second) == 50
            assert await read_all(first) == 50
        await wait_for(lambda: first.is_closed, what="the replaced connection to close")
        assert not second.is_closed
        await wait_for(on_broker(1), what="one connection left on the broker")
    finally:
        await reads.close()
    assert second.is_closed
    await wait_for(on_broker(0), what="no connection left on the broker")


async def test_a_lost_state_directory_resumes_from_the_log_tail_without_gap_or_flood(
    patchwork, exchange_name, bound_queue, tmp_path
):
    """BRIDGE_START=beginning would republish all 600 if the log were not read."""
    state = tmp_path / "state"
    first = patchwork.add_events(600)
    settings = make_settings(patchwork, exchange_name, state, start="beginning")
    async with running(settings):
        before = await drain(bound_queue, expected=600)
    shutil.rmtree(state)  # a new host, a container without its volume
    later = patchwork.add_events(200)
    async with running(settings):
        after = await drain(bound_queue, expected=200)
        polls = patchwork.events_requests
        await wait_for(lambda: patchwork.events_requests >= polls + 5)
        assert await drain(bound_queue, expected=0, timeout=1.0) == []
    ids = Counter(int(m.message_id) for m in before + after)
    assert set(ids) == {e["id"] for e in first + later}, "nothing skipped"
    assert max(ids.values()) == 1, "nothing published twice"
    assert json.loads((state / "cursor.json").read_text())["max_id"] == later[-1]["id"]


async def test_a_standby_takes_over_when_the_poller_stops_and_resumes_from_the_log(
    patchwork, exchange_name, bound_queue, tmp_path
):
    settings = make_settings(patchwork, exchange_name, tmp_path / "a", start="beginning")
    standby_settings = settings.model_copy(update={"state_dir": tmp_path / "b"})
    ours, theirs = Metrics(), Metrics()
    poller = InProcess([Producer(settings, ours)])
    standby_producer = Producer(standby_settings, theirs)
    standby = InProcess([standby_producer])
    poller.start()
    try:
        await wait_for(lambda: active(ours) == 1, what="the first producer polling")
        standby.start()
        await wait_for(lambda: standby_producer.connected(), what="the standby connected")
        patchwork.add_events(300)
        first = await drain(bound_queue, expected=300)
        assert active(theirs) == 0
        assert standby_producer.readiness() == (True, "")  # a standby is healthy and ready
        await poller.close()
        await wait_for(lambda: active(theirs) == 1, what="the standby taking over")
        patchwork.add_events(300)
        second = await drain(bound_queue, expected=300)
        assert await drain(bound_queue, expected=0, timeout=1.0) == []
    finally:
        await poller.close()
        await standby.close()
    ids = Counter(int(m.message_id) for m in first + second)
    assert len(ids) == 600 and max(ids.values()) == 1


async def test_two_first_starts_on_a_new_log_the_second_still_reads_it_before_taking_over(
    patchwork, exchange_name, bound_queue, tmp_path, caplog
):
    """Both find no event log; only the one that takes the lock at once may skip reading it.
    The other would otherwise fall back to BRIDGE_START=beginning and republish all 300."""
    patchwork.add_events(300)
    settings = make_settings(patchwork, exchange_name, tmp_path / "a", start="beginning")
    metrics = {"a": Metrics(), "b": Metrics()}
    sides = {
        "a": InProcess([Producer(settings, metrics["a"])]),
        "b": InProcess(
            [Producer(settings.model_copy(update={"state_dir": tmp_path / "b"}), metrics["b"])]
        ),
    }
    caplog.set_level("INFO", logger="bridge.producer.role")
    for side in sides.values():
        side.start()
    try:
        await wait_for(lambda: any(active(m) == 1 for m in metrics.values()), what="a poller")
        first = await drain(bound_queue, expected=300)
        [polling] = [name for name, m in metrics.items() if active(m) == 1]
        other = "b" if polling == "a" else "a"
        await sides[polling].close()
        await wait_for(lambda: active(metrics[other]) == 1, what="the other taking over")
        patchwork.add_events(100)
        second = await drain(bound_queue, expected=100)
        assert await drain(bound_queue, expected=0, timeout=1.0) == []
    finally:
        for side in sides.values():
            await side.close()
    ids = Counter(int(m.message_id) for m in first + second)
    assert len(ids) == 400 and max(ids.values()) == 1
    new_log = [r for r in caplog.records if "the event log is new" in r.getMessage()]
    # None when the producer that found the log declared already took the lock first.
    assert len(new_log) <= 1, "only the first poller may know the log empty without reading"


@pytest.fixture
async def log_with_500(patchwork, exchange_name, bound_queue, tmp_path):
    """300 old events (an hour ago), then 500 of dpdk and netdevbpf, all published."""
    an_hour_ago = patchwork.now() - timedelta(hours=1)
    old = [patchwork.add_event("patch-created", "dpdk", an_hour_ago) for _ in range(300)]
    new = patchwork.add_events(500)
    settings = make_settings(patchwork, exchange_name, tmp_path, start="beginning")
    async with running(settings):
        await drain(bound_queue, expected=800)
    return old, new


def replay(*args: str, exchange: str, **env: str) -> int:
    saved = dict(os.environ)
    os.environ.update(
        {"BRIDGE_EXCHANGE": exchange, "BRIDGE_PATCHWORK_TIMEZONE": "Australia/Canberra", **env}
    )
    try:
        return main(["replay", *args])
    finally:
        os.environ.clear()
        os.environ.update(saved)


async def test_replay_gives_a_late_queue_exactly_the_events_it_asks_for(
    log_with_500, patchwork, exchange_name, bound_queue, amqp, unique, capsys
):
    _, new = log_with_500
    channel = await amqp.channel()
    late = await channel.declare_queue(f"test-{unique}-late", durable=True)
    since = min(e["date"] for e in new)
    try:
        code = await asyncio.to_thread(
            replay, "--since", since, "--events", "dpdk.*", "--queue", late.name,
            exchange=exchange_name,
        )  # fmt: skip
        assert code == 0, capsys.readouterr().err
        wanted = {e["id"] for e in new if e["project"]["link_name"] == "dpdk"}
        got = await drain(late.name, expected=len(wanted))
        assert await drain(late.name, expected=0, timeout=0.5) == []
        assert {int(m.message_id) for m in got} == wanted
        assert all(m.headers["x-patchwork-replay"] is True for m in got)
        assert all(m.headers["ce-id"] == m.message_id for m in got)
        assert f"replayed {len(wanted)} events" in capsys.readouterr().out
        # Never to the exchange: the CI queue bound # got nothing again.
        assert await drain(bound_queue, expected=0, timeout=0.5) == []
    finally:
        await channel.queue_delete(late.name)
        await channel.close()


async def test_replay_dry_run_counts_and_copies_nothing(
    log_with_500, exchange_name, amqp, unique, capsys
):
    old, _ = log_with_500
    channel = await amqp.channel()
    late = await channel.declare_queue(f"test-{unique}-late", durable=True)
    try:
        since = min(e["date"] for e in old)
        code = await asyncio.to_thread(
            replay, "--since", since, "--queue", late.name, "--events", "#", "--dry-run",
            exchange=exchange_name,
        )  # fmt: skip
        assert code == 0
        assert "would replay 800 events" in capsys.readouterr().out
        assert await drain(late.name, expected=0, timeout=0.5) == []
    finally:
        await channel.queue_delete(late.name)
        await channel.close()


async def test_ctrl_c_during_a_replay_says_how_far_it_got_and_leaves_no_route(
    log_with_500, exchange_name, amqp, unique
):
    """Issue 29, finding 7. SIGINT as soon as the replay says where the log starts: it is
    then reading and copying (a read ends only after half a second of quiet)."""
    channel = await amqp.channel()
    late = await channel.declare_queue(f"test-{unique}-late", durable=True)
    env = {
        **os.environ,
        "BRIDGE_EXCHANGE": exchange_name,
        "BRIDGE_PATCHWORK_TIMEZONE": "Australia/Canberra",
    }
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge", "replay", "--since", "2000-01-01",
            "--queue", late.name, "--events", "#",
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert process.stderr is not None
        first = await asyncio.wait_for(process.stderr.readline(), 60)
        assert b"starts at" in first, first
        process.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(process.communicate(), 60)
        said = err.decode().strip().splitlines()
        assert process.returncode == 130, (out, said)
        assert "Traceback" not in err.decode()
        [last] = said
        copied = int(re.search(r"interrupted after (\d+) events copied into", last)[1])
        assert 0 <= copied <= 800
        assert last.endswith("(consumers deduplicate by message_id)")
        # Its own route (bound with --events for this run) is gone; the queue keeps copies.
        leftovers = await routes_of(exchange_name, late.name)
        assert leftovers == [], leftovers
    finally:
        await channel.queue_delete(late.name)
        await channel.close()


async def routes_of(exchange: str, queue: str) -> list[str]:
    """The exchanges bound to ``queue`` but the default one, as rabbitmqctl lists them."""
    result = await asyncio.to_thread(
        rabbitmqctl, "list_bindings", "source_name", "destination_name", "-q"
    )
    result.check_returncode()
    return [
        line.split("\t")[0]
        for line in result.stdout.splitlines()
        if line.endswith("\t" + queue) and line.split("\t")[0]
    ]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--since", "2000-01-01", "--queue", "{late}", "--events", "#"], "starts at"),
        (["--since", "yesterday", "--queue", "{late}"], "--since 'yesterday': not an ISO 8601"),
        (["--since", "2000-01-01"], "give --queue QUEUE or --subscription NAME"),
        (["--since", "2000-01-01", "--queue", "nope-{late}"], "no such queue"),
        (["--since", "2000-01-01", "--queue", "{late}", "--events", "a.**"], "--events"),
        # Not made by `bind`: its patterns are not known, and copying all would flood it.
        (["--since", "2000-01-01", "--queue", "{late}"], "give the patterns it is bound with"),
    ],
)
async def test_replay_says_what_is_wrong_in_one_line(
    log_with_500, exchange_name, amqp, unique, capsys, args, says
):
    channel = await amqp.channel()
    late = await channel.declare_queue(f"test-{unique}-late", durable=True)
    try:
        argv = [a.format(late=late.name) for a in args]
        await asyncio.to_thread(replay, *argv, "--dry-run", exchange=exchange_name)
        err = capsys.readouterr().err
        assert says in err, err
        assert "Traceback" not in err
    finally:
        await channel.queue_delete(late.name)
        await channel.close()


async def test_the_log_is_a_stream_with_the_configured_retention(
    patchwork, exchange_name, tmp_path, amqp
):
    settings = make_settings(patchwork, exchange_name, tmp_path, log_max_age="2D")
    patchwork.add_events(5)
    async with running(settings):
        await wait_for(lambda: patchwork.events_requests > 1)
    channel = await amqp.channel()
    with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed):
        # Declared with other arguments than the producer's: the broker refuses.
        await channel.declare_queue(
            log_queue(exchange_name), durable=True, arguments={"x-queue-type": "stream",
            "x-max-age": "14D", "x-max-length-bytes": settings.log_max_bytes},
        )  # fmt: skip
    assert Path(tmp_path / "cursor.json").exists()


@pytest.mark.parametrize("how", ["restart without its state directory", "standby takes over"])
async def test_now_holds_across_a_stateless_restart_or_a_takeover(
    patchwork, exchange_name, bound_queue, tmp_path, how
):
    """BRIDGE_START=now on a new exchange: nothing dated before the first start is ever
    published, by the producer that starts again without its cursor or by the standby that
    takes over, however often they sweep the overlap (which holds the old events)."""
    history = {e["id"] for e in patchwork.add_events(300)}
    settings = make_settings(
        patchwork,
        exchange_name,
        tmp_path / "first",
        start="now",
        poll_late_wait=300.0,
        poll_sweep_interval=0.2,
    )
    second = settings.model_copy(update={"state_dir": tmp_path / "second"})
    first_run = InProcess([Producer(settings, Metrics())])
    standby = InProcess([Producer(second, Metrics())])
    await first_run.__aenter__()
    try:
        await first_run.wait_ready()
        if how == "standby takes over":
            await standby.__aenter__()
        new = patchwork.add_events(5)
        got = await drain(bound_queue, expected=5)
        await first_run.close()
        if how == "restart without its state directory":
            await standby.__aenter__()  # a fresh state directory: the log's tail decides
        await standby.wait_ready()
        await asyncio.sleep(2.0)  # ten sweeps of the overlap
        new += patchwork.add_events(5)
        got += await drain(bound_queue, expected=5)
        got += await drain(bound_queue, expected=0, timeout=1.0)  # anything more?
    finally:
        await first_run.close()
        await standby.close()
    ids = [int(m.message_id) for m in got]
    assert sorted(ids) == sorted(e["id"] for e in new)
    assert not history & set(ids)
