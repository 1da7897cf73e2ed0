"""``patchwork-bridge wakeup sql|install|check|uninstall``: the trigger on Patchwork's
PostgreSQL that wakes the producer when an event commits (``bridge.wakeup``).

``sql`` prints what ``install`` runs, for a DBA to read or run by hand; ``install`` and
``uninstall`` run it with a DSN whose user may create triggers on ``patchwork_event``
(``--dsn``, else BRIDGE_PATCHWORK_DB); ``check`` says whether the trigger is there and
a listener hears notifications. Each is idempotent and never touches Patchwork's rows.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import TYPE_CHECKING

from bridge.cli.common import CliError, Commands, command
from bridge.settings import load_settings
from bridge.wakeup.listener import first_line, trigger_installed
from bridge.wakeup.sql import CHANNEL, INSTALL, TABLE, TRIGGER, UNINSTALL

if TYPE_CHECKING:
    import psycopg

CHECK_WAIT_S = 5.0


def register(commands: Commands) -> None:
    parser = commands.add_parser(
        "wakeup", help="the trigger on Patchwork's PostgreSQL that wakes the producer"
    )
    actions = parser.add_subparsers(dest="wakeup_command", required=True, metavar="ACTION")
    actions.add_parser("sql", help="print the SQL that install runs")
    for action, what in (
        ("install", "create (or replace) the trigger"),
        ("uninstall", "drop the trigger"),
        ("check", "say whether the trigger is there and notifications arrive"),
    ):
        p = actions.add_parser(action, help=what)
        p.add_argument("--dsn", help="PostgreSQL DSN (default: BRIDGE_PATCHWORK_DB)")
    parser.set_defaults(run=run)


@command
async def run(args: argparse.Namespace) -> None:
    if args.wakeup_command == "sql":
        print(INSTALL, end="")
        return
    dsn = args.dsn or _configured_dsn()
    print(await act(args.wakeup_command, dsn))


def _configured_dsn() -> str:
    db = load_settings().patchwork_db
    if db is None:
        raise CliError("wakeup: give --dsn, or set BRIDGE_PATCHWORK_DB", 2)
    return db.get_secret_value()


async def act(action: str, dsn: str) -> str:
    """Carry out ``install``, ``uninstall`` or ``check``; one line saying what is so."""
    try:
        import psycopg
    except ImportError:
        raise CliError("wakeup: needs psycopg: pip install 'patchwork-bridge[wakeup]'", 2) from None
    try:
        async with await psycopg.AsyncConnection.connect(dsn, connect_timeout=10) as connection:
            if action == "install":
                await connection.execute(INSTALL)
                await connection.commit()
                return f"installed: trigger {TRIGGER} on {TABLE} notifies {CHANNEL}"
            if action == "uninstall":
                await connection.execute(UNINSTALL)
                await connection.commit()
                return f"uninstalled: no trigger {TRIGGER} on {TABLE}"
            return await _check(connection)
    except psycopg.Error as exc:
        raise CliError(f"wakeup {action}: {first_line(exc) or type(exc).__name__}") from None


async def _check(connection: psycopg.AsyncConnection) -> str:
    await connection.set_autocommit(True)
    if not await trigger_installed(connection):
        raise CliError(
            f"wakeup check: no trigger {TRIGGER} on {TABLE}: run `patchwork-bridge wakeup "
            "install` (or `wakeup sql` for a DBA); the producer polls meanwhile"
        )
    await connection.execute(f"LISTEN {CHANNEL}")
    await connection.execute("SELECT pg_notify(%s, 'check')", (CHANNEL,))
    try:
        async with asyncio.timeout(CHECK_WAIT_S):
            async for notify in connection.notifies():
                if notify.payload == "check":
                    break
    except TimeoutError:
        raise CliError(
            f"wakeup check: trigger {TRIGGER} is there, but no notification came back "
            f"within {CHECK_WAIT_S:g}s (a pooler in transaction mode drops LISTEN)"
        ) from None
    return f"ok: trigger {TRIGGER} on {TABLE}; notifications on {CHANNEL} arrive"
