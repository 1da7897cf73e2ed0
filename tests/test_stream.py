"""The stream role against a real RabbitMQ, read by an independent SSE client (httpx-sse):
every event once across client breaks and server restarts, gaps, refusals, slow clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket

import aio_pika
import httpx
import pytest
from httpx_sse import ServerSentEvent, aconnect_sse

import bridge.stream.reads as reads_module
from bridge.broker.connect import connection_name
from bridge.broker.topology import declare_exchange
from bridge.eventlog import log_queue, read_log
from bridge.metrics import Metrics
from bridge.settings import Settings
from bridge.stream.positions import position_of
from tests.amqp_helpers import cut_connection, wait_for
from tests.stream_helpers import (
    DPDK,
    NIPA,
    connected,
    event_ids,
    producer,
    publish_and_read,
    read_events,
    read_resuming,
    stream_role,
    stream_settings,
    write_consumers,
)

pytestmark = pytest.mark.broker


@pytest.fixture
def settings(patchwork, exchange_name, tmp_path) -> Settings:
    return stream_settings(patchwork, exchange_name, tmp_path)


async def test_a_client_gets_every_published_event_once_with_patchworks_json(patchwork, settings):
    async with producer(settings), stream_role(settings) as url:
        reader = asyncio.create_task(read_events(url, 300))
        await connected(url)  # reading from the live tail
        added = patchwork.add_events(300)
        events = await reader
    assert event_ids(events) == [e["id"] for e in added]
    for event in events[::37]:
        item = json.loads(event.data)
        assert event.data.encode() == patchwork.item_bytes(item["id"])
        assert event.event == item["category"]
    assert len({e.id for e in events}) == 300


async def test_a_client_that_hangs_up_resumes_from_its_last_id_missing_nothing(patchwork, settings):
    async with producer(settings), stream_role(settings) as url:
        reader = asyncio.create_task(read_events(url, 120))
        await connected(url)
        added = patchwork.add_events(200)
        first = await reader  # hangs up with 80 still to come
        added += patchwork.add_events(100)  # published while it is away
        rest = await read_events(url, 180, last_id=first[-1].id)
    assert event_ids(first) + event_ids(rest) == [e["id"] for e in added]


async def test_a_stream_role_restarted_mid_stream_ends_streams_cleanly_and_resumes_them(
    patchwork, settings
):
    got: list[ServerSentEvent] = []

    async def read_until_the_end(url: str) -> None:
        headers = {"Authorization": f"Bearer {NIPA}"}
        async with (
            httpx.AsyncClient(timeout=httpx.Timeout(30, read=None)) as client,
            aconnect_sse(client, "GET", f"{url}/v1/events", headers=headers) as source,
        ):
            async for event in source.aiter_sse():
                got.append(event)

    async with producer(settings):
        async with stream_role(settings) as url:
            reader = asyncio.create_task(read_until_the_end(url))
            await connected(url)
            added = patchwork.add_events(150)
            await wait_for(lambda: len(got) >= 50)
        await asyncio.wait_for(reader, 10)  # the stream ended; no error
        added += patchwork.add_events(150)
        async with stream_role(settings) as url:  # "elsewhere": another port
            rest = await read_events(url, 300 - len(got), last_id=got[-1].id)
    assert event_ids(got) + event_ids(rest) == [e["id"] for e in added]


async def test_a_client_resuming_on_a_quiet_site_gets_the_whole_backlog_at_once(
    patchwork, settings
):
    """A stream role started after the last event was published has handed out nothing
    yet: a client resuming from an old id still gets everything after it, without waiting
    for a new event. (It got one event, then waited for the next publish.)"""
    async with producer(settings):
        async with stream_role(settings) as url:
            added = patchwork.add_events(120)
            first = await read_events(url, 10, params={"since": added[0]["date"]})
        async with stream_role(settings) as url:  # nothing is published after it starts
            rest = await read_events(url, 110, last_id=first[-1].id, timeout_s=30)
    assert event_ids(first) + event_ids(rest) == [e["id"] for e in added]


async def test_since_starts_at_events_dated_from_then(patchwork, settings):
    async with producer(settings), stream_role(settings) as url:
        added = patchwork.add_events(40)
        await wait_for(lambda: patchwork.events_requests > 3)
        reader_ready = await read_events(url, 40, params={"since": added[0]["date"]})
        later = await read_events(url, 20, params={"since": added[20]["date"]})
    assert event_ids(reader_ready) == [e["id"] for e in added]
    assert event_ids(later) == [e["id"] for e in added[20:40]]


async def test_clients_resuming_together_get_every_event_once_reading_the_log_once(
    patchwork, settings, monkeypatch
):
    """Twenty clients back at once, each from its own position over the last 600 events
    (bench/stream.py --resume: 200 over 20,000), with two reads of the log at a time (16
    by default). Each gets every event after its position once, in order; the broker
    sends that stretch about twice (the two reads, and the few events each client reads
    up to the live tail's seam), not once a client."""
    whole_read = reads_module.read_log
    sent = 0

    async def counted(*args, **kwargs):
        nonlocal sent
        async with contextlib.aclosing(whole_read(*args, **kwargs)) as messages:
            async for message in messages:
                sent += 1
                yield message

    monkeypatch.setattr(reads_module, "read_log", counted)
    monkeypatch.setattr(reads_module, "AT_ONCE", 2)
    async with producer(settings), stream_role(settings) as url:
        added, events = await publish_and_read(patchwork, url, 600)
        positions = range(0, 600, 30)
        sent = 0
        got = await asyncio.gather(
            *(read_events(url, 599 - p, last_id=events[p].id) for p in positions)
        )
    for p, theirs in zip(positions, got, strict=True):
        assert event_ids(theirs) == [e["id"] for e in added[p + 1 :]], p
    each_its_own = sum(599 - p for p in positions)  # 6,170
    assert sent < 3 * 600 < each_its_own, sent


SHORT_READ = 25


@pytest.fixture
def short_log_reads(monkeypatch):
    """Every read of the log by a client ends after SHORT_READ messages, as a read does
    when the broker pauses longer than its idle end (under load: bench/memory.py)."""
    whole_read = reads_module.read_log

    async def short_read(*args, **kwargs):
        async with contextlib.aclosing(whole_read(*args, **kwargs)) as messages:
            taken = 0
            async for message in messages:
                yield message
                taken += 1
                if taken == SHORT_READ:
                    return

    monkeypatch.setattr(reads_module, "read_log", short_read)


async def test_a_catch_up_read_that_ends_early_goes_on_to_the_live_tail_skipping_nothing(
    patchwork, settings, short_log_reads
):
    async with producer(settings), stream_role(settings) as url:
        added, _ = await publish_and_read(patchwork, url, 300)  # the seam: the last of them
        late = await read_events(url, 300, params={"since": "2000-01-01T00:00:00"}, timeout_s=30)
    assert event_ids(late) == [e["id"] for e in added]


async def test_a_read_of_the_log_that_times_out_ends_the_stream_as_broker_trouble(
    patchwork, settings, monkeypatch
):
    """Not as a stalled client: the client did nothing wrong, and it resumes."""
    whole_read = reads_module.read_log
    failed: list[int] = []

    async def timing_out_read(*args, **kwargs):
        async with contextlib.aclosing(whole_read(*args, **kwargs)) as messages:
            async for message in messages:
                yield message
                if not failed:
                    failed.append(1)
                    raise TimeoutError

    monkeypatch.setattr(reads_module, "read_log", timing_out_read)
    metrics = Metrics()

    def disconnects(reason: str) -> float:
        sample = metrics.registry.get_sample_value(
            "patchwork_bridge_stream_disconnects_total", {"reason": reason}
        )
        return sample or 0.0

    async with producer(settings), stream_role(settings, metrics) as url:
        added, _ = await publish_and_read(patchwork, url, 100)
        since = {"since": "2000-01-01T00:00:00"}
        events, resumes = await read_resuming(url, 100, params=since)
    assert event_ids(events) == [e["id"] for e in added]
    assert resumes == 1
    assert disconnects("broker") == 1
    assert disconnects("stalled") == 0


@pytest.mark.parametrize("cut", ["stream", "stream history"])
async def test_clients_live_and_catching_up_miss_nothing_when_the_roles_connection_is_cut(
    patchwork, settings, cut
):
    """``stream``: the hub's; ``stream history``: the one clients catching up read on."""
    async with producer(settings), stream_role(settings) as url:
        live = [asyncio.create_task(read_resuming(url, 400)) for _ in range(4)]
        await connected(url, 4)
        added = patchwork.add_events(200)
        since = {"since": "2000-01-01T00:00:00"}
        catching_up = [asyncio.create_task(read_resuming(url, 400, params=since)) for _ in range(4)]
        await asyncio.sleep(0.2)
        assert await cut_connection(connection_name(cut)) == 1
        added += patchwork.add_events(200)
        results = await asyncio.gather(*live, *catching_up)
    for events, _ in results:
        assert event_ids(events) == [e["id"] for e in added]


async def test_a_consumer_sees_only_the_events_it_asks_for(patchwork, settings):
    async with producer(settings), stream_role(settings) as url:
        reader = asyncio.create_task(
            read_events(url, 10, token=DPDK, params={"events": "dpdk.patch-created"})
        )
        await connected(url)
        patchwork.add_events(30, project="netdevbpf")
        wanted = patchwork.add_events(10, project="dpdk", category="patch-created")
        events = await reader
    assert event_ids(events) == [e["id"] for e in wanted]


async def test_a_position_older_than_the_log_gets_one_gap_event_then_the_oldest_on(
    amqp, exchange_name, tmp_path
):
    """A log of small segments, so that retention drops the first ones."""
    channel = await amqp.channel()
    exchange = await declare_exchange(channel, exchange_name)
    queue = await channel.declare_queue(
        log_queue(exchange_name),
        durable=True,
        arguments={
            "x-queue-type": "stream",
            "x-max-length-bytes": 40_000,
            "x-stream-max-segment-size-bytes": 10_000,
        },
    )
    await queue.bind(exchange_name, "#")
    confirmed = await amqp.channel(publisher_confirms=True)
    exchange = await confirmed.get_exchange(exchange_name)
    for n in range(400):
        body = json.dumps({"id": n, "category": "patch-created", "pad": "x" * 400}).encode()
        await exchange.publish(
            aio_pika.Message(body, message_id=str(n)), routing_key="netdevbpf.patch-created"
        )
    logged = [m async for m in read_log(amqp, exchange_name, "first", idle_end_s=0.3)]
    oldest = logged[0]
    oldest_offset = oldest.headers["x-stream-offset"]
    assert oldest_offset > 0, "retention dropped nothing; the test proves nothing"
    settings = Settings(
        exchange=exchange_name,
        stream_consumers=write_consumers(tmp_path),
        stream_host="127.0.0.1",
        stream_port=0,
    )
    async with stream_role(settings) as url:
        events = await read_events(url, 3, last_id=str(position_of(0, "0")))
    # Retention may drop another segment between the test's read and the role's (RabbitMQ
    # 4.3 does): the role serves the oldest it found, no older than the test's, no newer
    # than what the log holds after.
    logged = [m async for m in read_log(amqp, exchange_name, "first", idle_end_s=0.3)]
    after = logged[0]
    gap = json.loads(events[0].data)
    assert events[0].event == "gap"
    assert gap == {"asked": str(position_of(0, "0")), "oldest": events[1].id}
    served = int(events[1].id.split("-")[0])
    assert oldest_offset <= served <= after.headers["x-stream-offset"]
    first_id = json.loads(events[1].data)["id"]
    assert events[1].id == str(position_of(served, str(first_id)))
    assert json.loads(events[2].data)["id"] == first_id + 1  # and on from there


BAD_REQUESTS = [
    ({}, "", 401, "Authorization: Bearer"),
    ({"Authorization": "Bearer not-a-known-token-at-all"}, "", 401, "unknown token"),
    ({"Authorization": f"Basic {NIPA}"}, "", 401, "Authorization: Bearer"),
    ({"Authorization": f"Bearer {DPDK}"}, "?events=%23", 403, "may not ask for '#'"),
    ({"Authorization": f"Bearer {DPDK}"}, "?events=dpdk.%23", 403, "may not ask"),
    ({"Authorization": f"Bearer {NIPA}"}, "?project=x", 400, "unknown query key 'project'"),
    ({"Authorization": f"Bearer {NIPA}"}, "?events=a..b", 400, "bad topic pattern"),
    ({"Authorization": f"Bearer {NIPA}"}, "?since=yesterday", 400, "since: not an ISO"),
    ({"Authorization": f"Bearer {NIPA}", "Last-Event-ID": "12"}, "", 400, "not a position"),
    ({"Authorization": f"Bearer {NIPA}", "Last-Event-ID": "x-y"}, "", 400, "not a position"),
    ({}, f"?token={NIPA}", 400, "never in the URL"),
    ({}, f"?access_token={NIPA}", 400, "never in the URL"),
]
"""(headers, query, status, reason): each refused before anything is streamed."""


async def test_bad_requests_get_a_clear_4xx_and_the_token_is_never_logged(
    patchwork, settings, caplog
):
    caplog.set_level(logging.DEBUG)
    async with (
        producer(settings),
        stream_role(settings) as url,
        httpx.AsyncClient(timeout=30) as client,
    ):
        answers = [
            (await client.get(f"{url}/v1/events{query}", headers=headers), status, reason)
            for headers, query, status, reason in BAD_REQUESTS
        ]
    for answer, status, reason in answers:
        assert (answer.status_code, reason in answer.text) == (status, True), answer.text
        assert answer.text.count("\n") == 1  # one line
    ours = "\n".join(  # the client's own records (httpx logs its URLs) are not the server's
        r.getMessage() for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))
    )
    assert ours.count("refused GET /v1/events") == len(BAD_REQUESTS)
    assert NIPA not in ours and DPDK not in ours


