"""Properties of what the bridge parses from outside: pages, Link headers, dates, TOML, patterns.

Generated input, checked against what must hold for every input, not a few examples.
The example tests in test_events.py, test_window.py and test_subscriptions.py cover the
documented cases; these look for the input nobody thought of. ``max_examples`` is kept
modest so the file runs in seconds.
"""

from __future__ import annotations

import base64
import json
import math
import re
import string
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.demo.patchwork_double import CATEGORIES
from bridge.events import BadPage, ce_time, parse_event, split_array
from bridge.producer.cursor import Cursor
from bridge.producer.patchwork import PAGE_SIZE, PatchworkClient
from bridge.producer.window import Window
from bridge.settings import Settings, SettingsError
from bridge.topics import TopicMatcher, check_pattern, matches
from bridge.webhook.subscriptions import MAX_RETRY_DELAY_S, Subscription, load_subscriptions

FAST = settings(max_examples=60, deadline=None)
# Examples share the test's tmp_path: each writes its own file, nothing carries over.
FILES = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# -- Patchwork pages ------------------------------------------------------------------------

# Text as mail subjects and names carry it: any code point JSON can hold, emoji included.
any_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
json_leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | any_text
)
payloads = st.recursive(
    json_leaves,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3),
    max_leaves=10,
)
link_names = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,15}", fullmatch=True)
naive_dates = st.datetimes(datetime(2008, 1, 1), datetime(2100, 1, 1))


def date_text(when: datetime) -> str:
    """As Patchwork (DRF) writes a date: naive, and without a fraction when it is zero."""
    return when.isoformat()


events = st.fixed_dictionaries(
    {
        "id": st.integers(1, 2**53),
        "url": st.just("http://patchwork.example/api/1.3/events/1/"),
        "project": st.fixed_dictionaries(
            {"id": st.integers(1, 10**6), "link_name": link_names, "name": any_text}
        ),
        "category": st.sampled_from(CATEGORIES) | link_names,
        "date": naive_dates.map(date_text),
        "actor": st.none() | st.fixed_dictionaries({"id": st.integers(1), "name": any_text}),
        "payload": st.dictionaries(any_text, payloads, max_size=4),
    }
)
separators = st.sampled_from([(",", ":"), (", ", ": ")])
whitespace = st.sampled_from(["", " ", "\n", "\r\n  ", "\t"])


@given(st.lists(events, max_size=8), st.booleans(), separators, st.lists(whitespace, min_size=3))
@FAST
def test_each_event_of_a_page_keeps_the_exact_bytes_patchwork_sent(
    items: list[dict[str, Any]], ascii_only: bool, sep: tuple[str, str], gaps: list[str]
) -> None:
    texts = [json.dumps(i, ensure_ascii=ascii_only, separators=sep) for i in items]
    page = "[" + gaps[0] + (gaps[1] + "," + gaps[2]).join(texts) + gaps[0] + "]"
    parsed = split_array(page)
    assert len(parsed) == len(items)
    for item, text, (value, raw) in zip(items, texts, parsed, strict=True):
        event = parse_event(value, raw)
        assert event.body == text.encode("utf-8")  # never re-serialised
        assert json.loads(event.body) == item
        assert event.id == item["id"]
        assert event.routing_key == f"{item['project']['link_name']}.{item['category']}"
        assert event.date == item["date"]
        assert event.when == datetime.fromisoformat(item["date"])
        assert event.when.tzinfo is None


@given(st.lists(events, min_size=1, max_size=4), separators, st.data())
@FAST
def test_a_page_cut_anywhere_is_a_bad_page_never_a_shorter_list(
    items: list[dict[str, Any]], sep: tuple[str, str], data: st.DataObject
) -> None:
    page = json.dumps(items, ensure_ascii=False, separators=sep)
    cut = data.draw(st.integers(0, len(page) - 1), label="cut")
    with pytest.raises(BadPage):
        split_array(page[:cut])


