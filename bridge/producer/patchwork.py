"""Patchwork's REST events API: one request per page, every project at once, ``Link`` paging.

Errors come back classified (``PatchworkError.reason`` is a metric label); the
poll loop decides when to retry. Nothing here retries by itself.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client import Histogram
from yarl import URL

from bridge.events import BadPage, split_array, user_agent
from bridge.settings import Settings

# Patchwork silently caps per_page at 250; asking for more would only hide that.
PAGE_SIZE = 250


class PatchworkError(Exception):
    """A failed request; ``reason`` is one of metrics.POLL_ERROR_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(slots=True)
class Page:
    items: list[tuple[Any, str]]
    """(parsed item, exact item text) in the order Patchwork served them."""
    next_url: str | None
    url: str = field(repr=False, default="")
    last_page: int | None = None
    """The page number of ``rel="last"``, when the server sends it."""


class PatchworkClient:
    """Owns one aiohttp session; ``close()`` it (or use ``async with``)."""

    def __init__(self, settings: Settings, request_duration: Histogram | None = None) -> None:
        """``request_duration`` observes each request, answer read, in seconds."""
        self._request_duration = request_duration
        self._events_url = f"{settings.api_base}/events/"
        self._timeout = aiohttp.ClientTimeout(
            total=settings.patchwork_timeout, connect=min(10.0, settings.patchwork_timeout)
        )
        # Which bridge process polls, for Patchwork's admins (and for one poller at a time).
        self._headers = {"Accept": "application/json", "User-Agent": user_agent()}
        if settings.patchwork_token is not None:
            self._headers["Authorization"] = f"Token {settings.patchwork_token.get_secret_value()}"
        # No project filter even for one project: ids come from one sequence for all
        # projects, and the window finds late events as gaps in that sequence.
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> PatchworkClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _params(
        self, since: str | None, order: str, per_page: int, before: str | None = None
    ) -> dict[str, str]:
        params = {"order": order, "per_page": str(per_page)}
        # Naive server-local time, verbatim: a zone suffix makes Patchwork answer 500.
        if since is not None:
            params["since"] = since  # inclusive
        if before is not None:
            params["before"] = before  # exclusive
        return params

    async def pages(self, since: str | None, before: str | None = None) -> AsyncIterator[Page]:
        """Every page of events with ``since <= date < before`` in ascending date order."""
        page = await self._get(self._events_url, self._params(since, "date", PAGE_SIZE, before))
        yield page
        while page.next_url is not None:
            page = await self._get(page.next_url, None)
            yield page

    async def count(self, since: str, before: str) -> tuple[int | None, Page]:
        """How many events have ``since <= date < before``, and the oldest of them: a
        one-event page, which costs Patchwork one event at most.

        Read from the ``rel="last"`` link (Patchwork counts the rows for every page
        anyway). None when the server sends no such link (older ones).
        """
        page = await self._get(self._events_url, self._params(since, "date", 1, before))
        if page.last_page is not None:
            return (page.last_page if page.items else 0), page
        return (len(page.items) if page.next_url is None else None), page

    async def newest(self, count: int) -> list[tuple[Any, str]]:
        """The ``count`` newest visible events, newest first (none when Patchwork has none)."""
        page = await self._get(self._events_url, self._params(None, "-date", count))
        return page.items

    async def _get(self, url: str, params: dict[str, str] | None) -> Page:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout, headers=self._headers, raise_for_status=False
            )
        started = time.monotonic()
        try:
            async with self._session.get(url, params=params, allow_redirects=False) as response:
                if not 200 <= response.status < 300:
                    raise PatchworkError(
                        "http_5xx" if response.status >= 500 else "http_4xx",
                        f"HTTP {response.status} from {_path(url)}",
                    )
                text = await response.text(encoding="utf-8", errors="strict")
                next_url = _link(response, "next")
                last_url = _link(response, "last")
        except TimeoutError:
            raise PatchworkError("timeout", f"no answer from {_path(url)} in time") from None
        except UnicodeDecodeError:
            raise PatchworkError("bad_json", f"body of {_path(url)} is not UTF-8") from None
        except aiohttp.ClientPayloadError as exc:
            raise PatchworkError("bad_page", f"body of {_path(url)} cut short: {exc}") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise PatchworkError("connect", f"{type(exc).__name__} for {_path(url)}") from None
        if self._request_duration is not None:
            self._request_duration.observe(time.monotonic() - started)
        try:
            items = await _split(text)
        except BadPage as exc:
            raise PatchworkError("bad_json", f"{_path(url)}: {exc}") from None
        return Page(items, str(next_url) if next_url else None, url, _page_number(last_url))


async def _split(text: str) -> list[tuple[Any, str]]:
    # A 250-item page parses in a few ms; only a huge body is worth a thread.
    if len(text) > 4_000_000:
        return await asyncio.to_thread(split_array, text)
    return split_array(text)


def _link(response: aiohttp.ClientResponse, rel: str) -> str | None:
    """The target of the ``Link`` header's ``rel`` (RFC 8288), if there is one."""
    link = response.links.get(rel)
    return None if link is None else str(link.get("url"))


def _page_number(url: object) -> int | None:
    if url is None:
        return None
    page = URL(str(url)).query.get("page", "1")
    return int(page) if page.isdigit() else None


def _path(url: str) -> str:
    """The URL without its query, which may carry filters but never needs to be logged."""
    return url.split("?", 1)[0]
