"""Check events against their category's schema; write `schemas/` from `bridge.models`.

The producer calls `SchemaWatch.observe` for every event before publishing. An event
that breaks its schema is still published (Patchwork is the authority on its own
events); the break is counted and logged once per (category, field), so drift in a
new Patchwork release shows up in metrics and logs instead of in CI systems' crashes.

`python -m bridge.schema --write` regenerates the JSON Schemas; `--check` (the
default) exits 1 when the checked-in files differ from the models.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic.json_schema import GenerateJsonSchema, models_json_schema
from pydantic.plugin._schema_validator import PluggableSchemaValidator
from pydantic_core import SchemaValidator

from bridge.checks.result import CheckResult
from bridge.metrics import Metrics
from bridge.models import EVENT_MODELS, OBJECT_MODELS, EventItem

log = logging.getLogger(__name__)

DIALECT = "https://json-schema.org/draft/2020-12/schema"
SCHEMAS_DIR = Path(__file__).resolve().parent.parent / "schemas"
GENERATED_NOTE = (
    "Generated from bridge/models.py by `python -m bridge.schema --write`; do not edit."
)
# (category, field) pairs already logged; bounded so a flood of odd events cannot grow memory.
LOGGED_MAX = 10_000


@dataclass(frozen=True, slots=True)
class Violation:
    path: str
    """Dotted path of the offending field, e.g. `payload.patch.id`; `""` for the body itself."""
    kind: str
    """What is wrong, pydantic's error type: `missing`, `int_type`, `string_pattern_mismatch`..."""


class EventValidator:
    """Validates event bodies (parsed JSON) against the model of their category.

    Unknown categories are not checked: Patchwork may add categories, and those are
    normal events (docs/bus.md).
    """

    def __init__(self) -> None:
        self._validators: dict[str, SchemaValidator | PluggableSchemaValidator] = {
            category: model.__pydantic_validator__ for category, model in EVENT_MODELS.items()
        }

    def violations(self, category: str, item: Any) -> list[Violation]:
        validator = self._validators.get(category)
        if validator is None:
            return []
        try:
            validator.validate_python(item)
        except ValidationError as exc:
            errors = exc.errors(include_url=False, include_context=False, include_input=False)
            found = {(_dotted(e["loc"]), e["type"]): None for e in errors}
            return [Violation(path, kind) for path, kind in found]
        return []

    def check(self, category: str, item: Any) -> list[str]:
        """The violated field paths; empty when the event is valid or its category unknown."""
        return list(dict.fromkeys(v.path for v in self.violations(category, item)))


class SchemaWatch:
    """Counts events that break their schema and logs each (category, field) once."""

    def __init__(self, metrics: Metrics, validator: EventValidator | None = None) -> None:
        self._metrics = metrics
        self._validator = validator if validator is not None else EventValidator()
        self._logged: dict[tuple[str, str], None] = {}

    def observe(self, category: str, item: Any) -> None:
        """Never raises for a bad event: the caller publishes it whatever this finds."""
        violations = self._validator.violations(category, item)
        if not violations:
            return
        self._metrics.schema_violations.labels(category).inc()
        event_id = item.get("id") if isinstance(item, dict) else None
        for violation in violations:
            key = (category, violation.path)
            if key in self._logged:
                continue
            if len(self._logged) >= LOGGED_MAX:
                self._logged.pop(next(iter(self._logged)))
            self._logged[key] = None
            log.warning(
                "schema drift: %s event %s breaks its schema at %s (%s); published anyway, "
                "logged once per category and field",
                category,
                event_id,
                violation.path or "<body>",
                violation.kind,
            )


def _dotted(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc)


# -- JSON Schema files --------------------------------------------------------------------------


