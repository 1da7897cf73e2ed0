"""The ``checks`` role: the delivery engine with one lane, ``<exchange>.checks``, bound to the
results exchange, whose sink posts to Patchwork. See docs/checks.md."""

from __future__ import annotations

from bridge.checks.result import QUEUE, ROUTING_PATTERN, results_exchange
from bridge.checks.sink import ChecksSink
from bridge.delivery.engine import DeliveryRole
from bridge.delivery.queues import LEGACY_CHECKS, QueueSet, checks_queues
from bridge.delivery.spec import LaneSpec
from bridge.metrics import Metrics
from bridge.settings import Settings, SettingsError
from bridge.webhook.subscriptions import DEFAULT_RETRY_SCHEDULE_S

ROLE = "checks"
CONCURRENCY = 8


def checks_lane(settings: Settings, retry_schedule: list[float] | None = None) -> LaneSpec:
    """The webhooks' default retry schedule (5 s to 10 h) unless given (tests)."""
    schedule = DEFAULT_RETRY_SCHEDULE_S if retry_schedule is None else retry_schedule
    return LaneSpec(
        name=QUEUE,
        queues=checks_queues(settings.exchange),
        exchange=results_exchange(settings.exchange),
        patterns=(ROUTING_PATTERN,),
        retry_schedule=tuple(schedule),
        concurrency=CONCURRENCY,
        timeout_s=settings.patchwork_timeout * 4,  # a series: several requests in turn
        legacy=QueueSet(LEGACY_CHECKS),
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
) -> DeliveryRole:
    """Raises SettingsError without what posting needs."""
    problems = checks_settings_problems(settings)
    if problems:
        raise SettingsError("\n".join(problems))
    lane = (checks_lane(settings, retry_schedule), ChecksSink(settings))
    return DeliveryRole(ROLE, settings, metrics, [lane])
