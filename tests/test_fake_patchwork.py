"""The Patchwork double serves the events API with the quirks of the real one."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import aiohttp
import pytest

from bridge.demo.patchwork_double import FakePatchwork, link_header

T0 = datetime(2026, 11, 24, 13, 14, 28, 163041)


@pytest.fixture
async def fake() -> AsyncIterator[FakePatchwork]:
    double = FakePatchwork()
    await double.start()
    yield double
    await double.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


async def get_events(
    http: aiohttp.ClientSession, fake: FakePatchwork, **params: str
) -> tuple[int, Any, aiohttp.ClientResponse]:
    async with http.get(f"{fake.url}/api/1.3/events/", params=params) as response:
        body = await response.read()
        is_json = response.content_type == "application/json"
        return response.status, json.loads(body) if is_json else body.decode(), response


def ids(items: list[dict[str, Any]]) -> list[int]:
    return [item["id"] for item in items]


async def test_pages_are_linked_and_per_page_is_capped_at_250(fake, http):
    added = fake.add_events(600)
    seen: list[int] = []
    url: str | None = f"{fake.url}/api/1.3/events/?order=date&per_page=1000"
    sizes = []
    while url is not None:
        async with http.get(url) as response:
            assert response.status == 200
            page = await response.json()
            sizes.append(len(page))
            seen += ids(page)
            links = response.links
            next_link = links.get("next")
            url = str(next_link["url"]) if next_link else None
            assert str(links["first"]["url"]).endswith("page=1&per_page=1000")
            assert "page=3" in str(links["last"]["url"])
    assert sizes == [250, 250, 100]
    assert seen == ids(added)


# The Link header of GET /api/1.4/events/?per_page=5&page=2, recorded from a real Patchwork.
RECORDED_LINK = (
    '<http://127.0.0.1:8000/api/1.4/events/?page=3&per_page=5>; rel="next", '
    '<http://127.0.0.1:8000/api/1.4/events/?per_page=5>; rel="prev", '
    '<http://127.0.0.1:8000/api/1.4/events/?page=1&per_page=5>; rel="first", '
    '<http://127.0.0.1:8000/api/1.4/events/?page=59&per_page=5>; rel="last"'
)


def test_link_header_matches_the_recorded_one():
    url = "http://127.0.0.1:8000/api/1.4/events/?per_page=5&page=2"
    assert link_header(url, 2, 59) == RECORDED_LINK


async def test_default_page_is_30_newest_first(fake, http):
    added = fake.add_events(40)
    status, page, _ = await get_events(http, fake)
    assert status == 200
    assert ids(page) == ids(added)[::-1][:30]


async def test_page_past_the_end_is_an_html_404(fake, http):
    fake.add_events(10)
    status, body, response = await get_events(http, fake, page="2")
    assert status == 404
    assert response.content_type == "text/html"
    assert "Not Found" in body


async def test_since_is_inclusive_and_before_is_exclusive(fake, http):
    for minute in range(5):
        fake.add_event(date=T0 + timedelta(minutes=minute))
    t2, t4 = (T0 + timedelta(minutes=2)).isoformat(), (T0 + timedelta(minutes=4)).isoformat()
    _, page, _ = await get_events(http, fake, since=t2, order="date")
    assert page[0]["date"] == t2
    assert ids(page) == [3, 4, 5]
    _, page, _ = await get_events(http, fake, since=t2, before=t4, order="date")
    assert ids(page) == [3, 4]


async def test_dates_are_naive_server_local_time_with_microseconds(fake, http):
    fake.add_event()
    _, page, _ = await get_events(http, fake)
    date = page[0]["date"]
    assert "+" not in date and not date.endswith("Z")
    assert len(date.split(".")[1]) == 6
    assert abs(datetime.fromisoformat(date) - fake.now()) < timedelta(minutes=5)


@pytest.mark.parametrize("since", ["2026-11-24T13:14:28Z", "2026-11-24T13:14:28+11:00"])
async def test_zone_suffixed_since_is_a_server_error(fake, http, since):
    fake.add_event(date=T0)
    status, body, response = await get_events(http, fake, since=since)
    assert (status, response.content_type) == (500, "text/html")
    assert "Server Error" in body


@pytest.mark.parametrize(
    "params",
    [{"since": "yesterday"}, {"project": "no-such-project"}, {"category": "patch-exploded"}],
)
async def test_invalid_filter_returns_an_empty_list(fake, http, params):
    fake.add_events(5)
    status, page, _ = await get_events(http, fake, **params)
    assert (status, page) == (200, [])


async def test_project_filter_takes_a_link_name_or_an_id(fake, http):
    fake.add_events(6)
    _, by_name, _ = await get_events(http, fake, project="dpdk")
    _, by_id, _ = await get_events(http, fake, project="3")
    assert ids(by_name) == ids(by_id) == [6, 3]
    assert {item["project"]["link_name"] for item in by_name} == {"dpdk"}


async def test_late_event_appears_only_after_make_visible_with_its_older_date(fake, http):
    late = fake.add_event(date=T0, visible=False)
    newer = fake.add_event(date=T0 + timedelta(seconds=1))
    _, page, _ = await get_events(http, fake, since=T0.isoformat(), order="date")
    assert ids(page) == [newer["id"]]
    fake.make_visible(late["id"])
    _, page, _ = await get_events(http, fake, since=T0.isoformat(), order="date")
    assert ids(page) == [late["id"], newer["id"]]
    assert late["id"] < newer["id"]


@pytest.mark.parametrize(
    ("fault", "status", "content_type"),
    [
        ("500", 500, "text/html"),
        ("502", 502, "text/html"),
        ("html", 200, "text/html"),
        ("404", 404, "text/html"),
        ("truncated", 200, "application/json"),
        ("object", 200, "application/json"),
    ],
)
async def test_each_fault_spoils_one_request_only(fake, http, fault, status, content_type):
    fake.add_events(3)
    fake.fail_next(fault)
    async with http.get(f"{fake.url}/api/1.3/events/") as response:
        assert (response.status, response.content_type) == (status, content_type)
        body = await response.read()
    if fault == "truncated":
        with pytest.raises(json.JSONDecodeError):
            json.loads(body)
    if fault == "object":
        assert isinstance(json.loads(body), dict)
    status, page, _ = await get_events(http, fake)
    assert (status, len(page)) == (200, 3)


async def test_hang_never_answers_and_does_not_hold_up_stop(http):
    double = FakePatchwork()
    await double.start()
    double.fail_next("hang", "hang")
    with pytest.raises(asyncio.TimeoutError):
        await http.get(f"{double.url}/api/1.3/events/", timeout=aiohttp.ClientTimeout(total=0.2))
    waiting = asyncio.create_task(http.get(f"{double.url}/api/1.3/events/"))
    while double.events_requests < 2:
        await asyncio.sleep(0.01)
    await asyncio.wait_for(double.stop(), timeout=5)  # a hang guard, not a speed check
    with pytest.raises(aiohttp.ClientError):
        await waiting


def test_unknown_fault_is_refused():
    with pytest.raises(ValueError, match="unknown faults"):
        FakePatchwork().fail_next("slow")


async def test_item_bytes_are_exactly_what_the_page_serves(fake, http):
    added = fake.add_events(5)
    async with http.get(f"{fake.url}/api/1.3/events/", params={"order": "date"}) as response:
        body = await response.read()
    assert body == b"[" + b",".join(fake.item_bytes(i) for i in ids(added)) + b"]"
    assert json.loads(fake.item_bytes(1)) == added[0]


async def test_a_20000_event_backlog_serves_pages(fake, http):
    added = fake.add_events(20_000)
    since = added[10_000]["date"]
    params = {"since": since, "order": "date", "per_page": "250", "page": "40"}
    status, page, response = await get_events(http, fake, **params)
    assert status == 200
    assert ids(page) == ids(added)[10_000 + 39 * 250 : 10_000 + 40 * 250]
    assert "next" not in response.links


async def test_events_added_before_start_point_to_the_server(http):
    double = FakePatchwork()
    event = double.add_event("patch-completed", project="dpdk")
    await double.start()
    try:
        served = json.loads(double.item_bytes(event["id"]))
        patch = served["payload"]["patch"]
        assert patch["url"].startswith(f"{double.url}/api/1.3/patches/")
        assert "/project/dpdk/" in patch["mbox"]
        async with http.get(patch["url"]) as response:
            assert (await response.json())["id"] == patch["id"]
        async with http.get(patch["mbox"], params={"series": "*"}) as response:
            assert response.status == 200
            assert (await response.text()).startswith("From ")
        async with http.get(served["payload"]["series"]["mbox"]) as response:
            assert (await response.text()).count("\nSubject: [PATCH") == 4
        async with http.get(served["payload"]["series"]["url"]) as response:
            assert (await response.json())["mbox"] == served["payload"]["series"]["mbox"]
    finally:
        await double.stop()


async def test_api_root_names_the_real_port(fake, http):
    async with http.get(f"{fake.url}/api/1.3/") as response:
        root = await response.json()
    assert root["events"] == f"{fake.url}/api/1.3/events/"


async def test_unknown_api_version_is_a_404(fake, http):
    async with http.get(f"{fake.url}/api/9.9/events/") as response:
        assert (response.status, response.content_type) == (404, "text/html")


async def test_unknown_category_is_a_normal_event(fake, http):
    fake.add_event("patch-teleported")
    _, page, _ = await get_events(http, fake)
    assert page[0]["category"] == "patch-teleported"
    assert "patch" in page[0]["payload"]


async def test_comment_events_exist_from_api_1_3_on(fake, http):
    fake.add_event("patch-comment-created")
    fake.add_event("patch-created")
    async with http.get(f"{fake.url}/api/1.2/events/") as response:
        assert [e["category"] for e in await response.json()] == ["patch-created"]
    _, page, _ = await get_events(http, fake)
    assert len(page) == 2


async def test_raw_items_are_served_in_date_order(fake, http):
    fake.add_event(date=T0)
    fake.add_event(date=T0 + timedelta(seconds=2))
    fake.add_raw_item({"category": "patch-created"}, (T0 + timedelta(seconds=1)).isoformat())
    _, page, _ = await get_events(http, fake, order="date")
    assert [item.get("id") for item in page] == [1, None, 2]


async def test_token_is_required_when_configured(http):
    double = FakePatchwork(token="s3cret")
    await double.start()
    try:
        async with http.get(f"{double.url}/api/1.3/events/") as response:
            assert response.status == 401
        headers = {"Authorization": "Token s3cret"}
        async with http.get(f"{double.url}/api/1.3/events/", headers=headers) as response:
            assert response.status == 200
    finally:
        await double.stop()


async def test_requests_are_recorded(fake, http):
    await get_events(http, fake, since="2026-11-24T00:00:00", per_page="250")
    assert fake.events_requests == 1
    assert fake.requests == [{"since": "2026-11-24T00:00:00", "per_page": "250"}]


async def test_cli_serves_seeded_events_and_adds_more_until_sigterm(http):
    command = [sys.executable, "-m", "bridge.demo.patchwork_double", "--port", "0", "--seed", "50"]
    with subprocess.Popen(
        [*command, "--rate", "50"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    ) as process:
        try:
            url = (await asyncio.to_thread(process.stdout.readline)).strip()
            counts: list[int] = []
            deadline = asyncio.get_running_loop().time() + 20
            while not counts or counts[-1] <= 50:
                assert asyncio.get_running_loop().time() < deadline, counts
                params = {"per_page": "250"}
                async with http.get(f"{url}/api/1.3/events/", params=params) as response:
                    counts.append(len(await response.json()))
                await asyncio.sleep(0.1)
            assert counts[0] >= 50
            process.terminate()
            assert await asyncio.to_thread(process.wait, 10) == 0
        finally:
            if process.poll() is None:
                process.kill()
