"""An in-process Patchwork double: the events API with every quirk the bridge must survive.

Built from the responses recorded from a real Patchwork (``bridge/demo/data/``), it serves
``/api/{version}/events/`` the way Patchwork 1.3/1.4 under Django REST framework does:
naive server-local dates, inclusive ``since``, exclusive ``before``, ``per_page`` capped at
250, ``Link`` paging, HTTP 404 past the last page, HTTP 500 for a zone-suffixed date, ``[]``
for an invalid filter, and events that become visible after newer ones were already read.
Tests, ``patchwork-bridge demo`` and the benchmarks use it;
``python -m bridge.demo.patchwork_double`` serves one on its own (the compose file's demo profile).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import hmac
import itertools
import logging
import math
import random
import re
import signal
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from aiohttp import web

from bridge.demo.patchwork_checks import FakeChecks
from bridge.demo.patchwork_store import (
    CATEGORIES,
    COMMENT_CATEGORIES,
    RECORDED_ROOT,
    EventStore,
    StoredItem,
    render,
)

log = logging.getLogger(__name__)

DEFAULT_PER_PAGE = 30
MAX_PER_PAGE = 250
FAULTS = frozenset({"500", "502", "html", "truncated", "404", "hang", "object"})
# Keys of a project that the list shows but events do not embed.
_HTML_NOT_FOUND = (
    '<!doctype html>\n<html lang="en">\n<head>\n  <title>Not Found</title>\n</head>\n<body>\n'
    "  <h1>Not Found</h1><p>The requested resource was not found on this server.</p>\n"
    "</body>\n</html>\n"
)
_HTML_SERVER_ERROR = (
    '<!doctype html>\n<html lang="en">\n<head>\n  <title>Server Error (500)</title>\n</head>\n'
    "<body>\n  <h1>Server Error (500)</h1><p></p>\n</body>\n</html>\n"
)
_HTML_BAD_GATEWAY = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)
_HTML_MAINTENANCE = (
    "<!DOCTYPE html>\n<html><head><title>Patchwork maintenance</title></head>\n"
    "<body><h1>Down for maintenance</h1><p>Back soon.</p></body></html>\n"
)


class _Invalid(Exception):
    """A filter value Patchwork's filter form rejects: the answer is ``[]`` with HTTP 200."""


class _Crash(Exception):
    """A value Patchwork passes to the database unchecked, which then raises: HTTP 500."""


def _parse_date(value: str | None) -> datetime | None:
    if not value:
        return None  # django-filter ignores an empty value
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise _Invalid(value) from None
    if parsed.tzinfo is not None:
        # USE_TZ=False: an aware datetime reaches the database adapter, which raises.
        raise _Crash(value)
    return parsed


def _with_param(url: str, key: str, value: str | None) -> str:
    """DRF's replace_query_param/remove_query_param: other params kept, sorted by name."""
    scheme, netloc, path, query, fragment = urlsplit(url)
    params = parse_qs(query, keep_blank_values=True)
    if value is None:
        params.pop(key, None)
    else:
        params[key] = [value]
    return urlunsplit(
        (scheme, netloc, path, urlencode(sorted(params.items()), doseq=True), fragment)
    )


def link_header(url: str, page: int, num_pages: int) -> str:
    """The ``Link`` header of ``page``, shaped like the recorded one: next, prev, first, last."""
    links = []
    if page < num_pages:
        links.append((_with_param(url, "page", str(page + 1)), "next"))
    if page > 1:
        # Like DRF: the link back to page 1 drops the page parameter instead of saying 1.
        links.append((_with_param(url, "page", str(page - 1) if page > 2 else None), "prev"))
    links.append((_with_param(url, "page", "1"), "first"))
    links.append((_with_param(url, "page", str(num_pages)), "last"))
    return ", ".join(f'<{target}>; rel="{rel}"' for target, rel in links)


