"""Subscriptions: who wants which events, read from the TOML file of BRIDGE_SUBSCRIPTIONS.

CONTRACT (field names are shared by the consumer and the sinks; do not rename).
``load_subscriptions`` checks the whole file at start-up and reports every
problem on its own line naming file, subscription and key, never a secret's
value. After loading, ``secret`` and ``bearer_token`` hold the values whether
they were given inline or in a file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from bridge.signing import (
    MAX_SECRET_BYTES,
    MIN_SECRET_BYTES,
    decode_secrets,
    decode_signing_keys,
)
from bridge.sinks.netguard import ForbiddenAddress, check_literal_host
from bridge.sinks.registry import sink_names
from bridge.tablefile import (
    NOT_ONE_WORD,
    Entry,
    Problems,
    is_one_word,
    load_entries,
)
from bridge.topics import check_pattern

DEFAULT_RETRY_SCHEDULE_S = [5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0]
RESERVED = frozenset({"checks"})
"""Lanes of the bridge's own roles: a subscription may not take these names, so that an
operator command given a name (``dlq checks``) means one lane."""
MAX_RETRY_DELAY_S = 4_294_967.0
"""RabbitMQ's largest queue TTL (2^32-1 ms); delays are realised as queue TTLs."""


class Subscription(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str = Field(pattern=r"^[a-z0-9-]+$")
    sink: str = "webhook"
    """Entry point name in the ``patchwork_bridge.sinks`` group."""
    url: str | None = None
    """Webhook sink: where to POST."""
    command: list[str] | None = None
    """Command sink: argv of a program that reads the event on stdin."""
    options: dict[str, Any] = {}
    """Third-party sinks: their own settings."""
    events: list[str] = ["#"]
    """Topic patterns over ``<project>.<category>``."""
    secret: SecretStr | None = None
    """One or more ``whsec_`` secrets, white-space separated: each signs (``v1``)."""
    secret_file: Path | None = None
    signing_key: SecretStr | None = None
    """One or more ``whsk_`` ed25519 keys: each signs (``v1a``); BRIDGE_SIGNING_KEY_FILE
    gives the deployment's to every subscription without its own."""
    signing_key_file: Path | None = None
    bearer_token: SecretStr | None = None
    bearer_token_file: Path | None = None
    timeout: float = Field(15.0, gt=0)
    """Seconds for the whole attempt."""
    concurrency: int = Field(16, ge=1, le=65535)
    """Also the channel's prefetch, which AMQP caps at 65535."""
    retry_schedule: list[float] = DEFAULT_RETRY_SCHEDULE_S
    """Delays in seconds between attempts; attempts = 1 + len(retry_schedule)."""
    allow_private_network: bool = False
    rate: float | None = Field(None, gt=0)
    """Requests a second at most, over every webhook process (None: as fast as it answers)."""
    breaker_failures: int = Field(20, ge=0)
    """Receiver-down failures in a row (refused, timeout, 5xx) that open the circuit
    breaker; 0: never open it."""
    breaker_probe: float = Field(30.0, gt=0)
    """Seconds from opening to the first probe; each failed probe doubles it..."""
    breaker_probe_max: float = Field(1800.0, gt=0)
    """...up to this."""

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None:
            check_url(value)
        return value

    @field_validator("events")
    @classmethod
    def _topic_patterns(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError('must list at least one pattern (["#"] for every event)')
        for pattern in value:
            check_pattern(pattern)
        return value

    @field_validator("retry_schedule")
    @classmethod
    def _delays(cls, value: list[float]) -> list[float]:
        for delay in value:
            if not 0 < delay <= MAX_RETRY_DELAY_S:
                raise ValueError(f"delays must be > 0 and <= {MAX_RETRY_DELAY_S:.0f} seconds")
        return value


def check_url(url: str) -> None:
    """ValueError unless ``url`` is an absolute http(s) URL with a host and no credentials."""
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise ValueError("must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise ValueError("is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        # URLs end up in logs; credentials belong in bearer_token(_file).
        raise ValueError("must not contain user:password@, use bearer_token_file")


# Loading ---------------------------------------------------------------------

_FILE_KEYS = {
    "secret_file": "secret",
    "bearer_token_file": "bearer_token",
    "signing_key_file": "signing_key",
}


def load_subscriptions(path: Path) -> list[Subscription]:
    """Every ``[[webhook]]`` of the file, or SettingsError listing every problem found.

    Relative ``secret_file`` and ``bearer_token_file`` paths are taken from the
    file's directory. An empty file is valid and yields no subscriptions.
    """
    known_sinks = set(sink_names())

    def check(entry: Entry, problems: Problems) -> None:
        values, label = entry.values, entry.label
        if values.get("name") in RESERVED:
            problems.add(
                label, "name", f"{values['name']!r} is the checks role's own; choose another"
            )
        if isinstance(values.get("secret"), str):
            _check_secret(values["secret"], label, entry.given_by("secret"), problems)
        if isinstance(values.get("signing_key"), str):
            try:
                decode_signing_keys(values["signing_key"])
            except ValueError as exc:
                problems.add(
                    label,
                    entry.given_by("signing_key"),
                    f"{exc} (make one with `patchwork-bridge keys new`)",
                )
        token = values.get("bearer_token")
        if isinstance(token, str) and not is_one_word(token):
            problems.add(label, entry.given_by("bearer_token"), NOT_ONE_WORD)
        sink = values.get("sink", "webhook")
        if isinstance(sink, str) and sink not in known_sinks:
            installed = ", ".join(sorted(known_sinks)) or "none"
            problems.add(label, "sink", f"unknown sink {sink!r} (installed: {installed})")
        if sink == "webhook" and values.get("url") is None:
            problems.add(label, "url", "required for a webhook")
        if sink == "command" and not values.get("command"):
            problems.add(
                label, "command", 'required for sink = "command": the program and its args'
            )

    def check_loaded(subscription: Subscription, entry: Entry, problems: Problems) -> None:
        if subscription.sink == "webhook" and not subscription.allow_private_network:
            _check_reachable(subscription.url or "", entry.label, problems)

    subscriptions, problems = load_entries(
        path,
        "webhook",
        "subscriptions",
        Subscription,
        secret_files=_FILE_KEYS,
        check=check,
        check_loaded=check_loaded,
    )
    problems.raise_any()
    return subscriptions


def _check_reachable(url: str, label: str, problems: Problems) -> None:
    """A receiver on this host or a private network would have every event dead-lettered
    as ``ssrf``: say so now, naming the setting (names that resolve there are refused
    at delivery time)."""
    host = urlsplit(url).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        reason = "loopback"
    else:
        try:
            check_literal_host(host)
            return
        except ForbiddenAddress as exc:
            reason = exc.reason
    problems.add(
        label,
        "url",
        f"{host} is a {reason} address, refused by the SSRF guard; "
        "set allow_private_network = true to deliver there",
    )


def _check_secret(secret: str, label: str, key: str, problems: Problems) -> None:
    """One secret, or several separated by white space while one is rotated."""
    try:
        sizes = [len(k) for k in decode_secrets(secret)]
    except ValueError as exc:
        problems.add(label, key, f"{exc} (a Standard Webhooks secret: whsec_<base64>)")
        return
    if not all(MIN_SECRET_BYTES <= size <= MAX_SECRET_BYTES for size in sizes):
        problems.add(
            label, key, f"the key must be {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes long"
        )


def with_deployment_key(
    subscriptions: list[Subscription], key: SecretStr | None
) -> list[Subscription]:
    """Every subscription without a signing key of its own signs with the deployment's."""
    if key is None:
        return subscriptions
    return [
        s if s.signing_key is not None else s.model_copy(update={"signing_key": key})
        for s in subscriptions
    ]
