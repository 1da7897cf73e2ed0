"""Command line: `patchwork-bridge <command>`; each command's module (``bridge.cli``) registers
its parser and carries it out."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from bridge import __version__
from bridge.cli import COMMANDS
from bridge.logs import setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="patchwork-bridge",
        description="Poll Patchwork's events once; publish them to RabbitMQ and deliver webhooks.",
        epilog="Settings come from BRIDGE_* environment variables (docs/settings.md).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.register(commands)
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
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
