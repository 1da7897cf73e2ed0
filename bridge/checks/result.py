"""A CI system's result, as it publishes it to ``<exchange>.results`` (routing key
``<project>.check``) or POSTs it to ``/v1/checks``: checked before anything reaches
Patchwork. Its JSON Schema is ``schemas/check-result.json``. See docs/checks.md."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

QUEUE = "checks"
"""The checks lane's name: its queues are ``<exchange>.checks``, ``.retry.<d>s``, ``.dead``."""
ROUTING_PATTERN = "*.check"


def results_exchange(exchange: str) -> str:
    return f"{exchange}.results"


class InvalidResult(ValueError):
    """A result that can never become a check; the message says why, in one line."""


class CheckResult(BaseModel):
    """One CI result for a patch, or for every patch of a series."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        title="check-result",
        json_schema_extra={"oneOf": [{"required": ["patch"]}, {"required": ["series"]}]},
    )

    patch: int | None = Field(None, gt=0, description="The patch's id; or give `series`.")
    series: int | None = Field(
        None, gt=0, description="The series' id: one check on each of its patches."
    )
    state: Literal["pending", "success", "warning", "fail"]
    context: str = Field(
        pattern=r"^[a-z0-9_-]+$",
        max_length=255,
        description="Names the test, e.g. `build-x86`; a newer check of it replaces the older.",
    )
    target_url: str | None = Field(
        None, max_length=200, pattern=r"^https?://", description="Where the results are."
    )
    description: str | None = Field(None, max_length=1000)
    project: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="Over HTTP only: the project's link name (on the bus: the routing key).",
    )

    @model_validator(mode="after")
    def _one_target(self) -> CheckResult:
        if (self.patch is None) == (self.series is None):
            raise ValueError("give exactly one of patch and series")
        return self

    @property
    def target(self) -> str:
        return f"patch {self.patch}" if self.patch is not None else f"series {self.series}"


def parse_result(body: bytes) -> CheckResult:
    """Raises InvalidResult with the first problem: where and what."""
    try:
        return CheckResult.model_validate(json.loads(body))
    except (ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, ValidationError):
            error = exc.errors(include_input=False, include_url=False)[0]
            where = ".".join(str(p) for p in error["loc"]) or "result"
            raise InvalidResult(f"{where}: {error['msg'].removeprefix('Value error, ')}") from None
        raise InvalidResult("not a JSON object") from None
