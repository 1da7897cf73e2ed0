"""The ``checks`` role: the webhook consumer with one lane, ``<exchange>.checks``, bound to
the results exchange, whose sink posts to Patchwork. See docs/checks.md."""

from __future__ import annotations

from bridge.checks.result import QUEUE, ROUTING_PATTERN, results_exchange
from bridge.checks.sink import ChecksSink
from bridge.metrics import Metrics
from bridge.settings import Settings, SettingsError
from bridge.webhook.consumer import WebhookConsumer
from bridge.webhook.queues import LEGACY_CHECKS, QueueSet, checks_queues
from bridge.webhook.subscriptions import DEFAULT_RETRY_SCHEDULE_S, Subscription


def checks_lane(settings: Settings, retry_schedule: list[float] | None = None) -> Subscription:
    """The webhooks' default retry schedule (5 s to 10 h) unless given (tests)."""
    return Subscription(
        name=QUEUE,
        sink="checks",
        events=[ROUTING_PATTERN],
        timeout=settings.patchwork_timeout * 4,  # a series: several requests in turn
        concurrency=8,
        retry_schedule=DEFAULT_RETRY_SCHEDULE_S if retry_schedule is None else retry_schedule,
    )


def checks_settings_problems(settings: Settings) -> list[str]:
    """What posting needs and lacks: the site, and a maintainer's token."""
    problems = []
    if settings.patchwork_url is None:
        problems.append("BRIDGE_PATCHWORK_URL: required for the checks role")
    if settings.patchwork_token is None:
        problems.append("BRIDGE_PATCHWORK_TOKEN: required for the checks role")
    return problems


def build_checks_role(
    settings: Settings, metrics: Metrics, *, retry_schedule: list[float] | None = None
) -> WebhookConsumer:
    """Raises SettingsError without what posting needs."""
    problems = checks_settings_problems(settings)
    if problems:
        raise SettingsError("\n".join(problems))
    lane = (checks_lane(settings, retry_schedule), ChecksSink(settings))
    role = WebhookConsumer(
        settings,
        metrics,
        [lane],
        connection_role="checks",
        # Its lane binds the results exchange, not the events one, and is the deployment's.
        bind_exchange=results_exchange(settings.exchange),
        lane_queues=lambda _: checks_queues(settings.exchange),
        legacy_queues=lambda _: QueueSet(LEGACY_CHECKS),
        replay_routes=False,
    )
    role.name = "checks"
    return role
