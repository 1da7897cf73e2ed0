"""The webhook role: the delivery engine with one lane per subscription of
BRIDGE_SUBSCRIPTIONS, each with the sink its table names (see docs/webhooks.md)."""

from __future__ import annotations

from aio_pika.abc import AbstractChannel, AbstractQueue

from bridge.broker.topology import QueueType
from bridge.delivery.breaker import BreakerSpec
from bridge.delivery.engine import DeliveryRole
from bridge.delivery.queues import declare_lane, legacy_subscription_queues, subscription_queues
from bridge.delivery.spec import LaneSpec
from bridge.metrics import Metrics
from bridge.settings import Settings
from bridge.sinks.registry import load_sink
from bridge.webhook.subscriptions import Subscription

ROLE = "webhook"


def lane_of(exchange: str, subscription: Subscription) -> LaneSpec:
    """A subscription's lane in the deployment of ``exchange``."""
    return LaneSpec(
        name=subscription.name,
        queues=subscription_queues(exchange, subscription.name),
        exchange=exchange,
        patterns=tuple(subscription.events),
        retry_schedule=tuple(subscription.retry_schedule),
        concurrency=subscription.concurrency,
        timeout_s=subscription.timeout,
        replay_from=exchange,
        legacy=legacy_subscription_queues(subscription.name),
        breaker=BreakerSpec(
            subscription.breaker_failures,
            subscription.breaker_probe,
            subscription.breaker_probe_max,
        ),
        rate=subscription.rate,
    )


def build_webhook_role(
    settings: Settings, metrics: Metrics, subscriptions: list[Subscription]
) -> DeliveryRole:
    """Raises SettingsError for a sink that cannot be built."""
    lanes = [(lane_of(settings.exchange, s), load_sink(s)) for s in subscriptions]
    return DeliveryRole(ROLE, settings, metrics, lanes)


async def declare_subscription(
    channel: AbstractChannel, exchange: str, subscription: Subscription, queue_type: QueueType
) -> AbstractQueue:
    """A subscription's queues, bound, as its lane declares them (the producer declares
    them before its first publish, so the events of a first start are queued)."""
    lane = lane_of(exchange, subscription)
    return await declare_lane(
        channel,
        exchange,
        lane.queues,
        lane.patterns,
        lane.retry_schedule,
        queue_type,
        replay_from=lane.replay_from,
    )
