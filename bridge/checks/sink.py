"""Posting one result to Patchwork: a sink of the webhook machinery, so retries, dead
letters, Retry-After and the metrics are the webhooks' own (the lane ``checks``).

Each result becomes one check per patch (a series' result: one on every patch of it).
A result delivered twice makes one check: before posting, the newest check of that
patch and context is compared, and an identical one is left alone. Every request to
Patchwork waits its turn under BRIDGE_CHECKS_RATE.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import aiohttp

from bridge.checks.result import CheckResult, InvalidResult, parse_result
from bridge.events import user_agent
from bridge.settings import Settings
from bridge.sinks.base import Delivered, Delivery, GiveUp, Outcome, RetryLater
from bridge.webhook.retry import parse_retry_after

CHECK_FIELDS = ("state", "context", "target_url", "description")


class RateLimit:
    """At most ``per_s`` requests a second, in order of asking, across every delivery."""

    def __init__(self, per_s: float) -> None:
        self._interval_s = 1.0 / per_s
        self._next = 0.0

    async def turn(self) -> None:
        now = time.monotonic()
        wait_s = self._next - now
        self._next = max(now, self._next) + self._interval_s
        if wait_s > 0:
            await asyncio.sleep(wait_s)


class Refused(Exception):
    """Patchwork answered with an error: the outcome it means for the result."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome)
        self.outcome = outcome


class ChecksSink:
    enforces_timeout = True

    def __init__(self, settings: Settings) -> None:
        if settings.patchwork_token is None:
            raise ValueError("BRIDGE_PATCHWORK_TOKEN: required to create checks")
        self._api = settings.api_base
        self._rate = RateLimit(settings.checks_rate)
        self._timeout = aiohttp.ClientTimeout(total=settings.patchwork_timeout)
        self._headers = {
            "Accept": "application/json",
            "Authorization": f"Token {settings.patchwork_token.get_secret_value()}",
            "User-Agent": user_agent("checks"),
        }
        self._session: aiohttp.ClientSession | None = None

    async def deliver(self, delivery: Delivery) -> Outcome:
        try:
            result = parse_result(delivery.body)
        except InvalidResult as exc:
            return GiveUp("invalid", f"not a check result: {exc}")
        try:
            patches = [result.patch] if result.patch is not None else await self._patches_of(result)
            for patch in patches:
                await self._post_once(patch, result)
        except Refused as refused:
            return refused.outcome
        except (aiohttp.ClientError, TimeoutError) as exc:
            reason = "timeout" if isinstance(exc, TimeoutError) else "connect"
            return RetryLater(reason, f"Patchwork at {self._api}: {type(exc).__name__}")
        return Delivered(201)

    async def _patches_of(self, result: CheckResult) -> list[int]:
        series = await self._call("GET", f"/series/{result.series}/")
        patches = [p["id"] for p in series.get("patches", []) if isinstance(p.get("id"), int)]
        if not patches:
            raise Refused(GiveUp("empty_series", f"series {result.series} has no patches"))
        return patches

    async def _post_once(self, patch: int, result: CheckResult) -> None:
        wanted = result.model_dump(include=set(CHECK_FIELDS))
        checks = await self._call("GET", f"/patches/{patch}/checks/?per_page=250")
        same_context = [c for c in checks if c.get("context") == result.context]
        newest = max(
            same_context, key=lambda c: (c.get("date") or "", c.get("id") or 0), default=None
        )
        if newest is not None and all(newest.get(k) == wanted[k] for k in CHECK_FIELDS):
            return  # delivered before: the check is there
        body = {k: v for k, v in wanted.items() if v is not None}
        await self._call("POST", f"/patches/{patch}/checks/", body)

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        await self._rate.turn()
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        async with self._session.request(
            method, self._api + path, json=body, allow_redirects=False
        ) as response:
            if response.status < 300:
                return await response.json(content_type=None)
            text = (await response.text(errors="replace"))[:200].replace("\n", " ")
            raise Refused(_outcome(method, path, response, text))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def _age(check: dict[str, Any]) -> tuple[str, int]:
    return (check.get("date") or "", check.get("id") or 0)


def _outcome(method: str, path: str, response: aiohttp.ClientResponse, text: str) -> Outcome:
    status = response.status
    where = f"{method} {path}: {status}"
    if status in (429, 503):
        delay_s = parse_retry_after(response.headers.get("Retry-After"), datetime.now(UTC))
        return RetryLater(f"http_{status}", where, delay_s=delay_s, status=status)
    if status >= 500:
        return RetryLater("http_5xx", where, status=status)
    if status == 403:
        return GiveUp(
            "forbidden",
            f"{where}: the user of BRIDGE_PATCHWORK_TOKEN may not create checks here "
            f"(it must maintain the project): {text}",
            status=status,
        )
    return GiveUp(f"http_{status // 100}xx", f"{where}: {text}", status=status)