class FakePatchwork(EventStore):
    """The double. ``start()`` serves it on loopback; ``stop()`` closes it, hung requests too.

    Events may be added before or after ``start()``; URLs inside items point to this server
    once it is started (or to ``public_url`` when given, e.g. the compose demo's published port).
    """

    def __init__(
        self,
        *,
        tz: str = "Australia/Canberra",
        api_version: str = "1.3",
        projects: Sequence[str] = ("netdevbpf", "linux-kselftest", "dpdk"),
        token: str | None = None,
        public_url: str | None = None,
        maintainers: Mapping[str, set[str]] | None = None,
    ) -> None:
        """``maintainers``: token -> projects its user maintains, for the checks API."""
        super().__init__(tz=tz, api_version=api_version, projects=projects, public_url=public_url)
        self.checks = FakeChecks(self, maintainers or {})
        self.series_patches: dict[int, list[int]] = {}
        """A series' patch ids; a series not named here has the recorded four."""
        self.series_projects: dict[int, str] = {}
        """A series' project; series not named here are netdevbpf's, as recorded. A patch's
        is ``checks.patch_projects``'s."""
        self._token = token
        self._url: str | None = None
        self._faults: deque[str] = deque()
        self._stopping = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.requests: list[dict[str, str]] = []
        self.events_requests = 0
        self.events_served = 0
        """Items served by ``/events/`` so far, over all requests."""

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("FakePatchwork is not started")
        return self._url

    def fail_next(self, *faults: str) -> None:
        """Queue faults for the next ``/events/`` requests, one per request (see FAULTS)."""
        unknown = set(faults) - FAULTS
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; known: {sorted(FAULTS)}")
        self._faults.extend(faults)

    # -- serving ------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on ``host:port`` (0: any free port); returns the site root URL."""
        app = web.Application(middlewares=[self._gate])
        api = r"/api/{version:1\.[0-4]}"  # Patchwork's URL patterns: another version is a 404
        app.router.add_get("/api/", self._api_root_handler)
        app.router.add_get(api + "/", self._api_root_handler)
        app.router.add_get(api + "/events/", self._events, name="events")
        app.router.add_get(api + "/projects/", self._projects_handler)
        app.router.add_get(api + "/series/{id:[0-9]+}/", self._series_handler)
        app.router.add_get(api + "/patches/{id:[0-9]+}/", self._patch_handler)
        self.checks.routes(app, api)
        app.router.add_get("/series/{id:[0-9]+}/mbox/", self._series_mbox)
        app.router.add_get("/project/{project}/{kind:patch|cover}/{msgid}/mbox/", self._mbox)
        self._stopping.clear()
        # A small shutdown_timeout: a "hang" request must never hold stop() up.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound_port = self._runner.addresses[0][1]
        client_host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host  # noqa: S104
        self._url = f"http://{client_host}:{bound_port}"
        self._rebase(self._public_url or self._url)
        return self._url

    async def stop(self) -> None:
        """Close the server and every connection; the store is kept, so start() may follow."""
        self._stopping.set()  # wakes "hang" handlers first, so nothing waits for them
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _gate(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.match_info.route.name == "events":
            self.events_requests += 1
            self.requests.append(dict(request.query))
        if self._token is not None and request.method == "GET":
            expected = f"Token {self._token}".encode()
            if not hmac.compare_digest(request.headers.get("Authorization", "").encode(), expected):
                return web.json_response(
                    {"detail": "Invalid token."}, status=401, headers={"WWW-Authenticate": "Token"}
                )
        try:
            return await handler(request)
        except web.HTTPNotFound:
            return _html(_HTML_NOT_FOUND, 404)  # Django's page, not aiohttp's

    async def _events(self, request: web.Request) -> web.StreamResponse:
        version = request.match_info["version"]
        if self._faults:
            return await self._fault(self._faults.popleft(), request)
        try:
            selected = await self.select(request.query, version)
        except _Invalid:
            selected = []
        except _Crash:
            return _html(_HTML_SERVER_ERROR, 500)
        per_page = _per_page(request.query.get("per_page"))
        num_pages = max(1, math.ceil(len(selected) / per_page))
        page = _page_number(request.query.get("page") or "1", num_pages)
        if page is None:
            return _html(_HTML_NOT_FOUND, 404)
        start, end = (page - 1) * per_page, min(page * per_page, len(selected))
        if _descending(request.query.get("order")):
            chunk = selected[len(selected) - end : len(selected) - start][::-1]
        else:
            chunk = selected[start:end]
        self.events_served += len(chunk)
        await self.served(request, len(selected), len(chunk))
        return web.Response(
            body=b"[" + b",".join(item.body for item in chunk) + b"]",
            content_type="application/json",
            headers={
                "Link": link_header(str(request.url), page, num_pages),
                "Vary": "Accept, Cookie",
                "Allow": "GET, HEAD, OPTIONS",
            },
        )

    async def served(self, request: web.Request, rows: int, items: int) -> None:
        """Called for each ``/events/`` page served, before it is sent: ``rows`` matched the
        filters, ``items`` are on the page. Nothing here; a test or a benchmark charges
        Patchwork's serving cost in a subclass (tests/patchwork_cost.py)."""

    async def select(self, query: Any, version: str) -> list[StoredItem]:
        """The items a query selects, ascending by date. A test's double whose events live
        elsewhere (a database) answers here."""
        return self._select(query, version)

    def _select(self, query: Any, version: str) -> list[StoredItem]:
        """Visible items matching the filters, ascending by date; bisect for since/before."""
        since, before = _parse_date(query.get("since")), _parse_date(query.get("before"))
        lo = bisect.bisect_left(self._keys, (since,)) if since else 0
        hi = bisect.bisect_left(self._keys, (before,)) if before else len(self._keys)
        tests: list[Callable[[StoredItem], bool]] = []
        if project := query.get("project"):
            link_name = self._project_link(project)
            tests.append(lambda item: item.project == link_name)
        if category := query.get("category"):
            if category not in CATEGORIES:
                raise _Invalid(category)  # a ChoiceFilter
            tests.append(lambda item: item.category == category)
        if version < "1.3":  # comment events exist from API 1.3 on
            tests.append(lambda item: item.category not in COMMENT_CATEGORIES)
        window = self._visible[lo:hi]
        if not tests:
            return window
        return [item for item in window if all(test(item) for test in tests)]

    def _project_link(self, value: str) -> str:
        """Patchwork's project filter takes a link_name or a numeric id."""
        for project in self._project_list:
            if value in (project["link_name"], str(project["id"])):
                return str(project["link_name"])
        raise _Invalid(value)

    async def _fault(self, fault: str, request: web.Request) -> web.StreamResponse:
        if fault == "hang":
            # Never answer; when the double stops, drop the connection without a response.
            await self._stopping.wait()
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError
        if fault == "truncated":
            whole = b"[" + b",".join(item.body for item in self._visible[-3:]) + b"]"
            cut = whole[: len(whole) // 2] if len(whole) > 2 else b'[{"id":1,"categ'
            return web.Response(body=cut, content_type="application/json")
        if fault == "object":
            return web.json_response({"detail": "A server error occurred."})
        pages = {
            "500": (_HTML_SERVER_ERROR, 500),
            "502": (_HTML_BAD_GATEWAY, 502),
            "html": (_HTML_MAINTENANCE, 200),
            "404": (_HTML_NOT_FOUND, 404),
        }
        return _html(*pages[fault])

    async def _api_root_handler(self, request: web.Request) -> web.Response:
        version = request.match_info.get("version")
        prefix = f"/api/{version}/" if version else "/api/"
        body = render(self._api_root).decode().replace(f"/api/{self.api_version}/", prefix)
        return _json_text(body.replace(RECORDED_ROOT, self._root))

    async def _projects_handler(self, request: web.Request) -> web.Response:
        return _json_text(render(self._project_list).decode().replace(RECORDED_ROOT, self._root))

    async def _series_handler(self, request: web.Request) -> web.Response:
        series_id = int(request.match_info["id"])
        patches = self._series["patches"]
        if series_id in self.series_patches:
            template = patches[0]
            patches = [{**template, "id": i} for i in self.series_patches[series_id]]
        series = {
            **self._series,
            "project": self._project(self.series_projects.get(series_id, "netdevbpf")),
            "patches": patches,
            "id": series_id,
            "url": f"{RECORDED_ROOT}/api/{self.api_version}/series/{series_id}/",
            "web_url": f"{RECORDED_ROOT}/project/netdevbpf/list/?series={series_id}",
            "mbox": f"{RECORDED_ROOT}/series/{series_id}/mbox/",
        }
        return _json_text(render(series).decode().replace(RECORDED_ROOT, self._root))

    async def _patch_handler(self, request: web.Request) -> web.Response:
        patch_id = int(request.match_info["id"])
        patch = {
            **self._patch,
            "project": self._project(self.checks.project_of(patch_id)),
            "id": patch_id,
            "url": f"{RECORDED_ROOT}/api/{self.api_version}/patches/{patch_id}/",
            "comments": f"{RECORDED_ROOT}/api/patches/{patch_id}/comments/",
            "checks": f"{RECORDED_ROOT}/api/patches/{patch_id}/checks/",
        }
        return _json_text(render(patch).decode().replace(RECORDED_ROOT, self._root))

    async def _series_mbox(self, request: web.Request) -> web.Response:
        return _mbox_response(self._mbox_text(self._series["patches"]))

    async def _mbox(self, request: web.Request) -> web.Response:
        """A patch's mbox; with ``?series=*``, preceded by the earlier patches of its series."""
        msgid = f"<{request.match_info['msgid']}>"
        patches = self._series["patches"]
        ids = [p["msgid"] for p in patches]
        if request.match_info["kind"] == "patch" and msgid in ids:
            index = ids.index(msgid)
            chosen = patches[: index + 1] if "series" in request.query else [patches[index]]
        else:
            chosen = [{**self._patch, "msgid": msgid}]
        return _mbox_response(self._mbox_text(chosen))

    def _mbox_text(self, patches: Iterable[dict[str, Any]]) -> str:
        headers, body = self._patch["headers"], self._patch["content"]
        messages = []
        for patch in patches:
            match = re.fullmatch(r"\[([^\]]*)\] (.*)", patch["name"])
            subject = f"[PATCH {match[1].replace(',', ' ')}] {match[2]}" if match else patch["name"]
            messages.append(
                f"From {self._patch['hash']} Mon Sep 17 00:00:00 2001\n"
                f"From: {headers['From']}\nDate: {headers['Date']}\nSubject: {subject}\n"
                f"Message-Id: {patch['msgid']}\nList-Id: {headers['List-Id']}\n"
                f"X-Patchwork-Id: {patch['id']}\n\n{body}\n\n{self._patch['diff']}\n"
            )
        return "\n".join(messages)


def _html(text: str, status: int) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html")


def _json_text(text: str) -> web.Response:
    return web.Response(body=text.encode(), content_type="application/json")


def _mbox_response(text: str) -> web.Response:
    return web.Response(
        text=text,
        content_type="text/plain",
        headers={"Content-Disposition": "attachment; filename=patch.mbox"},
    )


def _per_page(value: str | None) -> int:
    """DRF: a positive integer, silently capped at 250; anything else means the default."""
    try:
        per_page = int(value or "")
    except ValueError:
        return DEFAULT_PER_PAGE
    return min(per_page, MAX_PER_PAGE) if per_page > 0 else DEFAULT_PER_PAGE


def _page_number(value: str, num_pages: int) -> int | None:
    """The 1-based page, or None for a page Django's paginator rejects (HTTP 404)."""
    if value == "last":
        return num_pages
    try:
        page = int(value)
    except ValueError:
        return None
    return page if 1 <= page <= num_pages else None


def _descending(order: str | None) -> bool:
    """DRF's OrderingFilter over ``date`` only; an unknown field falls back to ``-date``."""
    fields = [f.strip() for f in (order or "").split(",") if f.strip().lstrip("-") == "date"]
    return not fields or fields[0].startswith("-")


# -- command line: python -m bridge.demo.patchwork_double -------------------------------------


def seed(fake: FakePatchwork, n: int) -> None:
    """Add ``n`` events of every recorded category, one second apart, ending now."""
    now = fake.now()
    categories = itertools.cycle(CATEGORIES)
    for i in range(n):
        fake.add_event(next(categories), date=now - timedelta(seconds=n - i))


async def feed(fake: FakePatchwork, rate: float, late_fraction: float, rng: random.Random) -> None:
    """Add ``rate`` events per second; a fraction commits late, visible one tick after insert."""
    loop = asyncio.get_running_loop()
    categories = itertools.cycle(CATEGORIES)
    tick_s = max(1.0 / rate, 0.05)
    started, added = loop.time(), 0
    late: list[int] = []
    while True:
        await asyncio.sleep(tick_s)
        fake.make_visible(*late)
        late = []
        due = int((loop.time() - started) * rate) - added
        for _ in range(due):
            hidden = rng.random() < late_fraction
            event = fake.add_event(next(categories), visible=not hidden)
            if hidden:
                late.append(event["id"])
        added += due


async def serve(args: argparse.Namespace) -> None:
    fake = FakePatchwork(
        tz=args.tz, api_version=args.api_version, token=args.token, public_url=args.public_url
    )
    seed(fake, args.seed)
    url = await fake.start(args.host, args.port)
    print(url, flush=True)  # the first line of output: how tests and scripts find the port
    log.info("fake patchwork serving at %s with %d events, %s new/s", url, args.seed, args.rate)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    feeder = None
    if args.rate > 0:
        rng = random.Random(args.seed)  # noqa: S311 - demo traffic, not cryptography
        feeder = asyncio.create_task(feed(fake, args.rate, args.late, rng))
    try:
        await stop.wait()
    finally:
        if feeder is not None:
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)
        await fake.stop()
    log.info("fake patchwork stopped")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bridge.demo.patchwork_double",
        description="Serve a Patchwork events API double seeded from recorded events.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--seed", type=int, default=0, help="events present at start")
    parser.add_argument("--rate", type=float, default=0.0, help="new events per second")
    parser.add_argument("--late", type=float, default=0.05, help="fraction committed late")
    parser.add_argument("--tz", default="Australia/Canberra", help="the server's TIME_ZONE")
    parser.add_argument("--api-version", default="1.3")
    parser.add_argument("--token", default=None, help="require Authorization: Token <key>")
    parser.add_argument("--public-url", default=None, help="site root written into item URLs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
