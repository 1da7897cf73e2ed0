"""``patchwork-bridge check-config``: what a role would fail on, said before it starts,
without connecting to RabbitMQ or Patchwork."""

from __future__ import annotations

import argparse
import sys
from urllib.parse import urlsplit

from bridge.cli.common import PROG, Commands
from bridge.producer.cursor import CursorError, StateDirError
from bridge.runtime import consumers_for, runs_checks, subscriptions_for
from bridge.settings import Settings, SettingsError, load_settings
from bridge.sinks.netguard import refused_by_name
from bridge.webhook.subscriptions import Subscription

CHECKED_ROLES = ("producer", "webhook", "stream", "checks", "run")


def register(commands: Commands) -> None:
    check = commands.add_parser(
        "check-config",
        help="check what a role needs (settings, subscriptions, state directory), then exit",
        description="Check the BRIDGE_* settings, the subscriptions file and the state "
        "directory as the role will use them, without connecting to RabbitMQ or Patchwork. "
        "Exit 0 when the role can start, 2 with one line per problem otherwise.",
    )
    check.add_argument(
        "--role",
        choices=CHECKED_ROLES,
        help="the command to check for (default: webhook if only BRIDGE_SUBSCRIPTIONS is "
        "set, else run)",
    )
    check.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Check what the role will need, without connecting to RabbitMQ or Patchwork."""
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    role = args.role or _role_described_by(settings)
    problems: list[str] = []
    try:
        subscriptions = subscriptions_for(role, settings)
    except SettingsError as exc:
        problems.extend(str(exc).splitlines())
        subscriptions = []
    try:
        consumers = consumers_for(role, settings)
    except SettingsError as exc:
        problems.extend(str(exc).splitlines())
        consumers = None
    problems.extend(_unreachable_receivers(subscriptions))
    if role in ("producer", "run"):
        try:
            settings.api_base  # noqa: B018 - raises SettingsError without BRIDGE_PATCHWORK_URL
        except SettingsError as exc:
            problems.append(str(exc))
        problems.extend(_state_dir_problems(settings))
    if runs_checks(role, settings):
        from bridge.checks.role import checks_settings_problems

        problems.extend(checks_settings_problems(settings))
    for problem in problems:
        print(f"{PROG}: {problem}", file=sys.stderr)
    if problems:
        return 2
    if role == "run" and not subscriptions:
        also = " and the stream" if consumers is not None else " only"
        print(f"configuration ok for run (no subscriptions: the producer{also})")
    else:
        print(f"configuration ok for {role}")
    return 0


def _role_described_by(settings: Settings) -> str:
    """Without --role: a webhook (or stream) process where only subscriptions (or stream
    consumers) are set, else ``run``."""
    if settings.patchwork_url is None and settings.subscriptions is not None:
        return "webhook"
    if settings.patchwork_url is None and settings.stream_consumers is not None:
        return "stream"
    return "run"


def _state_dir_problems(settings: Settings) -> list[str]:
    """What would stop the producer at its state directory: not writable, a bad cursor."""
    from bridge.producer.cursor import CursorStore, probe_writable

    try:
        probe_writable(settings.state_dir)
        CursorStore(settings.state_dir).load_now()
    except (StateDirError, CursorError) as exc:
        return [str(exc)]
    return []


def _unreachable_receivers(subscriptions: list[Subscription]) -> list[str]:
    """Webhook URLs whose host name resolves only to addresses the SSRF guard refuses: every
    event would be dead-lettered as ``ssrf``. (Literals and ``localhost`` are refused when
    the file is loaded; names can only be asked of the resolver.)"""
    problems = []
    for subscription in subscriptions:
        if subscription.sink != "webhook" or subscription.allow_private_network:
            continue
        host = urlsplit(subscription.url or "").hostname or ""
        refused = refused_by_name(host)
        if refused is not None:
            problems.append(
                f"webhook {subscription.name!r}: url: {host} resolves to {refused.address} "
                f"({refused.reason}), refused by the SSRF guard: every event would be "
                "dead-lettered; set allow_private_network = true to deliver there"
            )
    return problems