# -- Link headers, through the real client -----------------------------------------------------

link_styles = st.fixed_dictionaries(
    {
        "order": st.permutations(["next", "prev", "first", "last"]),
        "quoted": st.booleans(),
        "space": st.sampled_from(["", " ", "  "]),
        "lines": st.booleans(),  # one Link header per link instead of one joined header
        "relative": st.booleans(),  # a URL reference relative to the request, as RFC 8288 allows
    }
)


def link_header_of(url: str, path: str, page: int, pages: int, style: dict[str, Any]) -> list[str]:
    """The Link header(s) of ``page``, written in ``style``; URLs keep the request's query."""
    base, _, query = url.partition("?")
    params = {k: v for k, v in (p.split("=", 1) for p in query.split("&") if p)}

    def target(n: int) -> str:
        query = "&".join(f"{k}={v}" for k, v in sorted({**params, "page": str(n)}.items()))
        return f"{path if style['relative'] else base}?{query}"

    pages_of = {"next": page + 1, "prev": page - 1, "first": 1, "last": pages}
    links = []
    for rel in style["order"]:
        if (rel == "next" and page >= pages) or (rel == "prev" and page <= 1):
            continue
        value = f'"{rel}"' if style["quoted"] else rel
        links.append(f"<{target(pages_of[rel])}>;{style['space']}rel={value}")
    return links if style["lines"] else [("," + style["space"]).join(links)]


