"""The stream's live page in a real headless Chromium (Debian's ``chromium``, driven by
Playwright): a token typed in, events published, rows appearing with links to Patchwork."""

from __future__ import annotations

import asyncio
import os
import shutil

import pytest

from tests.amqp_helpers import wait_for
from tests.stream_helpers import NIPA, producer, stream_role, stream_settings

pytestmark = pytest.mark.broker

CHROMIUM = shutil.which("chromium")


@pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),  # CI installs it: there, missing fails
    reason="Debian's chromium is not installed",
)
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
            await page.click("button[type=submit]")
            await page.wait_for_function(
                "document.getElementById('status').textContent === 'connected'"
            )
            added = patchwork.add_events(6, project="netdevbpf")
            patchwork.add_events(3, project="dpdk")  # not asked for: never shown
            rows = page.locator("tr.event")

            async def shown() -> bool:
                return await rows.count() >= 6

            await wait_for(shown, timeout=30, what="six rows in the page")
            await asyncio.sleep(0.5)  # nothing more arrives: the dpdk events are filtered
            cells = await rows.evaluate_all(
                "rows => rows.map(r => [r.dataset.id, ...[...r.cells].map(c => c.textContent),"
                " (r.querySelector('a') || {}).href || null])"
            )
        finally:
            await browser.close()
    newest_first = list(reversed(added))
    assert [int(c[0]) for c in cells] == [e["id"] for e in newest_first]
    for (_, date, project, category, subject, link), event in zip(cells, newest_first, strict=True):
        assert (date, project, category) == (event["date"], "netdevbpf", event["category"])
        thing = event["payload"].get("patch") or event["payload"].get("series") or {}
        assert link is not None and link == thing["web_url"]  # a patch-created has one
        assert subject == thing["name"]
    assert not any(NIPA in u for u in requests), "the token went into a URL"
    assert NIPA not in caplog.text
