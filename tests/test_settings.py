"""Start-up settings: one clear line per mistake, secrets never shown, JSON logs on request."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from bridge.logs import JsonFormatter
from bridge.settings import SettingsError, load_settings, redact_url

TOKEN = "tok-0123456789abcdef-sekrit"


def run_bridge(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"BRIDGE_POLL_INTERVAL": "soon"}, "BRIDGE_POLL_INTERVAL"),
        ({"BRIDGE_PATCHWORK_URL": "ftp://patchwork.example.org"}, "BRIDGE_PATCHWORK_URL"),
        ({"BRIDGE_PATCHWORK_TIMEZONE": "Mars/Olympus"}, "BRIDGE_PATCHWORK_TIMEZONE"),
        ({"BRIDGE_START": "yesterday"}, "BRIDGE_START"),
        ({"BRIDGE_QUEUE_TYPE": "stream"}, "BRIDGE_QUEUE_TYPE"),
        ({"BRIDGE_POLL_INTERVALL": "5"}, "BRIDGE_POLL_INTERVALL"),
        ({"BRIDGE_AMQP_URL": f"http://guest:{TOKEN}@localhost/"}, "BRIDGE_AMQP_URL"),
        ({}, "BRIDGE_PATCHWORK_URL"),  # the producer cannot start without it
    ],
)
def test_a_bad_setting_stops_start_up_with_one_line_naming_it(env, named):
    result = run_bridge("producer", BRIDGE_PATCHWORK_TOKEN=TOKEN, **env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"patchwork-bridge: {named}:")
    assert TOKEN not in result.stderr + result.stdout


def test_secrets_never_appear_in_repr_or_redacted_urls(monkeypatch):
    monkeypatch.setenv("BRIDGE_PATCHWORK_TOKEN", TOKEN)
    monkeypatch.setenv("BRIDGE_AMQP_URL", f"amqp://bridge:{TOKEN}@rabbit:5672/vhost")
    settings = load_settings()
    assert TOKEN not in repr(settings) and TOKEN not in str(settings)
    assert settings.amqp_url_redacted == "amqp://bridge:***@rabbit:5672/vhost"
    assert redact_url("amqp://rabbit/") == "amqp://rabbit/"


def test_misspelled_setting_is_rejected_not_ignored(monkeypatch):
    monkeypatch.setenv("BRIDGE_SUBSCRIPTION", "/etc/subs.toml")
    with pytest.raises(SettingsError, match=r"^BRIDGE_SUBSCRIPTION: unknown setting"):
        load_settings()


def test_check_config_accepts_good_settings(tmp_path):
    result = run_bridge(
        "check-config",
        BRIDGE_PATCHWORK_URL="https://patchwork.kernel.org",
        BRIDGE_STATE_DIR=str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "configuration ok"


def test_json_log_lines_carry_message_level_and_extra_fields():
    record = logging.LogRecord(
        "bridge.producer", logging.WARNING, __file__, 1, "poll failed (%s)", ("timeout",), None
    )
    record.subscription = "kernelci"
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "poll failed (timeout)"
    assert line["level"] == "warning"
    assert line["logger"] == "bridge.producer"
    assert line["subscription"] == "kernelci"
    assert line["time"].endswith("+00:00")
