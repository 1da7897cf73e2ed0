"""What the checks ask of Patchwork: whose project a patch or series is, a series' patches,
a patch's checks, and the POST that creates one. Every request waits its turn under one
rate limit; an error answer is raised as ``Refused`` with the outcome it means."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp

from bridge.checks.result import CheckResult
from bridge.events import user_agent
from bridge.settings import Settings
from bridge.sinks.base import GiveUp, Outcome, RetryLater
from bridge.sinks.retry_after import parse_retry_after

PROJECTS_KEPT = 10_000
"""Patches and series whose project is remembered: it never changes, and asking again
would cost Patchwork a request for every result."""


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
    """Patchwork answered with an error, or the result may not be posted: the outcome."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome)
        self.outcome = outcome


@dataclass(frozen=True, slots=True)
class Target:
    """Where a result lands: its project as Patchwork says, and the patches to check."""

    project: str
    patches: list[int]


class PatchworkChecks:
    """Owns one aiohttp session (created on first use); ``close()`` it."""

    def __init__(self, settings: Settings, rate: RateLimit | None = None) -> None:
        self._api = settings.api_base
        self._rate = rate or RateLimit(settings.checks_rate)
        self._timeout = aiohttp.ClientTimeout(total=settings.patchwork_timeout)
        self._headers = {"Accept": "application/json", "User-Agent": user_agent("checks")}
        if settings.patchwork_token is not None:
            token = settings.patchwork_token.get_secret_value()
            self._headers["Authorization"] = f"Token {token}"
        self._session: aiohttp.ClientSession | None = None
        self._targets: OrderedDict[tuple[str, int], Target] = OrderedDict()

    @property
    def api(self) -> str:
        return self._api

    async def target(self, result: CheckResult, project: str) -> Target:
        """The result's patches, once Patchwork says they are ``project``'s: raises Refused
        (``wrong_project``, naming both) for a patch or series of another project.

        The bridge's token may maintain several projects: this is what keeps a CI allowed
        one project from posting checks on another's patches through it."""
        kind, number = (
            ("patch", result.patch) if result.patch is not None else ("series", result.series)
        )
        assert number is not None
        key = (kind, number)
        target = self._targets.get(key)
        if target is None:
            target = await self._read_target(kind, number)
            self._targets[key] = target
            if len(self._targets) > PROJECTS_KEPT:
                self._targets.popitem(last=False)
        if target.project != project:
            raise Refused(
                GiveUp(
                    "wrong_project",
                    f"{kind} {number} belongs to project {target.project!r}, not to "
                    f"{project!r} named by the result; no check created",
                )
            )
        return target

    async def _read_target(self, kind: str, number: int) -> Target:
        path = f"/patches/{number}/" if kind == "patch" else f"/series/{number}/"
        found = await self.call("GET", path)
        project = (found.get("project") or {}).get("link_name") if isinstance(found, dict) else None
        if not isinstance(project, str):
            raise Refused(GiveUp("invalid", f"GET {path}: no project in Patchwork's answer"))
        if kind == "patch":
            return Target(project, [number])
        patches = [p["id"] for p in found.get("patches", []) if isinstance(p.get("id"), int)]
        if not patches:
            raise Refused(GiveUp("empty_series", f"series {number} has no patches"))
        return Target(project, patches)

    async def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One request to ``<api>/<path>``; its JSON answer, or Refused for an error status.
        aiohttp's errors and TimeoutError pass through: the caller retries those."""
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
            session, self._session = self._session, None
            await session.close()


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
    if status == 404 and method == "GET":
        return GiveUp("not_found", f"{where}: no such patch or series", status=status)
    return GiveUp(f"http_{status // 100}xx", f"{where}: {text}", status=status)
