"""The publisher on its own: confirms, counts and failures, never an exception for the broker's."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from zoneinfo import ZoneInfo

import aio_pika
import pytest

from bridge.demo.patchwork_double import FakePatchwork
from bridge.events import Event, parse_event
from bridge.metrics import Metrics
from bridge.producer import publisher as publisher_module
from bridge.producer.publisher import Publisher
from tests.amqp_helpers import drain

TZ = ZoneInfo("Australia/Canberra")
SOURCE = "https://patchwork.example/api/1.3"


def events_of(fake: FakePatchwork, *kinds: tuple[str, str]) -> list[Event]:
    items = [fake.add_event(category, project) for category, project in kinds]
    return [parse_event(item, fake.item_bytes(item["id"]).decode()) for item in items]


def sample(metrics: Metrics, name: str, labels: dict[str, str]) -> float | None:
    return metrics.registry.get_sample_value(f"patchwork_bridge_{name}", labels)


async def test_every_event_is_confirmed_routed_and_counted_by_project_and_category(
    amqp: aio_pika.abc.AbstractConnection, exchange_name: str, bound_queue: str
) -> None:
    fake = FakePatchwork(tz="Australia/Canberra")
    events = events_of(
        fake,
        *[("patch-created", "netdevbpf")] * 3,
        ("series-completed", "netdevbpf"),
        ("patch-created", "dpdk"),
    )
    channel = await amqp.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(exchange_name)
    metrics = Metrics()
    result = await Publisher(exchange, SOURCE, TZ, metrics, max_in_flight=2).publish(events)

    assert result.confirmed == events and result.failed == []
    got = await drain(bound_queue, len(events))
    assert [m.message_id for m in got] == [e.message_id for e in events]  # in order
    assert [m.body for m in got] == [e.body for e in events]
    assert {m.routing_key for m in got} == {
        "netdevbpf.patch-created",
        "netdevbpf.series-completed",
        "dpdk.patch-created",
    }
    published = "events_published_total"
    assert sample(metrics, published, {"project": "netdevbpf", "category": "patch-created"}) == 3
    assert sample(metrics, published, {"project": "netdevbpf", "category": "series-completed"}) == 1
    assert sample(metrics, published, {"project": "dpdk", "category": "patch-created"}) == 1
    await channel.close()


async def test_a_channel_the_broker_closed_fails_the_publishes_without_raising(
    amqp: aio_pika.abc.AbstractConnection, exchange_name: str
) -> None:
    """No such exchange: the broker closes the channel; the producer gets reasons, not a crash."""
    fake = FakePatchwork(tz="Australia/Canberra")
    events = events_of(fake, ("patch-created", "netdevbpf"), ("patch-created", "dpdk"))
    channel = await amqp.channel(publisher_confirms=True)
    missing = await channel.get_exchange(exchange_name, ensure=False)
    metrics = Metrics()
    result = await Publisher(missing, SOURCE, TZ, metrics, max_in_flight=10).publish(events)

    assert result.confirmed == []
    assert [e for e, _ in result.failed] == events
    assert {reason for _, reason in result.failed} == {"connection"}
    assert sample(metrics, "publish_failures_total", {"reason": "connection"}) == 2


class _NeverConfirms:
    """An underlying channel whose publishes are never confirmed."""

    def __init__(self) -> None:
        self.cancelled = 0

    async def basic_publish(self, body: bytes, **_: object) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


def _exchange_over(underlay: _NeverConfirms) -> SimpleNamespace:
    async def get_underlay_channel() -> _NeverConfirms:
        return underlay

    return SimpleNamespace(
        name="never", channel=SimpleNamespace(get_underlay_channel=get_underlay_channel)
    )


async def test_publishes_not_confirmed_in_time_are_reported_as_timeouts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(publisher_module, "CONFIRM_TIMEOUT_S", 0.2)
    underlay = _NeverConfirms()
    events = events_of(FakePatchwork(), *[("patch-created", "netdevbpf")] * 4)
    metrics = Metrics()
    publisher = Publisher(_exchange_over(underlay), SOURCE, TZ, metrics, max_in_flight=10)  # type: ignore[arg-type]

    result = await publisher.publish(events)

    assert result.confirmed == []
    assert result.failed == [(e, "timeout") for e in events]
    assert sample(metrics, "publish_failures_total", {"reason": "timeout"}) == 4
    assert underlay.cancelled == 4  # none left waiting behind our back


async def test_cancelling_a_publish_cancels_every_message_it_started() -> None:
    underlay = _NeverConfirms()
    events = events_of(FakePatchwork(), *[("patch-created", "netdevbpf")] * 3)
    publisher = Publisher(_exchange_over(underlay), SOURCE, TZ, Metrics(), max_in_flight=10)  # type: ignore[arg-type]
    task = asyncio.create_task(publisher.publish(events))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)  # the cancelled publishes run their handlers
    assert underlay.cancelled == 3