@given(
    st.integers(0, 3 * PAGE_SIZE + 1),
    link_styles,
    st.sampled_from(["", "/patchwork"]),
    st.none() | naive_dates.map(date_text),
    st.none() | naive_dates.map(date_text),
)
@FAST
async def test_the_client_follows_next_links_to_every_item_in_order(
    count: int, style: dict[str, Any], prefix: str, since: str | None, before: str | None
) -> None:
    items = [f'{{"id":{i},"n":"\\u00e9{i}"}}' for i in range(count)]
    pages = max(1, -(-count // PAGE_SIZE))
    seen_queries: list[dict[str, str]] = []

    async def events(request: web.Request) -> web.Response:
        seen_queries.append(dict(request.query))
        page = int(request.query.get("page", "1"))
        if not 1 <= page <= pages:
            return web.Response(status=404, text="<h1>Not Found</h1>", content_type="text/html")
        chunk = items[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]
        response = web.Response(text="[" + ",".join(chunk) + "]", content_type="application/json")
        for value in link_header_of(str(request.url), request.path, page, pages, style):
            response.headers.add("Link", value)
        return response

    app = web.Application()
    app.router.add_get(prefix + "/api/1.3/events/", events)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    root = f"http://127.0.0.1:{runner.addresses[0][1]}{prefix}"
    got: list[str] = []
    try:
        settings_ = Settings(patchwork_url=root, patchwork_timeout=5)
        async with PatchworkClient(settings_) as client:
            async for page in client.pages(since, before):
                got += [raw for _, raw in page.items]
    finally:
        await runner.cleanup()
    assert got == items
    assert len(seen_queries) == pages  # each page once, never the 404 past the end
    first = seen_queries[0]
    assert first.get("since") == since and first.get("before") == before
    assert "project" not in first  # one id sequence for all projects: never filtered
    for n, query in enumerate(seen_queries, start=1):
        # Every filter survives the round trip through the Link header unchanged.
        assert {k: v for k, v in query.items() if k != "page"} == first
        assert query.get("page", "1") == str(n)


# -- dates -------------------------------------------------------------------------------------

overlaps_s = st.floats(0, 7 * 86400) | st.integers(0, 3600).map(float)


@given(st.lists(naive_dates, min_size=1, max_size=5), overlaps_s, st.booleans())
@FAST
def test_since_is_always_a_naive_date_patchwork_accepts(
    dates: list[datetime], overlap_s: float, whole_seconds: bool
) -> None:
    if whole_seconds:
        dates = [d.replace(microsecond=0) for d in dates]
    window = Window(Cursor(), overlap_s)
    confirmed = [_event(i, d) for i, d in enumerate(dates)]
    window.confirm(confirmed)
    for w in (window, Window(Cursor.from_json(window.cursor().to_json()), overlap_s)):
        since = w.since()
        assert since is not None
        parsed = datetime.fromisoformat(since)
        # A zone suffix makes Patchwork answer HTTP 500.
        assert parsed.tzinfo is None and not since.endswith("Z")
        assert parsed == max(dates) + timedelta(microseconds=1)  # just after the newest
        sweep = w.sweep_range()
        if timedelta(seconds=overlap_s):  # below a microsecond, there is no overlap
            assert sweep is not None
            assert datetime.fromisoformat(sweep[0]) == max(dates) - timedelta(seconds=overlap_s)
        else:  # no overlap: only the newest date itself, for an event sharing it
            assert sweep == (max(dates).isoformat(), since)
        assert all(not w.is_new(e) for e in confirmed)
        w.prune()  # the window start is inclusive: the newest event is never pruned
        assert not w.is_new(confirmed[dates.index(max(dates))])


def test_a_date_with_a_zone_survives_a_restart_of_the_window() -> None:
    """parse_event accepts a zone-suffixed date (and drops the zone); the cursor keeps the
    text, so a restarted producer must cope with it too."""
    window = Window(Cursor(), 60)
    window.confirm([_event(1, "2026-11-24T13:14:28+00:00")])
    restarted = Window(Cursor.from_json(window.cursor().to_json()), 60)
    restarted.prune()
    assert not restarted.is_new(_event(1, "2026-11-24T13:14:28+00:00"))


# Zones with DST, half-hour and 45-minute offsets, a 30-minute DST shift (Lord Howe),
# southern-hemisphere DST, and a zone that skipped a whole day (Apia, 2011).
ZONES = [
    "UTC",
    "Australia/Canberra",
    "Australia/Lord_Howe",
    "America/New_York",
    "America/St_Johns",
    "America/Sao_Paulo",
    "Europe/London",
    "Europe/Berlin",
    "Asia/Kolkata",
    "Asia/Kathmandu",
    "Asia/Tehran",
    "Pacific/Chatham",
    "Pacific/Apia",
    "Africa/Casablanca",
]
RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?[+-]\d\d:\d\d")


@cache
def transitions(zone: str) -> tuple[datetime, ...]:
    """UTC instants in 2010-2030 where the zone's offset changes, to the second."""
    tz = ZoneInfo(zone)
    found = []
    day = datetime(2010, 1, 1, tzinfo=UTC)
    while day.year < 2031:
        nxt = day + timedelta(days=1)
        if day.astimezone(tz).utcoffset() != nxt.astimezone(tz).utcoffset():
            lo, hi = day, nxt
            while hi - lo > timedelta(seconds=1):
                mid = lo + (hi - lo) / 2
                same = mid.astimezone(tz).utcoffset() == lo.astimezone(tz).utcoffset()
                lo, hi = (mid, hi) if same else (lo, mid)
            found.append(hi)
        day = nxt
    return tuple(found)


@st.composite
def server_instants(draw: st.DrawFn) -> tuple[str, datetime]:
    """A zone and an instant, often within two hours of one of its offset changes."""
    zone = draw(st.sampled_from(ZONES))
    near = transitions(zone)
    if near and draw(st.booleans()):
        instant = draw(st.sampled_from(near)) + draw(
            st.timedeltas(timedelta(hours=-2), timedelta(hours=2))
        )
    else:
        instant = draw(st.datetimes(datetime(2008, 1, 1), datetime(2100, 1, 1))).replace(tzinfo=UTC)
    return zone, instant


@given(server_instants(), st.booleans())
@settings(max_examples=200, deadline=None)
def test_ce_time_has_an_offset_and_names_the_instant_patchwork_meant(
    zone_instant: tuple[str, datetime], whole_seconds: bool
) -> None:
    zone, instant = zone_instant
    if whole_seconds:
        instant = instant.replace(microsecond=0)
    tz = ZoneInfo(zone)
    # What Patchwork writes: the server's wall clock at that instant, without a zone.
    local = instant.astimezone(tz)
    written = local.replace(tzinfo=None).isoformat()
    stamped = ce_time(written, tz)
    assert RFC3339.fullmatch(stamped), stamped
    parsed = datetime.fromisoformat(stamped)
    assert parsed.utcoffset() is not None
    assert parsed.replace(tzinfo=None) == local.replace(tzinfo=None)  # the wall time, verbatim
    assert parsed.astimezone(tz).replace(tzinfo=None) == local.replace(tzinfo=None)
    # Compared in UTC: Python's == is always False between zones for a time in a fold.
    other_fold = local.replace(fold=1 - local.fold)
    if other_fold.utcoffset() == local.utcoffset():
        assert parsed.astimezone(UTC) == instant
    else:
        # The hour that repeats when clocks go back: the text cannot say which one Patchwork
        # meant; the bridge names the first, consistently.
        assert parsed.astimezone(UTC) == local.replace(fold=0).astimezone(UTC)


@given(st.sampled_from(ZONES), naive_dates)
@FAST
def test_ce_time_of_any_naive_date_is_rfc3339_with_the_same_wall_time(
    zone: str, when: datetime
) -> None:
    """Even a wall time the zone skipped (never written by Patchwork) gets a valid stamp."""
    stamped = ce_time(when.isoformat(), ZoneInfo(zone))
    assert RFC3339.fullmatch(stamped), stamped
    assert datetime.fromisoformat(stamped).replace(tzinfo=None) == when


def _event(event_id: int, when: datetime | str):  # type: ignore[no-untyped-def]
    date = when if isinstance(when, str) else date_text(when)
    item = {"id": event_id, "category": "patch-created", "project": {"link_name": "dpdk"}}
    item["date"] = date
    return parse_event(item, json.dumps(item))


# -- the subscriptions file --------------------------------------------------------------------

names = st.from_regex(r"[a-z0-9-]{1,20}", fullmatch=True)
words = st.from_regex(r"[A-Za-z0-9_-]{1,8}", fullmatch=True)
patterns = st.lists(words | st.sampled_from(["*", "#"]), min_size=1, max_size=4).map(".".join)
hosts = st.sampled_from(
    ["ci.example.org", "127.0.0.1", "[::1]", "xn--bcher-kva.example", "localhost", "a-b.c-d.io"]
)
urls = st.builds(
    lambda scheme, host, port, path, query: f"{scheme}://{host}{port}/{path}{query}",
    st.sampled_from(["http", "https"]),
    hosts,
    st.sampled_from(["", ":8080", ":1"]),
    st.text(string.ascii_letters + string.digits + "-._~/%é", max_size=20),
    st.sampled_from(["", "?key=abc", "?a=1&b=%20"]),
)
secrets = st.binary(min_size=24, max_size=64).map(
    lambda key: "whsec_" + base64.b64encode(key).decode()
)
delays = st.floats(0.001, MAX_RETRY_DELAY_S) | st.integers(1, 36000)
webhooks = st.fixed_dictionaries(
    {"url": urls},
    optional={
        "events": st.lists(patterns, min_size=1, max_size=3),
        "secret": secrets,
        "bearer_token": st.from_regex(r"[A-Za-z0-9._~+/=-]{1,40}", fullmatch=True),
        "timeout": st.floats(0.001, 3600) | st.integers(1, 3600),
        "concurrency": st.integers(1, 1000),
        "retry_schedule": st.lists(delays, max_size=8),
        "allow_private_network": st.booleans(),
    },
)


def on_this_host(fields: dict[str, Any]) -> bool:
    return urlsplit(fields["url"]).hostname in {"127.0.0.1", "::1", "localhost"}


def reachable(fields: dict[str, Any]) -> dict[str, Any]:
    """A receiver on this host is valid only where the file allows it."""
    if on_this_host(fields):
        return {**fields, "allow_private_network": True}
    return fields


files = st.lists(st.tuples(names, webhooks.map(reachable)), max_size=4, unique_by=lambda t: t[0])
# Keys a webhook table does not know; quoted TOML keys may hold anything, even dots.
unknown_keys = (
    words | st.text(st.characters(exclude_categories=("Cs", "Cc")), min_size=1, max_size=10)
).filter(lambda key: key not in Subscription.model_fields)
toml_values = st.integers(-(2**63), 2**63 - 1) | st.booleans() | any_text | st.lists(st.integers())


def toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else toml_value(key)


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        # A TOML basic string: json escapes C0 controls; TOML also forbids a raw DEL.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return str(value)


def toml_file(tables: list[tuple[str, dict[str, object]]]) -> str:
    out = []
    for name, fields in tables:
        out.append("[[webhook]]")
        out.append(f"name = {toml_value(name)}")
        out += [f"{toml_key(k)} = {toml_value(v)}" for k, v in fields.items()]
        out.append("")
    return "\n".join(out)


@given(files)
@FILES
def test_every_valid_subscriptions_file_loads_as_written(
    tmp_path: Path, tables: list[tuple[str, dict[str, Any]]]
) -> None:
    path = tmp_path / "subscriptions.toml"
    path.write_text(toml_file(tables), encoding="utf-8")
    loaded = load_subscriptions(path)
    assert [s.name for s in loaded] == [name for name, _ in tables]
    for subscription, (_, fields) in zip(loaded, tables, strict=True):
        assert subscription.url == fields["url"]
        assert subscription.events == fields.get("events", ["#"])
        for key in ("timeout", "concurrency", "retry_schedule", "allow_private_network"):
            if key in fields:
                assert getattr(subscription, key) == fields[key]
        for key in ("secret", "bearer_token"):
            value = getattr(subscription, key)
            assert (value.get_secret_value() if value else None) == fields.get(key)
            if key in fields:
                assert repr(value) == "SecretStr('**********')"  # never shown


@given(files.filter(lambda tables: any(on_this_host(f) for _, f in tables)), st.data())
@FILES
def test_a_receiver_on_this_host_without_allow_private_network_is_named(
    tmp_path: Path, tables: list[tuple[str, dict[str, Any]]], data: st.DataObject
) -> None:
    local = [i for i, (_, fields) in enumerate(tables) if on_this_host(fields)]
    index = data.draw(st.sampled_from(local), label="table")
    name, fields = tables[index]
    tables[index] = (name, {**fields, "allow_private_network": False})
    path = tmp_path / "subscriptions.toml"
    path.write_text(toml_file(tables), encoding="utf-8")
    with pytest.raises(SettingsError) as raised:
        load_subscriptions(path)
    (line,) = str(raised.value).splitlines()
    assert line.startswith(f"{path}: webhook {name!r}: url: ")
    assert line.endswith("set allow_private_network = true to deliver there")


@given(files.filter(bool), st.data())
@FILES
def test_an_unknown_key_anywhere_is_one_line_naming_file_subscription_and_key(
    tmp_path: Path, tables: list[tuple[str, dict[str, Any]]], data: st.DataObject
) -> None:
    index = data.draw(st.integers(0, len(tables) - 1), label="table")
    key = data.draw(unknown_keys, label="key")
    name, fields = tables[index]
    tables[index] = (name, {**fields, key: data.draw(toml_values, label="value")})
    path = tmp_path / "subscriptions.toml"
    path.write_text(toml_file(tables), encoding="utf-8")
    with pytest.raises(SettingsError) as caught:
        load_subscriptions(path)
    assert str(caught.value).splitlines() == [f"{path}: webhook '{name}': {key}: unknown key"]


def test_an_unknown_key_with_a_line_break_is_still_one_line(tmp_path: Path) -> None:
    path = tmp_path / "subscriptions.toml"
    path.write_text('[[webhook]]\nname = "ci"\nurl = "https://x.example/"\n"colour\\nforged" = 1\n')
    with pytest.raises(SettingsError) as caught:
        load_subscriptions(path)
    (line,) = str(caught.value).splitlines()
    assert line.startswith(f"{path}: webhook 'ci': ") and line.endswith(": unknown key")


@pytest.mark.parametrize(
    ("key", "value", "runs"),
    [
        pytest.param(
            "concurrency",
            65536,
            lambda s: s.concurrency <= 65535,  # AMQP basic.qos prefetch-count is a short
            id="concurrency-65536",
        ),
        pytest.param(
            "timeout",
            float("inf"),
            lambda s: math.isfinite(s.timeout),  # aiohttp cannot schedule an infinite timeout
            id="timeout-inf",
        ),
    ],
)
def test_a_subscription_that_loads_is_one_the_consumer_can_run(
    tmp_path: Path, key: str, value: object, runs: Any
) -> None:
    """Whatever passes start-up validation must work: refuse it there, with a line."""
    path = tmp_path / "subscriptions.toml"
    path.write_text(toml_file([("ci", {"url": "https://x.example/", key: value})]))
    try:
        (subscription,) = load_subscriptions(path)
    except SettingsError as exc:
        assert f"webhook 'ci': {key}: " in str(exc)
        return
    assert runs(subscription)


# -- routing patterns --------------------------------------------------------------------------


def reference_match(pattern: list[str], words: list[str]) -> bool:
    """AMQP topic matching by its definition: ``*`` one word, ``#`` zero or more."""
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return reference_match(rest, words) or (bool(words) and reference_match(pattern, words[1:]))
    if not words:
        return False
    return (head in ("*", words[0])) and reference_match(rest, words[1:])


key_words = st.sampled_from(["netdevbpf", "dpdk", "patch-created", "series-completed", "a", ""])
routing_keys = st.lists(key_words, min_size=1, max_size=6).map(".".join).filter(bool)
topic_patterns = st.lists(
    st.sampled_from(["netdevbpf", "dpdk", "patch-created", "series-completed", "a", "*", "#"]),
    min_size=1,
    max_size=6,
).map(".".join)


@given(topic_patterns, routing_keys)
@settings(max_examples=500, deadline=None)
def test_topic_matching_agrees_with_the_definition(pattern: str, key: str) -> None:
    check_pattern(pattern)  # every generated pattern is one the bridge accepts
    assert matches(pattern, key) == reference_match(pattern.split("."), key.split("."))


@given(st.lists(topic_patterns, max_size=4), routing_keys)
@FAST
def test_a_subscription_matches_when_any_of_its_patterns_does(
    patterns: list[str], key: str
) -> None:
    assert TopicMatcher(patterns)(key) == any(matches(p, key) for p in patterns)


@given(st.lists(st.sampled_from(["#", "*", "a"]), min_size=20, max_size=40), st.booleans())
@settings(max_examples=30, deadline=None)
def test_long_patterns_full_of_hashes_match_like_the_definition(
    pattern: list[str], ends_in_b: bool
) -> None:
    """Many ``#`` against a long key: where a backtracking matcher would take forever."""
    key = ".".join(["a"] * 60 + (["b"] if ends_in_b else []))
    assert matches(".".join(pattern), key) == _memoised_match(pattern, key)


def _memoised_match(pattern: list[str], key: str) -> bool:
    """``reference_match`` with memory, so long inputs stay affordable."""
    words = key.split(".")

    @cache
    def at(i: int, j: int) -> bool:
        if i == len(pattern):
            return j == len(words)
        if pattern[i] == "#":
            return at(i + 1, j) or (j < len(words) and at(i, j + 1))
        return j < len(words) and pattern[i] in ("*", words[j]) and at(i + 1, j + 1)

    return at(0, 0)
