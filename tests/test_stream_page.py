"""The stream's live page in a real headless Chromium (Debian's ``chromium``, driven by
Playwright): a token typed in, events published, rows appearing with links to Patchwork;
a restricted consumer's recent history, in the reader's local time, each event in words."""

from __future__ import annotations

import asyncio
import os
import shutil
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from tests.amqp_helpers import wait_for
from tests.stream_helpers import DPDK, NIPA, producer, read_events, stream_role, stream_settings

pytestmark = pytest.mark.broker

CHROMIUM = shutil.which("chromium")


needs_chromium = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),  # CI installs it: there, missing fails
    reason="Debian's chromium is not installed",
)


@needs_chromium
async def test_the_page_shows_published_events_live_with_links_to_patchwork(
    patchwork, exchange_name, tmp_path, caplog
):
    settings = stream_settings(patchwork, exchange_name, tmp_path)
    from playwright.async_api import async_playwright

    async with producer(settings), stream_role(settings) as url, async_playwright() as pw:
        assert CHROMIUM is not None, "CI: apt-get install chromium (.ci/run does)"
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = await browser.new_page()
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            await page.goto(url + "/")
            await page.fill("#token", NIPA)
            await page.fill("#events", "netdevbpf.*")
            await page.select_option("#since", "0")  # from now on: no history
            await page.click("button[type=submit]")

            async def connected() -> bool:
                return await page.text_content("#status") == "connected"

            await wait_for(connected, timeout=30, what="the page to connect")
            added = patchwork.add_events(6, project="netdevbpf")
            patchwork.add_events(3, project="dpdk")  # not asked for: never shown
            rows = page.locator("tr.event")

            async def shown() -> bool:
                return await rows.count() >= 6

            await wait_for(shown, timeout=30, what="six rows in the page")
            await asyncio.sleep(0.5)  # nothing more arrives: the dpdk events are filtered
            cells = await rows.evaluate_all(
                "rows => rows.map(r => [r.dataset.id,"
                " ...[...r.cells].slice(1).map(c => c.textContent),"
                " (r.querySelector('a') || {}).href || null])"
            )
        finally:
            await browser.close()
    newest_first = list(reversed(added))
    assert [int(c[0]) for c in cells] == [e["id"] for e in newest_first]
    for (_, project, category, what, link), event in zip(cells, newest_first, strict=True):
        assert (project, category) == ("netdevbpf", event["category"])
        thing = event["payload"].get("patch") or event["payload"].get("series") or {}
        assert link is not None and link == thing["web_url"]  # a patch-created has one
        assert what == f"new patch {thing['name']}"
    assert not any(NIPA in u for u in requests), "the token went into a URL"
    assert NIPA not in caplog.text


READER_ZONE = "America/New_York"
"""The browser's zone: not Patchwork's (the double's is Australia/Canberra), not UTC."""


def local_time(patchwork_date: str, patchwork_zone: str) -> tuple[str, str]:
    """The instant a Patchwork date names (as JavaScript's toISOString writes it), and the
    reader's wall time as Chromium's en-US medium date and time show it."""
    naive = datetime.fromisoformat(patchwork_date)
    instant = naive.replace(tzinfo=ZoneInfo(patchwork_zone)).astimezone(UTC)
    iso = instant.strftime("%Y-%m-%dT%H:%M:%S.") + f"{instant.microsecond // 1000:03d}Z"
    local = instant.astimezone(ZoneInfo(READER_ZONE))
    hour = local.hour % 12 or 12
    ampm = "AM" if local.hour < 12 else "PM"
    shown = f"{local:%b} {local.day}, {local.year}, {hour}:{local:%M:%S} {ampm} {local.tzname()}"
    return iso, shown


@needs_chromium
async def test_a_restricted_consumer_sees_recent_history_in_local_time_and_what_each_event_means(
    patchwork, exchange_name, tmp_path
):
    """Issue 29, finding 11: the dpdk consumer may see dpdk.* only. It connects at its
    first try with the page's defaults, gets the last hour at once, each row in the
    reader's own zone and in words (a check's context and state, a state's change), and a
    count."""
    settings = stream_settings(patchwork, exchange_name, tmp_path)
    from playwright.async_api import async_playwright

    async with producer(settings), stream_role(settings) as url, async_playwright() as pw:
        earlier = [
            patchwork.add_event("patch-created", "dpdk"),
            patchwork.add_event("check-created", "dpdk"),
            patchwork.add_event("patch-state-changed", "dpdk"),
        ]
        patchwork.add_event("patch-created", "netdevbpf")  # not its project: never shown
        # In the log before the page connects: history, not live events.
        await read_events(url, count=3, token=DPDK, params={"since": "2000-01-01"})
        assert CHROMIUM is not None, "CI: apt-get install chromium (.ci/run does)"
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            context = await browser.new_context(timezone_id=READER_ZONE, locale="en-US")
            page = await context.new_page()
            await page.goto(url + "/")
            assert await page.input_value("#events") == ""  # all it may see: no 403
            await page.fill("#token", DPDK)
            await page.click("button[type=submit]")
            rows = page.locator("tr.event")

            async def history_shown() -> bool:
                return await rows.count() >= 3

            await wait_for(history_shown, timeout=30, what="the last hour's three rows")
            assert await page.text_content("#status") == "connected"
            live = patchwork.add_event("series-completed", "dpdk")

            async def live_shown() -> bool:
                return await rows.count() >= 4

            await wait_for(live_shown, timeout=30, what="the live row")
            await asyncio.sleep(0.5)  # the netdevbpf event is not coming
            count = await page.text_content("#count")
            cells = await rows.evaluate_all(
                "rows => rows.map(r => [r.dataset.id, r.cells[0].dataset.instant,"
                " ...[...r.cells].map(c => c.textContent.replace(/[\\u202f\\u00a0]/g, ' '))])"
            )
        finally:
            await browser.close()
    shown = [live, *reversed(earlier)]
    assert [int(c[0]) for c in cells] == [e["id"] for e in shown]
    assert count == "4 events"
    for (_, instant, when, project, category, _what), event in zip(cells, shown, strict=True):
        assert (instant, when) == local_time(event["date"], "Australia/Canberra")
        assert (project, category) == ("dpdk", event["category"])
    whats = {int(c[0]): c[-1] for c in cells}
    check, state, series = earlier[1]["payload"], earlier[2]["payload"], live["payload"]
    c = check["check"]
    assert (
        whats[earlier[1]["id"]] == f"check {c['context']}: {c['state']} on {check['patch']['name']}"
    )
    assert whats[earlier[2]["id"]] == (
        f"{state['patch']['name']}: {state['previous_state']} \u2192 {state['current_state']}"
    )
    assert whats[live["id"]] == (
        f"series complete {series['series']['name']} v{series['series']['version']}"
    )
