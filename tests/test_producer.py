"""The producer against the Patchwork double and the real RabbitMQ: every event once, none lost."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import aio_pika
import pytest

from bridge.broker.connect import connection_name
from bridge.demo.patchwork_double import FakePatchwork
from bridge.metrics import Metrics
from bridge.producer.role import Producer
from bridge.runtime import InProcess
from bridge.settings import Settings
from tests.amqp_helpers import cut_connection, drain, wait_for

TZ = "Australia/Canberra"


def make_settings(patchwork: FakePatchwork, exchange: str, state_dir: Path, **kw) -> Settings:
    values = {
        "exchange": exchange,
        "patchwork_url": patchwork.url,
        "patchwork_timezone": TZ,
        "state_dir": state_dir,
        "poll_interval": 0.1,
        "poll_late_wait": 60.0,
        "start": "beginning",
        "patchwork_timeout": 2.0,
    }
    values.update(kw)
    return Settings(**values)


@asynccontextmanager
async def running(settings: Settings, metrics: Metrics | None = None) -> AsyncIterator[Producer]:
    """A producer running in the background; stopped the way SIGTERM stops it."""
    producer = Producer(settings, metrics or Metrics())
    async with InProcess([producer]):
        yield producer


def now_local() -> datetime:
    return datetime.now(ZoneInfo(TZ)).replace(tzinfo=None)


async def test_backlog_over_many_pages_arrives_once_with_patchworks_bytes(
    patchwork, exchange_name, bound_queue, tmp_path
):
    events = patchwork.add_events(3000)
    metrics = Metrics()
    async with running(make_settings(patchwork, exchange_name, tmp_path), metrics):
        messages = await drain(bound_queue, expected=3000)
    ids = Counter(int(m.message_id) for m in messages)
    assert set(ids) == {e["id"] for e in events}
    assert max(ids.values()) == 1
    for message in messages[::97]:
        assert message.body == patchwork.item_bytes(int(message.message_id))
        item = json.loads(message.body)
        assert message.routing_key == f"{item['project']['link_name']}.{item['category']}"
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert message.content_type == "application/json"
        assert message.type == item["category"]
        assert message.app_id == "patchwork-bridge"
        assert message.headers["ce-id"] == message.message_id
        assert message.headers["ce-source"] == f"{patchwork.url}/api/1.3"
        assert message.headers["ce-time"].endswith(("+11:00", "+10:00"))
    # 3000 events need 12 pages of 250: the producer followed Link rel="next".
    assert any(r.get("page") == "12" for r in patchwork.requests)
    reads = [r for r in patchwork.requests if r["per_page"] == "250"]
    counts = [r for r in patchwork.requests if r["per_page"] == "1"]  # the sweep's
    assert len(reads) + len(counts) == len(patchwork.requests)
    assert all(r["order"] == "date" for r in patchwork.requests)
    assert all("before" in r for r in counts)
    published = sum(
        s.value for s in metrics.events_published.collect()[0].samples if s.name.endswith("_total")
    )
    assert published == 3000


async def test_late_visible_event_with_an_older_date_is_published_once(
    patchwork, exchange_name, bound_queue, tmp_path
):
    t0 = now_local() - timedelta(seconds=30)
    early = patchwork.add_event("patch-created", "dpdk", t0)
    late = patchwork.add_event("patch-created", "dpdk", t0 + timedelta(seconds=1), visible=False)
    newer = patchwork.add_event("series-completed", "dpdk", t0 + timedelta(seconds=5))
    async with running(make_settings(patchwork, exchange_name, tmp_path)):
        first = await drain(bound_queue, expected=2)
        patchwork.make_visible(late["id"])
        second = await drain(bound_queue, expected=1)
        # A few more polls re-read the window: the late event must not come again.
        polls = patchwork.events_requests
        await wait_for_requests(patchwork, polls + 5)
        assert await drain(bound_queue, expected=0, timeout=0.5) == []
    assert [m.message_id for m in first] == [str(early["id"]), str(newer["id"])]
    assert [m.message_id for m in second] == [str(late["id"])]


async def test_a_late_event_with_no_newer_id_is_found_by_the_sweep(
    patchwork, exchange_name, bound_queue, tmp_path
):
    """The last mail of a burst commits late, dated before the newest: no id above it,
    so no gap says it is missing. The sweep (here every 2 s) reads it; the checks never
    could, and a poll from the newest date never would."""
    t0 = now_local() - timedelta(seconds=30)
    early = patchwork.add_event("patch-created", "dpdk", t0)
    newer = patchwork.add_event("series-completed", "dpdk", t0 + timedelta(seconds=5))
    last = patchwork.add_event("patch-created", "dpdk", t0 + timedelta(seconds=1), visible=False)
    settings = make_settings(patchwork, exchange_name, tmp_path, poll_sweep_interval=2.0)
    async with running(settings):
        first = await drain(bound_queue, expected=2)
        patchwork.make_visible(last["id"])
        second = await drain(bound_queue, expected=1)
        await wait_for_requests(patchwork, patchwork.events_requests + 5)
        assert await drain(bound_queue, expected=0, timeout=0.5) == []
    assert [m.message_id for m in first] == [str(early["id"]), str(newer["id"])]
    assert [m.message_id for m in second] == [str(last["id"])]


async def test_restart_mid_stream_neither_republishes_nor_skips(
    patchwork, exchange_name, bound_queue, tmp_path
):
    patchwork.add_events(1500)
    settings = make_settings(patchwork, exchange_name, tmp_path)
    async with running(settings):
        part = await drain(bound_queue, expected=300)
    # Stopped like SIGTERM: in-flight publishes finished, cursor saved. More events arrive.
    patchwork.add_events(500)
    async with running(settings):
        rest = await drain(bound_queue, expected=2000 - len(part))
        await wait_for_requests(patchwork, patchwork.events_requests + 3)
        assert await drain(bound_queue, expected=0, timeout=0.5) == []
    ids = Counter(m.message_id for m in part + rest)
    assert len(ids) == 2000
    assert max(ids.values()) == 1


@pytest.mark.parametrize("fault", ["500", "502", "html", "truncated", "404", "hang", "object"])
async def test_bad_answer_from_patchwork_is_retried_and_nothing_is_lost(
    patchwork, exchange_name, bound_queue, tmp_path, fault, caplog
):
    patchwork.add_events(300)
    patchwork.fail_next(fault, fault)
    metrics = Metrics()
    settings = make_settings(patchwork, exchange_name, tmp_path, patchwork_timeout=0.5)
    async with running(settings, metrics) as producer:
        messages = await drain(bound_queue, expected=300, timeout=30)
        await wait_for(lambda: producer.readiness()[0])
    assert len({m.message_id for m in messages}) == 300 == len(messages)
    errors = {
        s.labels["reason"]: s.value
        for s in metrics.poll_errors.collect()[0].samples
        if s.name.endswith("_total")
    }
    assert sum(errors.values()) >= 2
    assert any("poll failed" in r.getMessage() for r in caplog.records)


async def test_item_without_id_date_or_project_is_counted_and_the_rest_published(
    patchwork, exchange_name, bound_queue, tmp_path, caplog
):
    good = patchwork.add_events(3)
    stamp = now_local().isoformat()
    patchwork.add_raw_item({"category": "patch-created", "date": stamp}, stamp)
    patchwork.add_raw_item(
        {"id": 10_000, "category": "patch-created", "project": None, "date": stamp}, stamp
    )
    patchwork.add_raw_item(
        {"id": 10_001, "category": "patch-created", "project": {"link_name": "dpdk"}}, stamp
    )
    unknown = patchwork.add_event("patch-frobnicated", "dpdk")
    metrics = Metrics()
    async with running(make_settings(patchwork, exchange_name, tmp_path), metrics):
        messages = await drain(bound_queue, expected=4)
        await wait_for_requests(patchwork, patchwork.events_requests + 3)
    assert sorted(int(m.message_id) for m in messages) == sorted(
        [e["id"] for e in good] + [unknown["id"]]
    )
    assert "dpdk.patch-frobnicated" in {m.routing_key for m in messages}
    reasons = {s.labels["reason"] for s in metrics.bad_events.collect()[0].samples if s.value}
    assert reasons == {"missing_id", "missing_project", "missing_date"}
    # One line per bad item, not one per poll.
    assert sum("skipping unusable item" in r.getMessage() for r in caplog.records) == 3


async def test_start_now_publishes_only_what_happens_after_start(
    patchwork, exchange_name, bound_queue, tmp_path
):
    patchwork.add_events(40)
    settings = make_settings(patchwork, exchange_name, tmp_path, start="now")
    async with running(settings) as producer:
        await wait_for(lambda: producer.readiness()[0])
        new = patchwork.add_events(5)
        messages = await drain(bound_queue, expected=5)
    assert [m.message_id for m in messages] == [str(e["id"]) for e in new]


@pytest.mark.parametrize("bad_newest", [1, 25], ids=["newest-bad", "all-probed-bad"])
async def test_start_now_survives_unusable_newest_events(
    patchwork, exchange_name, bound_queue, tmp_path, bad_newest
):
    """A malformed newest item must not stop the producer; old events stay unpublished."""
    patchwork.add_events(40)
    stamp = now_local().isoformat()
    for _ in range(bad_newest):
        patchwork.add_raw_item({"category": "patch-created", "date": stamp}, stamp)
    settings = make_settings(patchwork, exchange_name, tmp_path, start="now")
    async with running(settings) as producer:
        await wait_for(lambda: producer.readiness()[0])
        new = patchwork.add_events(5)
        messages = await drain(bound_queue, expected=5)
        await wait_for_requests(patchwork, patchwork.events_requests + 2)
        late = await drain(bound_queue, expected=0, timeout=0.5)
    assert [m.message_id for m in messages] == [str(e["id"]) for e in new]
    assert late == []


async def test_start_at_a_date_with_a_zone_is_converted_to_server_time(
    patchwork, exchange_name, bound_queue, tmp_path
):
    base = now_local() - timedelta(hours=2)
    patchwork.add_event("patch-created", "dpdk", base)
    after = patchwork.add_event("patch-created", "dpdk", base + timedelta(hours=1))
    start = (base + timedelta(minutes=30)).replace(tzinfo=ZoneInfo(TZ)).astimezone(ZoneInfo("UTC"))
    settings = make_settings(patchwork, exchange_name, tmp_path, start=start.isoformat())
    async with running(settings):
        messages = await drain(bound_queue, expected=1)
        await wait_for_requests(patchwork, patchwork.events_requests + 2)
    assert [m.message_id for m in messages] == [str(after["id"])]
    # Never a zone suffix in since: Patchwork would answer 500.
    assert all(
        "+" not in r.get("since", "") and not r.get("since", "").endswith("Z")
        for r in patchwork.requests
    )


async def test_only_the_configured_projects_are_published(
    patchwork, exchange_name, bound_queue, tmp_path
):
    wanted = [
        patchwork.add_event("patch-created", p) for p in ("dpdk", "netdevbpf", "linux-kselftest")
    ]
    settings = make_settings(
        patchwork, exchange_name, tmp_path, patchwork_projects=["dpdk", "netdevbpf"]
    )
    async with running(settings):
        messages = await drain(bound_queue, expected=2)
        await wait_for_requests(patchwork, patchwork.events_requests + 2)
        assert await drain(bound_queue, expected=0, timeout=0.3) == []
    assert [m.message_id for m in messages] == [str(wanted[0]["id"]), str(wanted[1]["id"])]
    assert all("project" not in r for r in patchwork.requests)  # one request for all projects


async def test_broker_connection_cut_mid_stream_loses_nothing(
    patchwork, exchange_name, bound_queue, tmp_path
):
    added = {str(e["id"]) for e in patchwork.add_events(500)}
    metrics = Metrics()
    feeding = asyncio.create_task(feed(patchwork, added, batches=60, size=25))
    seen: set[str] = set()

    def arrived(count: int):
        def check(got) -> bool:
            seen.update(m.message_id for m in got[-1:])
            return len(seen) >= count

        return check

    async with running(make_settings(patchwork, exchange_name, tmp_path), metrics):
        await drain(bound_queue, expected=10**6, until=arrived(700))
        assert await cut_connection(connection_name("producer")) == 1
        await feeding
        await drain(bound_queue, expected=10**6, until=arrived(2000), timeout=60)
    assert seen == added
    assert len(added) == 2000
    published = sum(
        s.value for s in metrics.events_published.collect()[0].samples if s.name.endswith("_total")
    )
    assert published >= 2000  # some in flight at the cut may have been sent again


async def feed(patchwork: FakePatchwork, added: set[str], batches: int, size: int) -> None:
    """Patchwork receiving mail while the test runs."""
    for _ in range(batches):
        added.update(str(e["id"]) for e in patchwork.add_events(size))
        await asyncio.sleep(0.05)


async def wait_for_requests(patchwork: FakePatchwork, count: int, timeout: float = 10) -> None:
    await wait_for(lambda: patchwork.events_requests >= count, timeout)


async def test_dates_ahead_of_the_configured_zone_are_named_once(
    patchwork, exchange_name, bound_queue, tmp_path, caplog
):
    """Patchwork runs on Australia/Canberra (its default), the bridge is told UTC."""
    patchwork.add_events(3)
    settings = make_settings(patchwork, exchange_name, tmp_path, patchwork_timezone="UTC")
    async with running(settings):
        await drain(bound_queue, expected=3)
        patchwork.add_events(3)
        await drain(bound_queue, expected=3)
    warnings = [r.getMessage() for r in caplog.records if "ahead of the time now" in r.getMessage()]
    assert len(warnings) == 1
    assert "h ahead of the time now in BRIDGE_PATCHWORK_TIMEZONE=UTC" in warnings[0]
    hours = float(warnings[0].split("dated ")[1].split(" h")[0])
    assert 9.5 <= hours <= 11.5  # Canberra is UTC+10 or +11


async def test_dates_in_the_configured_zone_raise_no_warning(
    patchwork, exchange_name, bound_queue, tmp_path, caplog
):
    patchwork.add_events(3)
    async with running(make_settings(patchwork, exchange_name, tmp_path)):
        await drain(bound_queue, expected=3)
    assert not [r for r in caplog.records if "ahead of the time now" in r.getMessage()]


async def test_a_failed_cursor_write_keeps_publishing_and_is_written_again(
    patchwork, exchange_name, bound_queue, tmp_path, caplog
):
    """A disk that refuses the cursor costs readiness, not events: the producer publishes
    on, says why once, counts each failed write, and writes again once it can."""
    settings = make_settings(patchwork, exchange_name, tmp_path)
    cursor_file = tmp_path / "cursor.json"
    metrics = Metrics()
    first = patchwork.add_events(100)
    async with running(settings, metrics) as producer:
        assert len(await drain(bound_queue, expected=100)) == 100
        await wait_for(lambda: cursor_file.is_file())

        def block_the_cursor() -> bool:
            """A directory where the file goes: os.replace onto it fails, even for root."""
            cursor_file.unlink(missing_ok=True)
            try:
                cursor_file.mkdir()
            except FileExistsError:  # the writer put the file back in between
                return False
            return True

        await wait_for(block_the_cursor)
        later = patchwork.add_events(50)
        assert len(await drain(bound_queue, expected=50)) == 50
        errors = "patchwork_bridge_cursor_write_errors_total"
        await wait_for(lambda: (metrics.registry.get_sample_value(errors) or 0) >= 2)
        ready, why = producer.readiness()
        assert not ready
        assert "cannot save its cursor" in why and str(cursor_file) in why
        cursor_file.rmdir()
        await wait_for(lambda: cursor_file.is_file())
        await wait_for(lambda: producer.readiness()[0])
    warnings = [r for r in caplog.records if "cannot save the cursor" in r.getMessage()]
    assert len(warnings) == 1, "one line for the failure, not one per poll"
    assert json.loads(cursor_file.read_text())["max_id"] == max(e["id"] for e in first + later)