async def test_a_position_of_another_log_or_past_its_end_is_refused(patchwork, settings):
    async with producer(settings), stream_role(settings) as url:
        reader = asyncio.create_task(read_events(url, 5))
        await connected(url)
        patchwork.add_events(5)
        events = await reader
        offset = int(events[-1].id.split("-")[0])
        async with httpx.AsyncClient(timeout=30) as client:
            other = await client.get(
                f"{url}/v1/events",
                headers={
                    "Authorization": f"Bearer {NIPA}",
                    "Last-Event-ID": str(position_of(offset, "not-this-one")),
                },
            )
            beyond = await client.get(
                f"{url}/v1/events",
                headers={
                    "Authorization": f"Bearer {NIPA}",
                    "Last-Event-ID": str(position_of(offset + 1000, "x")),
                },
            )
    assert other.status_code == 400 and "another log" in other.text
    assert beyond.status_code == 400 and "past the end" in beyond.text


async def test_a_broker_too_busy_to_answer_gets_a_503_not_a_refusal_of_the_position(
    patchwork, settings, monkeypatch
):
    """A 503 with Retry-After, counted: the client is told when to try again."""
    metrics = Metrics()
    async with producer(settings), stream_role(settings, metrics) as url:
        added, events = await publish_and_read(patchwork, url, 5)

        async def broker_sends_nothing(*args, **kwargs):
            return
            yield

        monkeypatch.setattr(reads_module, "read_log", broker_sends_nothing)
        auth = {"Authorization": f"Bearer {NIPA}"}
        async with httpx.AsyncClient(timeout=30) as client:
            resume = await client.get(
                f"{url}/v1/events", headers={**auth, "Last-Event-ID": events[2].id}
            )
            since = await client.get(
                f"{url}/v1/events", headers=auth, params={"since": added[0]["date"]}
            )
    assert resume.status_code == 503, resume.text
    assert since.status_code == 503
    assert resume.headers["Retry-After"] == since.headers["Retry-After"] == "3"
    refused = metrics.registry.get_sample_value(
        "patchwork_bridge_stream_requests_refused_total", {"status": "503"}
    )
    assert refused == 2