class _Generator(GenerateJsonSchema):
    """Pydantic's generator without a `title` on every property ("Id", "Url"): noise to readers."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False


# Pydantic sorts schema keywords alphabetically; readers want title and type before details.
_KEYWORD_ORDER = {
    keyword: rank
    for rank, keyword in enumerate(
        (
            *("$schema", "$comment", "title", "description", "type", "const", "enum", "format"),
            *(
                "pattern",
                "$ref",
                "anyOf",
                "allOf",
                "properties",
                "required",
                "additionalProperties",
            ),
        )
    )
}
_NAME_MAPS = frozenset({"properties", "$defs"})


def _readable(node: Any, names: bool = False) -> Any:
    """`node` with keywords in reading order; the keys of name maps keep their order."""
    if isinstance(node, list):
        return [_readable(item) for item in node]
    if not isinstance(node, dict):
        return node
    keys = list(node) if names else sorted(node, key=lambda k: _KEYWORD_ORDER.get(k, 99))
    return {key: _readable(node[key], not names and key in _NAME_MAPS) for key in keys}


def _document(schema: dict[str, Any]) -> dict[str, Any]:
    return _readable({"$schema": DIALECT, "$comment": GENERATED_NOTE, **schema})


def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A self-contained schema, embedded objects under `$defs`: one file is all a consumer needs."""
    return _document(model.model_json_schema(schema_generator=_Generator))


def dispatch_schema() -> dict[str, Any]:
    """`event.json`: the envelope for any event, plus the category's schema for the 11 known."""
    models: list[type[BaseModel]] = [EventItem, *EVENT_MODELS.values()]
    _, top = models_json_schema(
        [(model, "validation") for model in models], schema_generator=_Generator
    )
    return _document(
        {
            "title": "Patchwork event",
            "description": (
                "Any body on the bus or in a webhook: Patchwork's event as /api/events/ returns it."
                " Known categories must match their own schema; unknown ones only the envelope."
            ),
            "$ref": "#/$defs/EventItem",
            "allOf": [
                {
                    "if": {
                        "properties": {"category": {"const": category}},
                        "required": ["category"],
                    },
                    "then": {"$ref": f"#/$defs/{model.__name__}"},
                }
                for category, model in EVENT_MODELS.items()
            ],
            "$defs": top["$defs"],
        }
    )


def render_schemas() -> dict[str, str]:
    """Every generated file under `schemas/`, by relative path, as it must be on disk."""
    documents: dict[str, dict[str, Any]] = {
        "event.json": dispatch_schema(),
        "check-result.json": model_schema(CheckResult),
    }
    for category, event_model in EVENT_MODELS.items():
        documents[f"events/{category}.json"] = model_schema(event_model)
    for name, object_model in OBJECT_MODELS.items():
        documents[f"objects/{name}.json"] = model_schema(object_model)
    return {
        path: json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
        for path, doc in documents.items()
    }


def stale_schemas(root: Path = SCHEMAS_DIR) -> list[str]:
    """Files that differ from the models: missing, changed, or left over in a generated folder."""
    expected = render_schemas()
    stale = [
        path
        for path, text in expected.items()
        if not (root / path).is_file() or (root / path).read_text(encoding="utf-8") != text
    ]
    for folder in ("events", "objects"):
        for path in sorted((root / folder).glob("*.json")):
            relative = f"{folder}/{path.name}"
            if relative not in expected:
                stale.append(relative)
    return stale


def write_schemas(root: Path = SCHEMAS_DIR) -> list[str]:
    """Bring the files in line with the models; returns the paths written or removed."""
    expected = render_schemas()
    changed = stale_schemas(root)
    for relative in changed:
        path = root / relative
        if relative in expected:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(expected[relative], encoding="utf-8")
        else:
            path.unlink()
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bridge.schema", description="Write or check schemas/ from bridge.models."
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help="regenerate the JSON Schema files")
    action.add_argument("--check", action="store_true", help="exit 1 if they drift (default)")
    parser.add_argument("--dir", type=Path, default=SCHEMAS_DIR, help="the schemas/ folder")
    args = parser.parse_args(argv)
    if args.write:
        changed = write_schemas(args.dir)
        print(f"{len(changed)} schema files updated in {args.dir}" + _listing(changed))
        return 0
    stale = stale_schemas(args.dir)
    if stale:
        print(
            f"schemas out of date with bridge/models.py: {', '.join(stale)}; "
            "run `python -m bridge.schema --write`",
            file=sys.stderr,
        )
        return 1
    print(f"schemas in {args.dir} match bridge/models.py")
    return 0


def _listing(paths: list[str]) -> str:
    return f": {', '.join(paths)}" if paths else ""


if __name__ == "__main__":
    sys.exit(main())
