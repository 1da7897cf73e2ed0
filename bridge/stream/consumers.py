"""Stream consumers: who may read the stream, with which token and which events, from the
TOML file of BRIDGE_STREAM_CONSUMERS. Tokens are compared in constant time and never
reach a log, a metric or an error."""

from __future__ import annotations

import hmac
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from bridge.tablefile import NOT_ONE_WORD, Entry, Problems, is_one_word, load_entries
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
    tokens: dict[str, str] = {}

    def check(entry: Entry, problems: Problems) -> None:
        if "token" not in entry.values and "token_file" not in entry.table:
            problems.add(entry.label, "token", "required (or token_file)")
        token = entry.values.get("token")
        if isinstance(token, str):
            given_by = entry.given_by("token")
            if not is_one_word(token):
                problems.add(entry.label, given_by, NOT_ONE_WORD)
            elif len(token) < MIN_TOKEN_CHARS:
                problems.add(
                    entry.label, given_by, f"must be at least {MIN_TOKEN_CHARS} characters"
                )

    def check_loaded(consumer: StreamConsumer, entry: Entry, problems: Problems) -> None:
        token = consumer.token.get_secret_value()
        if token in tokens:
            problems.add(entry.label, "token", f"the same token as consumer {tokens[token]}")
        else:
            tokens[token] = entry.label

    consumers, problems = load_entries(
        path,
        "consumer",
        "stream consumers",
        StreamConsumer,
        secret_files={"token_file": "token"},
        check=check,
        check_loaded=check_loaded,
    )
    if not consumers and not problems.lines:
        problems.lines.append(f"{path}: no [[consumer]] tables; nobody could read the stream")
    problems.raise_any()
    return StreamConsumers(consumers)
