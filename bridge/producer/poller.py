"""The producer role: poll Patchwork, publish each new event once, cursor moves after confirms."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TypeVar

from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from bridge.amqp import connect_with_retry, declare_exchange, is_connected
from bridge.eventlog import declare_log, log_exists
from bridge.events import Event
from bridge.metrics import Metrics
from bridge.producer.cursor import Cursor, CursorStore, CursorWriter, probe_writable
from bridge.producer.lock import PollerLock
from bridge.producer.logtail import cursor_from_log
from bridge.producer.patchwork import Page, PatchworkClient, PatchworkError
from bridge.producer.publisher import Publisher, PublishFailed
from bridge.producer.start import NEWEST_PROBE, initial_cursor
from bridge.producer.triage import EventCheck, PageSorter
from bridge.producer.window import GapCheck, Window, parse_date
from bridge.settings import Settings
from bridge.waiting import Ticker

log = logging.getLogger(__name__)

T = TypeVar("T")
BACKOFF_MAX_S = 60.0


class Stopped(Exception):
    """Raised inside a poll when stop was requested while waiting on Patchwork."""


class Producer:
    name = "producer"

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        *,
        check_event: EventCheck | None = None,
        prepare: Callable[[AbstractChannel], Awaitable[None]] | None = None,
    ) -> None:
        """``prepare`` runs once on the publishing channel before the first poll (queues
        that must exist before anything is published)."""
        self._settings = settings
        self._metrics = metrics
        self._source = settings.api_base  # raises SettingsError early if the URL is missing
        self._tz = settings.tz
        self._sorter = PageSorter(settings, metrics, check_event)
        self._prepare = prepare
        self._store = CursorStore(settings.state_dir)
        self._writer = CursorWriter(
            self._store, self._snapshot, lambda _: metrics.cursor_write_errors.inc()
        )
        self._connection: AbstractRobustConnection | None = None
        self._window: Window | None = None
        self._resume_from: Cursor | None = None
        """When this producer took the lock: the cursor file or the log's tail, whichever
        is further (None: neither, BRIDGE_START decides)."""
        self._lock = PollerLock(settings)
        self._overlap_s = settings.poll_overlap
        self._sweep_interval_s = settings.poll_sweep_interval
        self._next_sweep = 0.0
        self._served = 0
        """Events Patchwork served us so far (count requests count as one)."""
        self._keep_from: datetime | None = None
        """This poll's oldest planned read of an older range: ids from then on are kept."""
        self._log_was_new = False
        """This producer declared the event log: nothing was published to it before."""
        self._last_success: float | None = None

    # -- Role ---------------------------------------------------------------------------------

    def connected(self) -> bool:
        return is_connected(self._connection)

    def readiness(self) -> tuple[bool, str]:
        if not self.connected():
            return False, "producer not connected to RabbitMQ"
        if self._lock.standby:
            return True, ""  # a standby is healthy: it takes over when the poller goes
        if self._writer.failure is not None:
            return False, f"producer cannot save its cursor ({self._writer.failure})"
        # Three missed polls, each allowed its full request timeout.
        stale_s = 3 * self._settings.poll_interval + self._settings.patchwork_timeout
        if self._last_success is None or time.monotonic() - self._last_success > stale_s:
            return False, "producer has no recent successful poll"
        return True, ""

    async def run(self, stop: asyncio.Event) -> None:
        # Before connecting: an unusable state directory or an unreadable cursor is the
        # operator's to mend, at once (not when this producer's turn to poll comes).
        await asyncio.to_thread(probe_writable, self._settings.state_dir)
        await self._store.load()
        self._connection = await connect_with_retry(self._settings, "producer", stop)
        if self._connection is None:
            return  # stopped before RabbitMQ answered
        try:
            channel = await self._connection.channel(publisher_confirms=True)
            exchange = await declare_exchange(channel, self._settings.exchange)
            exists = await log_exists(self._connection, self._settings.exchange)
            self._log_was_new = not exists
            await declare_log(channel, self._settings)
            if self._prepare is not None:
                await self._prepare(channel)
            publisher = Publisher(
                exchange, self._source, self._tz, self._metrics, self._settings.publish_in_flight
            )
            async with PatchworkClient(
                self._settings, self._metrics.patchwork_request_duration
            ) as client:
                while await self._lock.acquire(stop):
                    await self._poll_while_holding(client, publisher, stop)
        finally:
            await self._lock.release()
            await self._connection.close()

    async def _poll_while_holding(
        self, client: PatchworkClient, publisher: Publisher, stop: asyncio.Event
    ) -> None:
        """Poll until stopped or the lock is lost; then stand by again, window forgotten:
        whoever polls next starts from the event log."""
        polling = asyncio.Event()
        watcher = asyncio.create_task(_set_on_first(polling, stop, self._lock.lost))
        try:
            await self._store.lock()
            self._metrics.producer_active.set(1)
            saved = await self._store.load()
            assert self._connection is not None
            if self._log_was_new and not self._lock.waited:
                # Only a lock holder publishes, and none could hold it before this one: an
                # empty log, known without waiting for a read to find nothing.
                log.info("the event log is new: nothing published before this producer")
                log_tail = None
            else:
                try:
                    log_tail = await _until_stopped(
                        cursor_from_log(self._connection, self._settings), polling
                    )
                except Stopped:
                    return
            self._log_was_new = False
            self._resume_from = _newer(saved, log_tail)
            await self._poll_loop(client, publisher, polling)
            if self._writer.failure is not None:
                log.error(
                    "stopping with the cursor unsaved (%s): the next start republishes "
                    "what was published since the last save",
                    self._writer.failure,
                )
        finally:
            self._metrics.producer_active.set(0)
            self._window = None
            self._store.unlock()
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        if self._lock.lost.is_set() and not stop.is_set():
            log.warning(
                "lost the poller lock (its connection closed): stopped polling; "
                "another producer may poll now, this one stands by"
            )
            await self._lock.release()

    # -- polling ------------------------------------------------------------------------------

    async def _poll_loop(
        self, client: PatchworkClient, publisher: Publisher, stop: asyncio.Event
    ) -> None:
        backoff_s = 0.0
        ticker = Ticker(stop, self._settings.poll_interval)
        async for _ in ticker:
            started = time.monotonic()
            try:
                if self._window is None:
                    saved = await initial_cursor(
                        self._resume_from,
                        self._settings,
                        lambda: _until_stopped(client.newest(NEWEST_PROBE), stop),
                    )
                    if self._resume_from is None:
                        # BRIDGE_START applied: recorded in the log before anything is
                        # published, so that a producer rebuilding its window from the log
                        # keeps the same "now" (no state directory, a takeover).
                        await publisher.mark_start(saved.to_json())
                    self._window = Window(saved, self._settings.poll_overlap)
                    self._writer.request()  # "now" must mean the first start, not every start
                published = await self._poll_once(client, publisher, stop)
            except Stopped:
                break
            except (PatchworkError, PublishFailed) as exc:
                if isinstance(exc, PatchworkError):
                    # Publish failures were counted per message by the publisher.
                    self._metrics.poll_errors.labels(exc.reason).inc()
                backoff_s = min(max(1.0, backoff_s * 2), BACKOFF_MAX_S)
                log.warning("poll failed (%s): %s; retrying in %.0fs", exc.reason, exc, backoff_s)
                ticker.pause(backoff_s)
                continue
            finally:
                await self._writer.flush()
            backoff_s = 0.0
            self._last_success = time.monotonic()
            self._metrics.polls.inc()
            self._metrics.last_poll_success.set_to_current_time()
            self._metrics.poll_duration.observe(time.monotonic() - started)
            if published:
                log.info("published %d events; cursor at %s", published, self._window.high_water)

    async def _poll_once(
        self, client: PatchworkClient, publisher: Publisher, stop: asyncio.Event
    ) -> int:
        """Read what is new, then the open gaps and, on a sweep that counts a difference,
        that range; publish each page while the next one is fetched. The new events
        first: counting the gaps takes a request each, and they are late already."""
        assert self._window is not None
        read_before = self._served
        self._keep_from = None
        published = await self._read(client, publisher, stop, self._window.since(), None, "new")
        found, reads = await self._check_gaps(client, stop)
        for page in found:
            published += await self._publish_found(publisher, page)
        published += await self._read_ranges(client, publisher, stop, reads)
        # Last: a late event the checks found, published or not yet, would make the sweep's
        # count differ and the sweep read the whole overlap.
        published += await self._read_ranges(
            client, publisher, stop, await self._sweep(client, stop)
        )
        self._window.prune()
        changes = self._window.take_changes()
        for outcome, n in (
            ("opened", changes.opened),
            ("filled", changes.filled),
            ("expired", changes.expired),
        ):
            if n:
                self._metrics.id_gaps.labels(outcome).inc(n)
        if changes.expired:
            log.info(
                "%d id gaps closed unfilled after %gs (rolled-back mails, hidden comments)",
                changes.expired,
                self._settings.poll_overlap,
            )
        self._metrics.open_gaps.set(self._window.open_gaps)
        self._metrics.poll_events_read.observe(self._served - read_before)
        self._update_lag()
        return published

    async def _read_ranges(
        self,
        client: PatchworkClient,
        publisher: Publisher,
        stop: asyncio.Event,
        reads: list[tuple[str, str, str]],
    ) -> int:
        # Ids the reads of older ranges still need are kept between their pages.
        self._keep_from = min((parse_date(since) for since, _, _ in reads), default=None)
        published = 0
        for since, before, kind in reads:
            published += await self._read(client, publisher, stop, since, before, kind)
        return published

    async def _check_gaps(
        self, client: PatchworkClient, stop: asyncio.Event
    ) -> tuple[list[Page], list[tuple[str, str, str]]]:
        """The late events the gap checks found themselves, and (since, before, "gap") of
        each range they found a difference in but could not tell which event."""
        assert self._window is not None
        # Counted side by side: Patchwork serves several requests at once, and the next
        # poll's new events wait for these.
        found = await asyncio.gather(
            *(self._filled(client, stop, check) for check in self._window.gap_checks())
        )
        reads = [(*span, "gap") for _, spans in found for span in spans]
        return [page for pages, _ in found for page in pages], reads

    async def _sweep(
        self, client: PatchworkClient, stop: asyncio.Event
    ) -> list[tuple[str, str, str]]:
        """The overlap to read again when it is due a sweep and Patchwork's count of it
        differs from what was published (one count's cost otherwise)."""
        assert self._window is not None
        sweep = self._window.sweep_range()
        now = time.monotonic()
        if sweep is None or not self._sweep_interval_s or now < self._next_sweep:
            return []
        self._next_sweep = now + self._sweep_interval_s
        counted, _ = await self._count(client, stop, *sweep)
        known = self._window.known_between(*sweep)
        if counted == known:
            return []
        log.info(
            "sweep: Patchwork has %s events from %s to %s, %d of them published; "
            "reading them all again",
            "an unknown number of" if counted is None else counted,
            *sweep,
            known,
        )
        return [(*sweep, "sweep")]

    async def _filled(
        self, client: PatchworkClient, stop: asyncio.Event, check: GapCheck
    ) -> tuple[list[Page], list[tuple[str, str]]]:
        """What ``check`` found: the one-event pages that are the late event itself, and
        the gap ranges still to read.

        Patchwork counts a range for one event's cost at most (none for an empty range);
        a read would serve every event around a gap again on each check, while its
        writer has not committed. A count that differs is halved until the ranges
        holding the difference are found.
        """
        assert self._window is not None
        counted, page = await self._count(client, stop, check.since, check.before)
        known = self._window.known_between(check.since, check.before)
        if counted is not None and counted == known:
            return [], []
        if counted == known + 1 and page.items and not self._window.has_seen(_item_id(page)):
            return [page], []  # the oldest event of the range is the only one missing
        if counted is None or len(check.spans) == 1:
            return [], list(check.spans)
        low, high = await asyncio.gather(*(self._filled(client, stop, h) for h in check.halves()))
        return [*low[0], *high[0]], [*low[1], *high[1]]

    async def _count(
        self, client: PatchworkClient, stop: asyncio.Event, since: str, before: str
    ) -> tuple[int | None, Page]:
        """Patchwork's count of ``since <= date < before`` (None: it cannot tell), and the
        one-event page it came with."""
        counted, page = await _until_stopped(client.count(since, before), stop)
        self._served += len(page.items)
        self._metrics.patchwork_events_read.labels("count").inc(len(page.items))
        return counted, page

    async def _read(
        self,
        client: PatchworkClient,
        publisher: Publisher,
        stop: asyncio.Event,
        since: str | None,
        before: str | None,
        kind: str,
    ) -> int:
        assert self._window is not None
        # Ids taken from the previous page: Patchwork's pages shift while we read them, so
        # an event can end one page and start the next. Older pages are in the window.
        previous: set[int] = set()
        published = 0
        confirming: asyncio.Task[int] | None = None
        served = self._metrics.patchwork_events_read.labels(kind)
        pages = client.pages(since, before)
        try:
            while True:
                page = await _until_stopped(anext(pages, None), stop)
                if confirming is not None:
                    published += await confirming
                    confirming = None
                if page is None:
                    break
                self._served += len(page.items)
                served.inc(len(page.items))
                events, fresh = self._sorter.sort(page, previous, self._window.is_new)
                previous = {event.id for event in events}
                confirming = asyncio.create_task(self._publish_page(publisher, events, fresh))
                if stop.is_set():
                    break
        finally:
            if confirming is not None:
                # Let publishes already sent finish, even on stop or error, so the cursor
                # records them and a restart does not send them again.
                published += await asyncio.shield(confirming)
            await pages.aclose()  # type: ignore[attr-defined]
        return published

    async def _publish_found(self, publisher: Publisher, page: Page) -> int:
        """A late event a gap check served (a one-event page): published as a read's."""
        assert self._window is not None
        events, fresh = self._sorter.sort(page, set(), self._window.is_new)
        return await self._publish_page(publisher, events, fresh)

    async def _publish_page(
        self, publisher: Publisher, events: list[Event], fresh: list[Event]
    ) -> int:
        assert self._window is not None
        result = await publisher.publish(fresh)
        if result.failed:
            self._window.confirm(result.confirmed, advance=False)
            raise PublishFailed.of(result.failed)
        self._window.confirm(events)
        self._window.forget_seen_before(self._keep_from)
        self._writer.request()
        return len(fresh)

    def _snapshot(self) -> Cursor:
        assert self._window is not None
        return self._window.cursor()

    def _update_lag(self) -> None:
        assert self._window is not None
        newest = self._window.high_water_dt
        if newest is not None:
            lag = datetime.now(self._tz) - newest.replace(tzinfo=self._tz)
            self._metrics.cursor_lag.set(max(0.0, lag.total_seconds()))


async def _until_stopped(aw: Awaitable[T], stop: asyncio.Event) -> T:
    """Await ``aw`` unless stop is set first; then cancel it and raise Stopped."""
    task = asyncio.ensure_future(aw)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise Stopped


def _item_id(page: Page) -> object:
    item = page.items[0][0]
    return item.get("id") if isinstance(item, dict) else None


def _newer(saved: Cursor | None, log_tail: Cursor | None) -> Cursor | None:
    """The cursor file when it is at least as far as the log (it also knows the open
    gaps); else the log's tail: a lost state directory, or a takeover from another host."""
    if log_tail is None:
        return saved
    if saved is not None and (saved.max_id or 0) >= (log_tail.max_id or 0):
        return saved
    log.info(
        "starting from the event log's tail (newest id %s)%s",
        log_tail.max_id,
        "" if saved is None else f", ahead of the cursor file (newest id {saved.max_id})",
    )
    return log_tail


async def _set_on_first(target: asyncio.Event, *events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        target.set()
    finally:
        for wait in waits:
            wait.cancel()
