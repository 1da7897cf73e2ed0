"""Subscriptions: who wants which events, read from the TOML file of BRIDGE_SUBSCRIPTIONS.

CONTRACT (field names are shared by the consumer and the sinks; do not rename):
loading and validation are filled in by the sinks/subscriptions work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr

DEFAULT_RETRY_SCHEDULE_S = [5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0]


class Subscription(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

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
    secret_file: Path | None = None
    bearer_token: SecretStr | None = None
    bearer_token_file: Path | None = None
    timeout: float = Field(15.0, gt=0)
    """Seconds for the whole attempt."""
    concurrency: int = Field(16, ge=1)
    retry_schedule: list[float] = DEFAULT_RETRY_SCHEDULE_S
    """Delays in seconds between attempts; attempts = 1 + len(retry_schedule)."""
    allow_private_network: bool = False
