"""Listening to Patchwork's PostgreSQL: a wake-up for the producer's poller.

While the listen connection is healthy and the trigger is installed, the poller polls
only at the slow safety interval and whenever a notification says an event was committed
(a few milliseconds later, so that what commits together is read together). Each
notification names its event (id and date): the poller reads that event where it is,
even when it committed after newer ones. When the
connection breaks or the trigger is missing, it says so once, counts it, and the poller
polls at ``BRIDGE_POLL_INTERVAL`` until listening works again: the API is read either
way, so nothing is lost across a break, only sooner found.

psycopg 3 (the ``wakeup`` extra) does the LISTEN; it is imported only when
BRIDGE_PATCHWORK_DB is set.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING

from bridge.metrics import Metrics
from bridge.settings import SettingsError
from bridge.waiting import sleep_unless
from bridge.wakeup.sql import CHANNEL, TABLE, TRIGGER, TRIGGER_EXISTS

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10
HEALTH_CHECK_S = 15.0
"""A quiet connection is asked whether the trigger is there this often: a dead connection
or a dropped trigger is found within it."""
RETRY_FIRST_S = 1.0
"""The first wait after a failed connection; it doubles up to ``RETRY_MAX_S``."""
RETRY_MAX_S = 30.0
TRIGGER_RECHECK_S = 60.0
"""Without the trigger, how often to look again."""
MAX_NAMED = 1000
"""Named events kept for the poller at most; past that, it reads everything due instead."""


class Listener:
    """Owns its connection; ``run`` until stop. ``woken`` is set at every notification."""

    def __init__(
        self,
        dsn: str,
        metrics: Metrics,
        *,
        health_check_s: float = HEALTH_CHECK_S,
        retry_first_s: float = RETRY_FIRST_S,
        trigger_recheck_s: float = TRIGGER_RECHECK_S,
    ) -> None:
        """SettingsError when psycopg is not installed: a mistake no retry mends."""
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise SettingsError(
                "BRIDGE_PATCHWORK_DB: listening needs psycopg: pip install "
                "'patchwork-bridge[wakeup]'"
            ) from None
        self._dsn = dsn
        self._metrics = metrics
        self._health_check_s = health_check_s
        self._retry_first_s = retry_first_s
        self._trigger_recheck_s = trigger_recheck_s
        self.attempts = 0
        """Connections tried and ended (failed, cut, or no trigger): what a test waits on."""
        self.woken = asyncio.Event()
        self.healthy = False
        """Listening, with the trigger in place: the poller may poll slowly."""
        self._said_down = False
        """Not listening has been said (once until listening works again)."""
        self.notifications = 0
        self._named: list[tuple[int, str]] = []
        self._resync = False
        """Set when what was committed can no longer be known from names alone: on (re)connect
        (nothing was heard meanwhile), or a payload that names nothing we can read."""

    def take(self) -> tuple[list[tuple[int, str]], bool]:
        """The events named since the last call, as ``(id, date)``, and whether the poller
        must also read everything due (a resync)."""
        named, resync = self._named, self._resync
        self._named, self._resync = [], False
        return named, resync

    async def run(self, stop: asyncio.Event) -> None:
        import psycopg

        retry_s = self._retry_first_s
        while not stop.is_set():
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._dsn,
                    autocommit=True,
                    connect_timeout=CONNECT_TIMEOUT_S,
                    keepalives=1,
                    keepalives_idle=10,
                    keepalives_interval=5,
                    keepalives_count=3,
                ) as connection:
                    if not await trigger_installed(connection):
                        self._down(
                            "no_trigger",
                            f"no trigger {TRIGGER} on {TABLE}: run "
                            "`patchwork-bridge wakeup install` (or its SQL)",
                        )
                        self.attempts += 1
                        if await sleep_unless(stop, self._trigger_recheck_s):
                            return
                        continue
                    await connection.execute(f"LISTEN {CHANNEL}")
                    self.healthy, self._said_down, retry_s = True, False, self._retry_first_s
                    self._metrics.wakeup_listening.set(1)
                    log.info("wakeup: listening on %s; polling at the safety interval", CHANNEL)
                    self._resync = True  # read what committed while we were not listening
                    self.woken.set()
                    await self._listen(connection, stop)
            except (OSError, psycopg.Error) as exc:
                self._down("connection", f"{type(exc).__name__}: {first_line(exc)}")
            self.attempts += 1
            if await sleep_unless(stop, retry_s):
                return
            retry_s = min(retry_s * 2, RETRY_MAX_S)

    async def _listen(self, connection: psycopg.AsyncConnection, stop: asyncio.Event) -> None:
        while not stop.is_set():
            async for notify in connection.notifies(timeout=self._health_check_s):
                self.notifications += 1
                self._metrics.wakeup_notifications.inc()
                self._name(notify.payload)
                self.woken.set()
                if stop.is_set():
                    return
            # Quiet: is the connection still there, and the trigger (a DBA may drop it)?
            if not await trigger_installed(connection):
                self._down(
                    "no_trigger",
                    f"trigger {TRIGGER} on {TABLE} was dropped: run "
                    "`patchwork-bridge wakeup install` (or its SQL)",
                )
                return

    def put_back(self, named: list[tuple[int, str]]) -> None:
        """Names a poll took and could not read (Patchwork failed): the next poll reads them."""
        if named:
            self._named[:0] = named[: MAX_NAMED - len(self._named)]

    def _name(self, payload: str) -> None:
        try:
            said = json.loads(payload)
            named = (int(said["id"]), str(said["date"]))
        except (ValueError, TypeError, KeyError):
            log.debug("wakeup: a notification without an id and a date: %.200s", payload)
            self._resync = True
            return
        if len(self._named) >= MAX_NAMED:
            self._named.clear()
            self._resync = True
        self._named.append(named)

    def _down(self, reason: str, why: str) -> None:
        """Polling as before; said and counted once until listening works again."""
        self.healthy = False
        self._metrics.wakeup_listening.set(0)
        if not self._said_down:
            self._said_down = True
            self._metrics.wakeup_failures.labels(reason).inc()
            log.warning(
                "wakeup: not listening (%s); polling every BRIDGE_POLL_INTERVAL until it is back",
                why,
            )


async def trigger_installed(connection: psycopg.AsyncConnection) -> bool:
    """Whether ``patchwork_event`` has the wake-up trigger."""
    cursor = await connection.execute(TRIGGER_EXISTS, (TRIGGER, TABLE))
    row = await cursor.fetchone()
    return bool(row and row[0])


def first_line(exc: BaseException) -> str:
    """A database error's first line: psycopg's messages go on with hints and context."""
    return (str(exc).strip().splitlines() or [""])[0]
