"""Stream consumers: who may read the stream, with which token and which events, from the
TOML file of BRIDGE_STREAM_CONSUMERS. Tokens are compared in constant time and never
reach a log, a metric or an error."""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from bridge.tablefile import (
    Problems,
    error_key,
    error_message,
    is_one_word,
    label_of,
    read_secret_file,
    read_tables,
    resolve,
)
from bridge.topics import check_pattern

MIN_TOKEN_CHARS = 16
"""A token is a password sent on every request: long enough not to be guessed."""


class StreamConsumer(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9-]+$")
    token: SecretStr
    token_file: Path | None = None
    events: list[str] = ["#"]
    """The topic patterns this consumer may ask for."""

    @field_validator("events")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError('must list at least one pattern (["#"] for every event)')
        for pattern in value:
            check_pattern(pattern)
        return value


class StreamConsumers:
    """The consumers of one file, found by their token."""

    def __init__(self, consumers: list[StreamConsumer]) -> None:
        self.consumers = consumers

    def by_token(self, token: str) -> StreamConsumer | None:
        found = None
        for consumer in self.consumers:  # every one compared: the time says nothing
            if hmac.compare_digest(consumer.token.get_secret_value().encode(), token.encode()):
                found = consumer
        return found

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.consumers]


def load_consumers(path: Path) -> StreamConsumers:
    """Every ``[[consumer]]`` of the file, or SettingsError listing every problem found."""
    tables, problems = read_tables(path, "consumer", "stream consumers")
    consumers: list[StreamConsumer] = []
    names: dict[str, str] = {}
    tokens: dict[str, str] = {}
    for index, table in enumerate(tables, start=1):
        label = label_of(table, index)
        name = table.get("name")
        if isinstance(name, str):
            if name in names:
                problems.add(label, "name", f"duplicate name (also consumer {names[name]})")
                continue
            names[name] = label
        consumer = _load_one(table, label, path.parent, problems)
        if consumer is None:
            continue
        token = consumer.token.get_secret_value()
        if token in tokens:
            problems.add(label, "token", f"the same token as consumer {tokens[token]}")
            continue
        tokens[token] = label
        consumers.append(consumer)
    if not consumers and not problems.lines:
        problems.lines.append(f"{path}: no [[consumer]] tables; nobody could read the stream")
    problems.raise_any()
    return StreamConsumers(consumers)


def _load_one(
    table: dict[str, Any], label: str, base: Path, problems: Problems
) -> StreamConsumer | None:
    before = len(problems.lines)
    values = dict(table)
    for key in sorted(set(values) - set(StreamConsumer.model_fields)):
        problems.add(label, key, "unknown key")
        del values[key]
    given_by = "token_file" if "token_file" in values else "token"
    if "token" in values and "token_file" in values:
        problems.add(label, "token_file", "set either token or token_file, not both")
    elif isinstance(values.get("token_file"), str):
        values["token_file"] = resolve(values["token_file"], base)
        content = read_secret_file(values["token_file"], label, "token_file", problems)
        if content is not None:
            values["token"] = content
    elif "token" not in values:
        problems.add(label, "token", "required (or token_file)")
    token = values.get("token")
    if isinstance(token, str):
        if not is_one_word(token):
            problems.add(label, given_by, "must be one word, without spaces or control characters")
        elif len(token) < MIN_TOKEN_CHARS:
            problems.add(label, given_by, f"must be at least {MIN_TOKEN_CHARS} characters")
    try:
        consumer = StreamConsumer.model_validate(values)
    except ValidationError as exc:
        for error in exc.errors(include_input=False, include_url=False):
            if error["loc"] == ("token",) and "token" not in values:
                continue  # already said
            problems.add(label, error_key(error["loc"]), error_message(error["msg"]))
        return None
    return consumer if len(problems.lines) == before else None