async def test_a_client_that_stops_reading_is_disconnected_and_the_others_go_on(
    patchwork, settings
):
    """It never reads a byte: the sockets fill, then its buffer of 50; the hub drops it."""
    settings = settings.model_copy(update={"stream_client_buffer": 50})
    metrics = Metrics()

    def dropped() -> float:
        sample = metrics.registry.get_sample_value(
            "patchwork_bridge_stream_disconnects_total", {"reason": "slow"}
        )
        return sample or 0.0

    async with producer(settings), stream_role(settings, metrics) as url:
        stuck = socket.socket()
        stuck.setsockopt(
            socket.SOL_SOCKET, socket.SO_RCVBUF, 4096
        )  # before connect: a small window
        stuck.setblocking(False)
        await asyncio.get_running_loop().sock_connect(
            stuck, ("127.0.0.1", int(url.rsplit(":", 1)[1]))
        )
        request = f"GET /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {NIPA}\r\n\r\n"
        await asyncio.get_running_loop().sock_sendall(stuck, request.encode())
        reader = asyncio.create_task(read_events(url, 6000))
        await wait_for(lambda: patchwork.events_requests > 0)
        await connected(url, 2)  # the stuck one and the reader
        added = patchwork.add_events(6000)
        events = await reader
        await wait_for(lambda: dropped() == 1, timeout=30, what="the stuck client dropped as slow")
        stuck.close()
    assert event_ids(events) == [e["id"] for e in added]
    assert (
        metrics.registry.get_sample_value("patchwork_bridge_stream_clients", {"consumer": "nipa"})
        == 0
    )
