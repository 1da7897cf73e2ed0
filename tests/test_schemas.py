"""The consumer contract: JSON Schemas, the runtime validator, the AsyncAPI document.

Recorded events are checked with `jsonschema` against the checked-in files (an
independent implementation) and with `EventValidator` (what the producer runs).
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from bridge.demo.patchwork_double import FakePatchwork
from bridge.events import amqp_headers, parse_event
from bridge.metrics import Metrics
from bridge.models import EVENT_MODELS, OBJECT_MODELS
from bridge.schema import SCHEMAS_DIR, EventValidator, SchemaWatch, main, stale_schemas

ROOT = Path(__file__).resolve().parents[1]
RECORDED_DIRS = [
    ROOT / "bridge" / "demo" / "data" / "events",
    ROOT.parent / "shared/patchwork-api/events",
]
RECORDED = sorted(p for d in RECORDED_DIRS if d.is_dir() for p in d.glob("*.json"))
LIST_PAGE = ROOT.parent / "shared/patchwork-api/events-list-page.json"
TOOLS = SCHEMAS_DIR / "tools"


def load(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def category_schema(category: str) -> Draft202012Validator:
    return Draft202012Validator(load(SCHEMAS_DIR / "events" / f"{category}.json"))


DISPATCH = Draft202012Validator(load(SCHEMAS_DIR / "event.json"))
VALIDATOR = EventValidator()


def recorded_items() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in RECORDED:
        yield f"{path.parent.parent.name}/{path.name}", load(path)
    if LIST_PAGE.is_file():
        for item in load(LIST_PAGE)["body"]:
            yield f"list-page/{item['id']}", item


ITEMS = list(recorded_items())
ITEM_IDS = [name for name, _ in ITEMS]


def field_paths(node: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every key path in a JSON object, parents before children."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield (*prefix, key)
            yield from field_paths(value, (*prefix, key))


def without(item: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    copied = copy.deepcopy(item)
    parent = copied
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]
    return copied


def replaced(item: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    copied = copy.deepcopy(item)
    parent = copied
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return copied


def wrong_types(value: Any) -> list[Any]:
    """Values of another JSON type than ``value`` (null is covered by the nullability test)."""
    if isinstance(value, bool):
        return [1, "true"]
    if isinstance(value, int):
        return ["7", True, 7.5]
    if isinstance(value, str):
        return [7, [value]]
    if value is None:
        return [7, False, {}]
    if isinstance(value, dict):
        return ["object", [value]]
    return [{}]


# -- the files are the models ----------------------------------------------------------------


def test_checked_in_schemas_match_the_models():
    assert stale_schemas() == [], "run `python -m bridge.schema --write` and commit schemas/"


def test_schema_check_command_reports_drift(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["--write", "--dir", str(tmp_path)]) == 0
    assert main(["--check", "--dir", str(tmp_path)]) == 0
    (tmp_path / "objects" / "patch.json").write_text("{}\n")
    (tmp_path / "events" / "gone-category.json").write_text("{}\n")
    assert main(["--check", "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "objects/patch.json" in err and "events/gone-category.json" in err


def test_schema_files_cover_every_category_and_embedded_object():
    assert sorted(p.stem for p in (SCHEMAS_DIR / "events").glob("*.json")) == sorted(EVENT_MODELS)
    assert sorted(p.stem for p in (SCHEMAS_DIR / "objects").glob("*.json")) == sorted(OBJECT_MODELS)
    assert len(EVENT_MODELS) == 11
    assert set(OBJECT_MODELS) == {"project", "patch", "cover", "series", "check", "comment", "user"}


SCHEMA_FILES = [
    SCHEMAS_DIR / "event.json",
    *sorted((SCHEMAS_DIR / "events").glob("*.json")),
    *sorted((SCHEMAS_DIR / "objects").glob("*.json")),
]


@pytest.mark.parametrize("path", SCHEMA_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_schema_file_is_valid_json_schema_2020_12(path: Path):
    schema = load(path)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)


# -- recorded events ---------------------------------------------------------------------------


def test_every_category_has_a_recorded_event():
    assert {item["category"] for _, item in ITEMS} == set(EVENT_MODELS)


@pytest.mark.parametrize(("name", "item"), ITEMS, ids=ITEM_IDS)
def test_recorded_event_validates_against_its_schema(name: str, item: dict[str, Any]):
    category = item["category"]
    assert list(category_schema(category).iter_errors(item)) == []
    assert list(DISPATCH.iter_errors(item)) == []
    assert VALIDATOR.check(category, item) == []


@pytest.mark.parametrize("category", sorted(EVENT_MODELS))
def test_events_served_by_the_fake_patchwork_validate(category: str):
    fake = FakePatchwork(api_version="1.3")
    item = fake.add_event(category, "some-new-project")
    assert list(category_schema(category).iter_errors(item)) == []
    assert VALIDATOR.check(category, item) == []


@pytest.mark.parametrize(("name", "item"), ITEMS, ids=ITEM_IDS)
def test_removing_any_field_breaks_the_schema(name: str, item: dict[str, Any]):
    """Every field Patchwork 1.3+ sends is required, at every depth."""
    schema = category_schema(item["category"])
    for path in field_paths(item):
        broken = without(item, path)
        assert not schema.is_valid(broken), f"{'.'.join(path)} removed, still valid"
        assert not DISPATCH.is_valid(broken), f"{'.'.join(path)} removed, event.json accepts it"
        assert ".".join(path) in VALIDATOR.check(item["category"], broken)


@pytest.mark.parametrize(("name", "item"), ITEMS, ids=ITEM_IDS)
def test_changing_any_field_type_breaks_the_schema(name: str, item: dict[str, Any]):
    schema = category_schema(item["category"])
    for path in field_paths(item):
        original = item
        for key in path:
            original = original[key]
        for value in wrong_types(original):
            broken = replaced(item, path, value)
            where = f"{'.'.join(path)}={value!r}"
            assert not schema.is_valid(broken), f"{where}: still valid"
            assert VALIDATOR.check(item["category"], broken), f"{where}: validator accepts it"


def test_extra_fields_are_allowed_at_every_level():
    item = load(ROOT / "bridge/demo/data/events/check-created.json")
    for path in [("new",), ("project", "new"), ("payload", "new"), ("payload", "check", "new")]:
        extended = replaced(item, path, {"anything": [1, "two"]})
        assert category_schema("check-created").is_valid(extended)
        assert VALIDATOR.check("check-created", extended) == []


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("date",), "2026-11-24T13:14:28.163041+11:00"),  # Patchwork's dates are naive
        (("date",), "2026-11-24 13:14:28"),
        (("payload", "check", "state"), "exploded"),
        (("category",), "patch-created"),  # the body of another category
        (("payload", "series", "version"), "2"),
    ],
)
def test_values_patchwork_never_sends_are_violations(path: tuple[str, ...], value: Any):
    item = load(ROOT / "bridge/demo/data/events/check-created.json")
    if path[1:2] == ("series",):
        item = load(ROOT / "bridge/demo/data/events/series-completed.json")
    broken = replaced(item, path, value)
    assert not category_schema(item["category"]).is_valid(broken)
    assert VALIDATOR.check(item["category"], broken) == [".".join(path)]


# Where Patchwork sends null (models and serializers upstream); nowhere else.
NULLABLE = {
    "EventItem.actor",
    "Patch.list_archive_url",
    "Cover.list_archive_url",
    "Comment.list_archive_url",
    "Series.name",
    "Check.target_url",
    "PatchStateChangedPayload.previous_state",
    "PatchStateChangedPayload.current_state",
    "PatchDelegatedPayload.previous_delegate",
    "PatchDelegatedPayload.current_delegate",
    "PatchRelationChangedPayload.previous_relation",
    "PatchRelationChangedPayload.current_relation",
}


def accepts_null(schema: dict[str, Any]) -> bool:
    return schema.get("type") == "null" or any(accepts_null(s) for s in schema.get("anyOf", []))


def test_fields_are_nullable_exactly_where_patchwork_sends_null():
    definitions = load(SCHEMAS_DIR / "event.json")["$defs"]
    nullable = {
        # Every category's event repeats the envelope's fields: name them after the envelope.
        f"{'EventItem' if name.endswith(('Event', 'EventItem')) else name}.{field}"
        for name, definition in definitions.items()
        for field, schema in definition["properties"].items()
        if accepts_null(schema)
    }
    assert nullable == NULLABLE


def test_nulls_patchwork_sends_are_valid():
    item = load(ROOT / "bridge/demo/data/events/patch-delegated.json")
    undelegated = replaced(item, ("payload", "current_delegate"), None)
    assert VALIDATOR.check("patch-delegated", undelegated) == []
    series = load(ROOT / "bridge/demo/data/events/series-created.json")
    unnamed = replaced(series, ("payload", "series", "name"), None)
    assert category_schema("series-created").is_valid(unnamed)
    assert VALIDATOR.check("series-created", unnamed) == []


def test_unknown_category_is_a_normal_event():
    item = load(ROOT / "bridge/demo/data/events/patch-created.json")
    renamed = {**item, "category": "patch-teleported", "payload": {"whatever": 1}}
    assert VALIDATOR.check("patch-teleported", renamed) == []
    assert DISPATCH.is_valid(renamed)
    # ...but its envelope is still Patchwork's.
    assert not DISPATCH.is_valid(without(renamed, ("project",)))


def test_validator_reports_each_broken_field_once():
    item = load(ROOT / "bridge/demo/data/events/patch-state-changed.json")
    broken = replaced(without(item, ("payload", "patch", "mbox")), ("id",), "287")
    assert VALIDATOR.check("patch-state-changed", broken) == ["id", "payload.patch.mbox"]


# -- the producer's watch --------------------------------------------------------------------


def test_schema_watch_counts_every_bad_event_and_logs_each_field_once(
    caplog: pytest.LogCaptureFixture,
):
    metrics = Metrics()
    watch = SchemaWatch(metrics)
    good = load(ROOT / "bridge/demo/data/events/series-completed.json")
    no_version = without(good, ("payload", "series", "version"))
    caplog.set_level(logging.WARNING, logger="bridge.schema")

    watch.observe("series-completed", good)
    watch.observe("series-completed", no_version)
    watch.observe("series-completed", {**no_version, "id": 12})
    watch.observe("series-completed", replaced(good, ("actor",), "maint"))
    watch.observe("brand-new-category", {"id": 1})

    violations = metrics.registry.get_sample_value(
        "patchwork_bridge_schema_violations_total", {"category": "series-completed"}
    )
    assert violations == 3
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert "series-completed event 11" in lines[0] and "payload.series.version" in lines[0]
    assert "actor" in lines[1] and "published anyway" in lines[1]


# -- AsyncAPI ----------------------------------------------------------------------------------


def asyncapi() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load((SCHEMAS_DIR / "asyncapi.yaml").read_text(encoding="utf-8"))


def test_asyncapi_describes_every_category_with_its_schema():
    doc = asyncapi()
    channel = doc["channels"]["events"]
    assert channel["address"] == "{project}.{category}"
    assert channel["parameters"]["category"]["enum"] == list(EVENT_MODELS)
    messages = doc["components"]["messages"]
    by_name = {m["name"]: m for key, m in messages.items() if key in channel["messages"]}
    assert sorted(by_name) == sorted(EVENT_MODELS)
    for category, message in by_name.items():
        assert message["payload"] == {"$ref": f"./events/{category}.json"}
        assert message["bindings"]["amqp"]["messageType"] == category
    assert messages["webhookEvent"]["payload"] == {"$ref": "./event.json"}
    assert doc["channels"]["events"]["bindings"]["amqp"]["exchange"]["type"] == "topic"


def test_bus_headers_the_producer_sends_match_the_asyncapi_document():
    doc = asyncapi()
    registry = Registry().with_resource("urn:asyncapi", Resource(doc, DRAFT202012))
    headers_schema = Draft202012Validator(
        {"$ref": "urn:asyncapi#/components/schemas/busHeaders"}, registry=registry
    )
    for path in RECORDED[:11]:
        raw = path.read_text(encoding="utf-8")
        event = parse_event(json.loads(raw), raw)
        headers = amqp_headers(
            event, "https://patchwork.example.org/api/1.3", ZoneInfo("Australia/Canberra")
        )
        assert list(headers_schema.iter_errors(headers)) == []
    assert not headers_schema.is_valid({"ce-id": "1"})


@pytest.mark.skipif(
    shutil.which("node") is None or not (TOOLS / "node_modules").is_dir(),
    reason="needs node and `npm ci --prefix schemas/tools`",
)
def test_asyncapi_document_validates_with_the_asyncapi_parser():
    result = subprocess.run(
        ["node", str(TOOLS / "validate.mjs"), str(SCHEMAS_DIR / "asyncapi.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid AsyncAPI 3.0.0, 13 messages (0 warnings)" in result.stdout
