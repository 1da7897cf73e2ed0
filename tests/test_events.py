"""Events as they travel: exact bytes out of a page, routing keys, ce-* headers."""

from __future__ import annotations

import json
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.events import BadEvent, BadPage, ce_time, parse_event, split_array

ITEM = {
    "id": 7,
    "category": "patch-created",
    "project": {"id": 1, "link_name": "netdevbpf"},
    "date": "2026-11-24T13:14:18.578176",
    "actor": None,
    "payload": {"patch": {"name": '[v2] caf\u00e9 \u2603 "quoted"'}},
}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text() | st.floats(allow_nan=False),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@given(
    st.lists(json_values, max_size=6), st.sampled_from([(",", ":"), (", ", ": ")]), st.booleans()
)
def test_split_array_returns_each_element_with_its_exact_text(items, separators, indent):
    text = json.dumps(
        items, separators=separators, indent=2 if indent else None, ensure_ascii=False
    )
    parts = split_array(text)
    assert [value for value, _ in parts] == items
    for value, raw in parts:
        assert json.loads(raw) == value
        assert raw in text


@pytest.mark.parametrize(
    "body",
    [
        "<html><body>Server Error (500)</body></html>",
        '[{"id": 1}, {"id": 2',
        '{"detail": "Not found."}',
        "",
        "[1,2] trailing",
        "[1 2]",
    ],
)
def test_split_array_rejects_what_is_not_a_json_array(body):
    with pytest.raises(BadPage):
        split_array(body)


def test_event_keeps_patchworks_bytes_and_routes_by_project_and_category():
    text = json.dumps([ITEM], ensure_ascii=False, separators=(",", ":"))
    ((item, raw),) = split_array(text)
    event = parse_event(item, raw)
    assert event.body == text[1:-1].encode("utf-8")
    assert event.routing_key == "netdevbpf.patch-created"
    assert event.message_id == "7"
    assert event.date == "2026-11-24T13:14:18.578176"


def test_unknown_category_is_an_ordinary_event():
    item = dict(ITEM, category="patch-frobnicated")
    assert parse_event(item, json.dumps(item)).routing_key == "netdevbpf.patch-frobnicated"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"id": None}, "missing_id"),
        ({"id": "7"}, "missing_id"),
        ({"date": None}, "missing_date"),
        ({"date": "yesterday"}, "missing_date"),
        ({"project": None}, "missing_project"),
        ({"project": {"id": 1}}, "missing_project"),
        ({"category": None}, "missing_category"),
    ],
)
def test_item_without_routing_fields_is_rejected_with_a_reason(change, reason):
    item = dict(ITEM, **change)
    with pytest.raises(BadEvent) as info:
        parse_event(item, json.dumps(item))
    assert info.value.reason == reason


def test_ce_time_applies_the_patchwork_time_zone_with_its_offset():
    canberra = ZoneInfo("Australia/Canberra")
    assert ce_time("2026-11-24T13:14:28.163041", canberra) == "2026-11-24T13:14:28.163041+11:00"
    assert ce_time("2026-06-24T13:14:28", canberra) == "2026-06-24T13:14:28+10:00"
    assert ce_time("2026-06-24T13:14:28", ZoneInfo("UTC")) == "2026-06-24T13:14:28+00:00"
