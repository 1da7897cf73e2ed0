"""``patchwork-bridge demo``: the whole path on this machine (``bridge.demo.tour``)."""

from __future__ import annotations

import argparse

from bridge.cli.common import Commands


def register(commands: Commands) -> None:
    demo = commands.add_parser(
        "demo", help="replay recorded events through the whole path, locally"
    )
    demo.add_argument("--events", type=int, default=40, help="events to replay (default 40)")
    demo.add_argument(
        "--linger",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="keep the Patchwork double up this long after the last delivery (default 0)",
    )

    demo.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from bridge.demo.tour import cli  # the demo's double and data: only when asked for

    return cli(args)
