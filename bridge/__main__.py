"""Command line: `patchwork-bridge <command>`; each command lives in the module doing the job."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import logging
import sys
from collections.abc import Sequence

from bridge import __version__
from bridge.logs import setup_logging

CHECKED_ROLES = ("producer", "webhook", "stream", "checks", "run")

# command -> "module:function"; the function takes the parsed args and returns an exit code.
HANDLERS = {
    "producer": "bridge.runtime:cli_run",
    "webhook": "bridge.runtime:cli_run",
    "stream": "bridge.runtime:cli_run",
    "checks": "bridge.runtime:cli_run",
    "run": "bridge.runtime:cli_run",
    "demo": "bridge.demo.tour:cli",
    "dlq": "bridge.cli.dlq:cli",
    "subscriptions": "bridge.cli.subscriptions:cli",
    "bind": "bridge.cli.bind:cli",
    "replay": "bridge.cli.replay:cli",
    "migrate": "bridge.cli.migrate:cli",
    "check-config": "bridge.runtime:cli_check_config",
}


ROLE_COMMANDS = (
    (
        "producer",
        "poll Patchwork and publish every event to the exchange",
        "Poll Patchwork's events API and publish every event, once confirmed by RabbitMQ,\n"
        "to the topic exchange keyed <project>.<category>. Resumes from the cursor in\n"
        "BRIDGE_STATE_DIR.\n\n"
        "Settings: BRIDGE_PATCHWORK_URL (required), BRIDGE_PATCHWORK_TIMEZONE,\n"
        "BRIDGE_PATCHWORK_PROJECTS, BRIDGE_PATCHWORK_TOKEN, BRIDGE_POLL_INTERVAL,\n"
        "BRIDGE_POLL_OVERLAP, BRIDGE_START, BRIDGE_STATE_DIR, BRIDGE_AMQP_URL, BRIDGE_EXCHANGE;\n"
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="patchwork-bridge",
        description="Poll Patchwork's events once; publish them to RabbitMQ and deliver webhooks.",
        epilog="Settings come from BRIDGE_* environment variables (see README).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    for name, help_text, description in ROLE_COMMANDS:
        sub.add_parser(
            name,
            help=help_text,
            description=description,
            epilog=ROLE_EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    demo = sub.add_parser("demo", help="replay recorded events through the whole path, locally")
    demo.add_argument("--events", type=int, default=40, help="events to replay (default 40)")
    demo.add_argument(
        "--linger",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="keep the Patchwork double up this long after the last delivery (default 0)",
    )

    dlq = sub.add_parser(
        "dlq",
        help="list, replay or purge dead letters",
        description="Dead letters of a subscription (NAME), or of a queue made by `bind` "
        "(--queue QUEUE: its QUEUE.dead).",
    )
    dlq_sub = dlq.add_subparsers(dest="dlq_command", metavar="ACTION", required=True)
    dlq_actions = {
        "list": "show dead letters without removing them",
        "replay": "send dead letters back for delivery, with a fresh attempt count",
        "purge": "delete all dead letters (asks first)",
    }
    for action, help_text in dlq_actions.items():
        p = dlq_sub.add_parser(action, help=help_text)
        p.add_argument("name", nargs="?", help="subscription name")
        p.add_argument("--queue", help="a queue made by `bind` instead of a subscription")
        if action == "list":
            p.add_argument("--limit", type=int, default=50, help="show at most N (default 50)")
        if action == "replay":
            p.add_argument("--limit", type=int, default=None, help="at most N (default all)")
        if action == "purge":
            p.add_argument("--yes", action="store_true", help="do not ask")

    subs = sub.add_parser("subscriptions", help="list subscriptions; enable, disable or remove one")
    subs_sub = subs.add_subparsers(dest="subscriptions_command", metavar="ACTION", required=True)
    subs_sub.add_parser("list", help="each subscription, its patterns and whether it is enabled")
    for action in ("enable", "disable"):
        p = subs_sub.add_parser(action, help=f"{action} a subscription's deliveries")
        p.add_argument("name", help="subscription name")
    remove = subs_sub.add_parser(
        "remove", help="delete a subscription's queues (main, retry, dead) after showing them"
    )
    remove.add_argument("name", help="subscription name")
    remove.add_argument("--yes", action="store_true", help="do not ask")

    bind = sub.add_parser("bind", help="declare a durable queue bound to the exchange")
    bind.add_argument("queue", help="queue name")
    bind.add_argument("patterns", nargs="*", metavar="PATTERN", help="topic patterns, e.g. dpdk.*")
    bind.add_argument(
        "--remove", action="store_true", help="delete QUEUE, QUEUE.dead and its replay route"
    )
    bind.add_argument("--yes", action="store_true", help="with --remove: do not ask")
    bind.add_argument(
        "--adopt",
        action="store_true",
        help="bind QUEUE although this deployment's bind did not make it (an earlier version's)",
    )

    replay = sub.add_parser(
        "replay",
        help="copy events from the event log into one queue (a CI that joined late)",
        description="Copy the events dated from --since (to --until) out of the event log "
        "into one queue: a queue made by `bind` (--queue) or a subscription's main queue "
        "(--subscription). Never to the exchange, so nobody else gets them again. Each copy "
        "keeps its message_id and carries the header x-patchwork-replay: true. Dates are "
        "Patchwork's server time unless they carry a zone.",
    )
    replay.add_argument("--since", required=True, metavar="DATE", help="ISO 8601, inclusive")
    replay.add_argument("--until", metavar="DATE", help="ISO 8601, exclusive (default: now)")
    replay.add_argument(
        "--events", nargs="+", metavar="PATTERN", help="topic patterns, e.g. dpdk.* (default #)"
    )
    target = replay.add_mutually_exclusive_group()
    target.add_argument("--queue", help="the queue to copy into (it must exist)")
    target.add_argument("--subscription", metavar="NAME", help="a subscription's main queue")
    replay.add_argument("--dry-run", action="store_true", help="count, copy nothing")

    migrate = sub.add_parser(
        "migrate",
        help="move this deployment's messages out of the queue names before 0.2 (bridge.*)",
        description="Versions before 0.2 named queues bridge.webhook.<name> and bridge.checks, "
        "shared by every deployment on a vhost. Move this deployment's waiting, retrying and "
        "dead messages into its own queues (<exchange>.webhook.<name>, <exchange>.checks), "
        "carry a disabled state over, and delete the old queues it empties. Messages of "
        "another deployment are left in place. Set BRIDGE_PATCHWORK_URL: it tells this "
        "deployment's retries and dead letters from another's. Safe to run again.",
    )
    migrate.add_argument("--dry-run", action="store_true", help="show what is there, move nothing")
    migrate.add_argument(
        "--claim-copies",
        action="store_true",
        help="also move retries and dead letters that do not say whose they are (the checks "
        "role's; a subscription's without BRIDGE_PATCHWORK_URL): only if no other deployment "
        "ever used the old queues",
    )

    check = sub.add_parser(
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    # Operator commands log library warnings as one line; the roles set their own format.
    # Like logging.basicConfig: a caller that set up logging already (tests) keeps its own.
    if not logging.getLogger().handlers:
        setup_logging("text", "WARNING")
    module_name, func_name = HANDLERS[args.command].split(":")
    handler = getattr(importlib.import_module(module_name), func_name)
    result = handler(args)
    if inspect.iscoroutine(result):
        result = asyncio.run(result)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
