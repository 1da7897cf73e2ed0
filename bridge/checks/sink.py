"""Posting one result to Patchwork: a sink of the webhook machinery, so retries, dead
letters, Retry-After and the metrics are the webhooks' own (the checks lane).

Each result becomes one check per patch (a series' result: one on every patch of it), and
only on patches of the project its routing key names (``<project>.check``), as Patchwork
says: a result naming another project is dead-lettered, nothing posted. A result delivered
twice makes one check: before posting, the newest check of that patch and context is
compared, and an identical one is left alone. Every request to Patchwork waits its turn
under BRIDGE_CHECKS_RATE.
"""

from __future__ import annotations

import aiohttp

from bridge.checks.patchwork import PatchworkChecks, Refused
from bridge.checks.result import CheckResult, InvalidResult, parse_result
from bridge.metrics import CHECKS_FAILURE_REASONS
from bridge.settings import Settings
from bridge.sinks.base import Delivered, Delivery, GiveUp, Outcome, RetryLater

CHECK_FIELDS = ("state", "context", "target_url", "description")


class ChecksSink:
    enforces_timeout = True
    failure_reasons = (
        "timeout",
        "connect",
        "http_4xx",
        "http_5xx",
        "http_429",
        "invalid",
        "sink_error",
        *CHECKS_FAILURE_REASONS,
    )
    """Exported at 0 from the start (``Metrics.lane_started``)."""

    def __init__(self, settings: Settings) -> None:
        if settings.patchwork_token is None:
            raise ValueError("BRIDGE_PATCHWORK_TOKEN: required to create checks")
        self._patchwork = PatchworkChecks(settings)

    async def deliver(self, delivery: Delivery) -> Outcome:
        try:
            result = parse_result(delivery.body)
        except InvalidResult as exc:
            return GiveUp("invalid", f"not a check result: {exc}")
        project, _, check = delivery.routing_key.rpartition(".")
        if check != "check" or not project or "." in project:
            return GiveUp("invalid", f"routing key {delivery.routing_key!r} is not <project>.check")
        try:
            target = await self._patchwork.target(result, project)
            for patch in target.patches:
                await self._post_once(patch, result)
        except Refused as refused:
            return refused.outcome
        except (aiohttp.ClientError, TimeoutError) as exc:
            reason = "timeout" if isinstance(exc, TimeoutError) else "connect"
            return RetryLater(reason, f"Patchwork at {self._patchwork.api}: {type(exc).__name__}")
        return Delivered(201)

    async def _post_once(self, patch: int, result: CheckResult) -> None:
        wanted = result.model_dump(include=set(CHECK_FIELDS))
        checks = await self._patchwork.call("GET", f"/patches/{patch}/checks/?per_page=250")
        same_context = [c for c in checks if c.get("context") == result.context]
        newest = max(
            same_context, key=lambda c: (c.get("date") or "", c.get("id") or 0), default=None
        )
        if newest is not None and all(newest.get(k) == wanted[k] for k in CHECK_FIELDS):
            return  # delivered before: the check is there
        body = {k: v for k, v in wanted.items() if v is not None}
        await self._patchwork.call("POST", f"/patches/{patch}/checks/", body)

    async def close(self) -> None:
        await self._patchwork.close()
