"""The long-running commands: ``producer``, ``webhook``, ``stream``, ``checks`` and ``run``,
each the roles it names (``bridge.runtime``) as one process until SIGTERM or Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import sys

from bridge.broker.errors import BrokerRefused, TopologyError
from bridge.cli.common import PROG, Commands
from bridge.http import PortInUse
from bridge.logs import setup_logging
from bridge.metrics import Metrics
from bridge.producer.cursor import CursorError, StateDirError
from bridge.runtime import build_roles, serve
from bridge.settings import SettingsError, load_settings

OPERATOR_ERRORS = (BrokerRefused, PortInUse, StateDirError, CursorError, TopologyError)
"""Mistakes an operator mends (one line, exit 2), unlike our bugs (a traceback, once)."""

ROLE_COMMANDS = (
    (
        "producer",
        "poll Patchwork and publish every event to the exchange",
        "Poll Patchwork's events API and publish every event, once confirmed by RabbitMQ,\n"
        "to the topic exchange keyed <project>.<category>. Resumes from the cursor in\n"
        "BRIDGE_STATE_DIR.\n\n"
        "Settings: BRIDGE_PATCHWORK_URL (required), BRIDGE_PATCHWORK_TIMEZONE,\n"
        "BRIDGE_PATCHWORK_PROJECTS, BRIDGE_PATCHWORK_TOKEN, BRIDGE_POLL_INTERVAL,\n"
        "BRIDGE_POLL_LATE_WAIT, BRIDGE_START, BRIDGE_STATE_DIR, BRIDGE_AMQP_URL, BRIDGE_EXCHANGE;\n"
        "BRIDGE_SUBSCRIPTIONS, if set, names queues to declare before the first publish.",
    ),
    (
        "webhook",
        "deliver events to the subscriptions' webhooks",
        "Deliver the events of each subscription in BRIDGE_SUBSCRIPTIONS (a TOML file of\n"
        "[[webhook]] tables) from its own queue: signed POSTs, retries on a schedule, dead\n"
        "letters after the last attempt. Run as many as you like: they share the queues.\n\n"
        "Settings: BRIDGE_SUBSCRIPTIONS (required), BRIDGE_AMQP_URL, BRIDGE_EXCHANGE,\n"
        "BRIDGE_QUEUE_TYPE, BRIDGE_QUEUE_DEPTH_INTERVAL.",
    ),
    (
        "stream",
        "serve the event log as Server-Sent Events to CI systems without a public URL",
        "Serve GET /v1/events (Server-Sent Events from the event log, resumable with\n"
        "Last-Event-ID) and a live page at / to the consumers of BRIDGE_STREAM_CONSUMERS\n"
        "(a TOML file of [[consumer]] tables, each with a token). Run as many as you like.\n\n"
        "Settings: BRIDGE_STREAM_CONSUMERS (required), BRIDGE_STREAM_HOST, BRIDGE_STREAM_PORT,\n"
        "BRIDGE_AMQP_URL, BRIDGE_EXCHANGE, BRIDGE_PATCHWORK_TIMEZONE (for since=).",
    ),
    (
        "checks",
        "post CI results from the results exchange to Patchwork as checks",
        "Consume the results CI systems publish to <exchange>.results (routing key\n"
        "<project>.check) or POST to the stream's /v1/checks, and create each as a check in\n"
        "Patchwork: one per patch (a series' result on each of its patches), once even if\n"
        "delivered twice; retries through the broker, invalid results and 4xx to\n"
        "bridge.checks.dead.\n\n"
        "Settings: BRIDGE_PATCHWORK_URL and BRIDGE_PATCHWORK_TOKEN (a maintainer's; both\n"
        "required), BRIDGE_CHECKS_RATE, BRIDGE_AMQP_URL, BRIDGE_EXCHANGE, BRIDGE_QUEUE_TYPE.",
    ),
    (
        "run",
        "producer, webhook and stream in one process (small sites)",
        "The producer and, when BRIDGE_SUBSCRIPTIONS lists any, the webhook role, and when\n"
        "BRIDGE_STREAM_CONSUMERS is set, the stream role, and with BRIDGE_CHECKS=true the\n"
        "checks role, in one process: the default for a small site. The settings of each apply.",
    ),
)
ROLE_EPILOG = (
    "All roles: BRIDGE_HTTP_HOST/BRIDGE_HTTP_PORT serve /metrics, /healthz and /readyz;\n"
    "BRIDGE_LOG_FORMAT, BRIDGE_LOG_LEVEL. SIGTERM or Ctrl-C: take no new work, finish\n"
    "what is in flight, exit. Every setting: docs/settings.md; check them first with\n"
    "`patchwork-bridge check-config --role ROLE`."
)


def register(commands: Commands) -> None:
    for name, help_text, description in ROLE_COMMANDS:
        commands.add_parser(
            name,
            help=help_text,
            description=description,
            epilog=ROLE_EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        ).set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Not ``bridge.cli.common.command``: its own logging, and a role's failure that is the
    operator's mistake is one line, while a bug of ours keeps its traceback."""
    try:
        settings = load_settings()
        setup_logging(settings.log_format, settings.log_level)
        metrics = Metrics()
        roles = build_roles(args.command, settings, metrics)
    except SettingsError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(serve(roles, settings, metrics))
    except (*OPERATOR_ERRORS, ExceptionGroup) as exc:
        fatal = operator_error(exc)
        if fatal is None:
            raise  # our bug: its traceback, once
        print(f"{PROG}: {fatal}", file=sys.stderr)
        return 2


def operator_error(exc: BaseException) -> BaseException | None:
    """The operator's mistake behind a role's failure (a refused login, a port in use)."""
    if isinstance(exc, OPERATOR_ERRORS):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := operator_error(inner)) is not None:
                return found
    return None
