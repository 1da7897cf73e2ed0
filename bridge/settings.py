"""Settings from BRIDGE_* environment variables, checked once at start-up.

A bad setting stops the process with one line naming it; secret values never
appear in that line, in ``repr`` or in logs (they are ``SecretStr``).
"""

from __future__ import annotations

import logging
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit, urlunsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from bridge.signing import read_key_file

log = logging.getLogger(__name__)

ENV_PREFIX = "BRIDGE_"


class SettingsError(Exception):
    """A setting is missing or malformed; the message names it and never its value."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", frozen=True, allow_inf_nan=False
    )

    amqp_url: SecretStr = SecretStr("amqp://guest:guest@localhost:5672/")
    exchange: str = Field("patchwork", min_length=1)
    queue_type: Literal["classic", "quorum"] = "classic"

    patchwork_url: str | None = None
    patchwork_api_version: str = Field("1.3", pattern=r"^\d+\.\d+$")
    patchwork_token: SecretStr | None = None
    patchwork_timezone: str = "UTC"
    patchwork_projects: Annotated[list[str], NoDecode] = []
    patchwork_timeout: float = Field(30.0, gt=0)

    poll_interval: float = Field(10.0, gt=0)
    poll_late_wait: float = Field(300.0, ge=0)
    """Seconds a late event (an id gap) is waited for, and how far back the sweep reads."""
    poll_sweep_interval: float = Field(60.0, ge=0)
    patchwork_db: SecretStr | None = None
    """Patchwork's PostgreSQL (a DSN; CONNECT is enough) to LISTEN to: the producer polls
    when an event commits, and otherwise every ``poll_safety_interval``."""
    poll_safety_interval: float = Field(60.0, gt=0)
    start: str = "now"
    state_dir: Path = Path("bridge-state")
    publish_in_flight: int = Field(2000, ge=1)

    log_max_age: str = Field("14D", pattern=r"^[1-9][0-9]*[YMDhms]$")
    """Event log retention by age, in RabbitMQ's syntax (14D, 12h, 1Y)."""
    log_max_bytes: int = Field(10_000_000_000, gt=0)
    log_replicas: int | None = Field(None, ge=1)
    """The event log's replicas on a cluster (``x-initial-cluster-size``), set before the log
    is first declared; unset: RabbitMQ's default (every node, up to three, on 4.3)."""

    subscriptions: Path | None = None
    signing_key_file: Path | None = None
    """The deployment's ``whsk_`` ed25519 key(s): every subscription without its own
    ``signing_key`` signs ``v1a`` with them; the stream port serves the public keys."""

    checks: bool = False
    """``run`` also runs the checks role (CI results posted to Patchwork)."""
    checks_rate: float = Field(5.0, gt=0)
    """Requests a second to Patchwork, at most, from the checks role."""

    stream_consumers: Path | None = None
    stream_host: str = "0.0.0.0"  # noqa: S104 - the stream is for CI systems elsewhere
    stream_port: int = Field(9470, ge=0, le=65535)
    stream_client_buffer: int = Field(2000, ge=1)
    """Events waiting for one stream client at most; past that it is disconnected as slow."""
    stream_keepalive: float = Field(15.0, gt=0)
    """Seconds between keep-alive comments on a quiet stream (a proxy's idle timeout must
    be longer)."""

    http_host: str = "0.0.0.0"  # noqa: S104 - a container's health check must reach it
    http_port: int = Field(9464, ge=0, le=65535)
    queue_depth_interval: float = Field(15.0, gt=0)

    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_any_case(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("signing_key_file")
    @classmethod
    def _usable_keys(cls, value: Path | None) -> Path | None:
        if value is not None:
            read_key_file(value)
        return value

    @field_validator("patchwork_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL of the Patchwork site root")
        if re.search(r"/api(/[^/]*)?/?$", parts.path):
            # Every poll would then 404 on .../api/1.3/api/1.3/events/.
            raise ValueError(
                "must be the site root, without /api/...: the bridge adds "
                "/api/<BRIDGE_PATCHWORK_API_VERSION>/events/ itself"
            )
        return value.rstrip("/")

    @field_validator("subscriptions", "stream_consumers", mode="before")
    @classmethod
    def _subscriptions_path(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            raise ValueError("is empty: name the file, or unset it")
        return value

    @field_validator("patchwork_timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError("must be an IANA time zone name such as Australia/Canberra") from None
        return value

    @field_validator("patchwork_projects", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [p.strip() for p in value.split(",") if p.strip()]
        return value

    @field_validator("start")
    @classmethod
    def _start(cls, value: str) -> str:
        if value in ("now", "beginning"):
            return value
        try:
            datetime.fromisoformat(value)
        except ValueError:
            raise ValueError("must be 'now', 'beginning' or an ISO 8601 date") from None
        return value

    @field_validator("amqp_url")
    @classmethod
    def _amqp_url(cls, value: SecretStr) -> SecretStr:
        urls = split_urls(value.get_secret_value())
        if not urls:
            raise ValueError("must be an amqp:// or amqps:// URL (or several, comma-separated)")
        for url in urls:
            parts = urlsplit(url)
            if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
                raise ValueError(
                    "must be an amqp:// or amqps:// URL, or several, comma-separated, one "
                    "per node of a cluster"
                )
        return value

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.patchwork_timezone)

    @property
    def api_base(self) -> str:
        """The events API's base URL, also the CloudEvents ``source`` of every event."""
        if self.patchwork_url is None:
            raise SettingsError("BRIDGE_PATCHWORK_URL: required for the producer")
        return f"{self.patchwork_url}/api/{self.patchwork_api_version}"

    @property
    def amqp_urls(self) -> list[str]:
        """The node URLs of BRIDGE_AMQP_URL, in order."""
        return split_urls(self.amqp_url.get_secret_value())

    @property
    def amqp_url_redacted(self) -> str:
        """BRIDGE_AMQP_URL with every password replaced, fit for a log line."""
        return ",".join(redact_url(url) for url in self.amqp_urls)


def split_urls(text: str) -> list[str]:
    """The URLs of a comma-separated list (BRIDGE_AMQP_URL's nodes), in order."""
    return [part.strip() for part in text.split(",") if part.strip()]


def redact_url(url: str) -> str:
    """The URL with any password replaced, fit for a log line."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


DEPRECATED = {"BRIDGE_POLL_OVERLAP": "BRIDGE_POLL_LATE_WAIT"}
"""Old names still read, each with one line saying its new name."""
NOT_OURS = frozenset({"BRIDGE_SUBSCRIPTIONS_FILE"})
"""Variables of the compose file (which file it mounts), not settings: an operator may
have exported them in the shell that also runs the CLI."""


def load_settings(**overrides: object) -> Settings:
    """Read settings, rejecting misspelled BRIDGE_* names that pydantic would ignore.

    ``overrides`` take precedence over the environment (tests and the demo use them).
    """
    known = (
        {f"{ENV_PREFIX}{name}".upper() for name in Settings.model_fields}
        | set(DEPRECATED)
        | NOT_OURS
    )
    unknown = sorted(
        k for k in os.environ if k.upper().startswith(ENV_PREFIX) and k.upper() not in known
    )
    for old, new in DEPRECATED.items():
        if old not in os.environ:
            continue
        if new in os.environ:
            raise SettingsError(f"{old}: the old name of {new}; set only {new}")
        log.warning("%s is the old name of %s, which it sets; rename it", old, new)
        field = new.removeprefix(ENV_PREFIX).lower()
        overrides = {field: os.environ[old], **overrides}
    if unknown:
        names = ", ".join(unknown)
        raise SettingsError(
            f"{names}: unknown setting{'s' if len(unknown) > 1 else ''} "
            "(docs/settings.md lists every BRIDGE_* setting)"
        )
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        name = f"{ENV_PREFIX}{first['loc'][0]}".upper() if first["loc"] else ENV_PREFIX
        # The message only, never first["input"]: it may be a token.
        message = first["msg"].removeprefix("Value error, ")
        raise SettingsError(f"{name}: {message}") from None
