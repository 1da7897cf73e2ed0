"""The poll loop while this producer holds the lock: each poll performs the steps of the plan
(``bridge.producer.plan``) against Patchwork, publishes what is new page by page while the
next page is fetched, and moves the cursor only past what the broker confirmed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Sequence
from datetime import datetime
from typing import TypeVar

from bridge.events import Event
from bridge.metrics import Metrics
from bridge.producer.cursor import Cursor, CursorStore, CursorWriter
from bridge.producer.patchwork import Page, PatchworkClient, PatchworkError
from bridge.producer.plan import (
    Halve,
    NothingNew,
    Range,
    Read,
    ReadSpans,
    ServedIt,
    sweep_read,
    verdict,
)
from bridge.producer.publisher import Publisher, PublishFailed
from bridge.producer.start import NEWEST_PROBE, initial_cursor
from bridge.producer.triage import PageSorter
from bridge.producer.window import TICK, GapCheck, Window, fold_below_events, parse_date
from bridge.settings import Settings
from bridge.waiting import Ticker, sleep_unless
from bridge.wakeup.listener import Listener

log = logging.getLogger(__name__)

T = TypeVar("T")
BACKOFF_MAX_S = 60.0


class Stopped(Exception):
    """Raised inside a poll when stop was requested while waiting on Patchwork."""


WAKE_BATCH_S = 0.005
"""After a wake-up, before reading: the notifications of a burst of commits come within it."""
MAX_NAMED_READS = 10
"""Late events a wake-up reads at their own dates at most; the gap checks find the rest."""


class Poller:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        sorter: PageSorter,
        store: CursorStore,
        *,
        listener: Listener | None = None,
    ) -> None:
        """``listener``: Patchwork's database saying when an event commits (see
        ``bridge.wakeup.listener``); while it works, polls come at its word and at the
        slow safety interval."""
        self._settings = settings
        self._listener = listener
        self._metrics = metrics
        self._sorter = sorter
        self._writer = CursorWriter(
            store, self._snapshot, lambda _: metrics.cursor_write_errors.inc()
        )
        self._window: Window | None = None
        self._sweep_interval_s = settings.poll_sweep_interval
        self._next_sweep = 0.0
        self._served = 0
        """Events Patchwork served us so far (count requests count as one)."""
        self._keep_from: datetime | None = None
        """This poll's oldest planned read of an older range: ids from then on are kept."""
        self._next_full = 0.0
        """``time.monotonic()`` from which a woken poll is a full one (the sweep too)."""
        self._unheard_until = time.time()
        """Wall time of the last poll that began while nothing listened (or at a resync):
        a gap opened by then may hold an event no notification will name."""
        self.last_success: float | None = None
        """``time.monotonic()`` of the last poll that fetched and published without error."""

    @property
    def cursor_failure(self) -> str | None:
        """Why the cursor could not be saved, while it cannot."""
        return self._writer.failure

    async def run(
        self,
        client: PatchworkClient,
        publisher: Publisher,
        resume_from: Cursor | None,
        stop: asyncio.Event,
    ) -> None:
        """Poll every BRIDGE_POLL_INTERVAL until ``stop``, from ``resume_from`` (None:
        BRIDGE_START decides), backing off after a failure; the window is forgotten after."""
        backoff_s = 0.0
        listener = self._listener
        ticker = Ticker(
            stop, self._settings.poll_interval, wake=listener.woken if listener else None
        )
        try:
            async for _ in ticker:
                if listener is not None and listener.healthy:
                    # What commits together is read together.
                    await sleep_unless(stop, WAKE_BATCH_S)
                named, resync = listener.take() if listener is not None else ([], False)
                if listener is None or resync or not listener.healthy:
                    self._unheard_until = time.time()
                started = time.monotonic()
                try:
                    if self._window is None:
                        await self._begin(client, publisher, resume_from, stop)
                    # A wake-up reads what it names; a tick, a resync or a safety poll due
                    # reads everything (the sweep too).
                    full = not (
                        named
                        and not resync
                        and listener is not None
                        and listener.healthy
                        and started < self._next_full
                    )
                    published = await self._poll_once(client, publisher, stop, named, full=full)
                    if full:
                        self._next_full = time.monotonic() + self._settings.poll_safety_interval
                except Stopped:
                    break
                except (PatchworkError, PublishFailed) as exc:
                    if listener is not None:
                        listener.put_back(named)  # the next poll reads them
                    if isinstance(exc, PatchworkError):
                        # Publish failures were counted per message by the publisher.
                        self._metrics.poll_errors.labels(exc.reason).inc()
                    backoff_s = min(max(1.0, backoff_s * 2), BACKOFF_MAX_S)
                    log.warning(
                        "poll failed (%s): %s; retrying in %.0fs", exc.reason, exc, backoff_s
                    )
                    ticker.pause(backoff_s)
                    continue
                finally:
                    await self._writer.flush()
                backoff_s = 0.0
                # Slowly only while listening and no gap may hold an event committed while
                # nothing listened: those are found by polling, as without the wake-up.
                unheard = self._window is not None and self._window.gaps_opened_by(
                    self._unheard_until
                )
                ticker.interval_s = (
                    self._settings.poll_safety_interval
                    if listener is not None and listener.healthy and not unheard
                    else self._settings.poll_interval
                )
                self.last_success = time.monotonic()
                self._metrics.polls.inc()
                self._metrics.last_poll_success.set_to_current_time()
                self._metrics.poll_duration.observe(time.monotonic() - started)
                if published:
                    assert self._window is not None
                    log.info(
                        "published %d events; cursor at %s", published, self._window.high_water
                    )
            if self._writer.failure is not None:
                log.error(
                    "stopping with the cursor unsaved (%s): the next start republishes "
                    "what was published since the last save",
                    self._writer.failure,
                )
        finally:
            self._window = None

    async def _begin(
        self,
        client: PatchworkClient,
        publisher: Publisher,
        resume_from: Cursor | None,
        stop: asyncio.Event,
    ) -> None:
        cursor = await initial_cursor(
            resume_from,
            self._settings,
            lambda: until_stopped(client.newest(NEWEST_PROBE), stop),
        )
        if resume_from is None:
            # BRIDGE_START applied: recorded in the log before anything is published, so
            # that a producer rebuilding its window from the log (no state directory, a
            # takeover) keeps the same "now".
            await publisher.mark_start(cursor.to_json())
        self._window = Window(
            cursor,
            self._settings.poll_late_wait,
            fold_below=fold_below_events(self._settings.poll_interval),
        )
        self._writer.request()  # "now" must mean the first start, not every start

    # -- one poll --------------------------------------------------------------------------

    async def _poll_once(
        self,
        client: PatchworkClient,
        publisher: Publisher,
        stop: asyncio.Event,
        named: Sequence[tuple[int, str]] = (),
        *,
        full: bool = True,
    ) -> int:
        """Read what is new, the events notifications ``named`` at their own dates, then the
        open gaps and, on a sweep that counts a difference, that range; publish each page
        while the next one is fetched. The new events first: the gaps' events are late
        already.

        Gaps due near the newest date are not counted: the read of new events starts at
        them (``Window.due``).

        Not ``full`` (a wake-up): what is new is read only when a named event is newer
        than the newest published (else all it names committed late), the sweep waits for
        the next full poll, and only the gaps opened while nothing listened are checked
        (their events are named by nothing), unless more were named than are read."""
        window = self._need_window()
        read_before = self._served
        self._keep_from = None
        since = window.since()
        published = 0
        opened_by = None if full or len(named) > MAX_NAMED_READS else self._unheard_until
        read_new = (
            full or since is None or any(parse_date(d) >= parse_date(since) for _, d in named)
        )
        due = window.due(opened_by=opened_by, fold=read_new)
        if read_new:
            if due.read_from is not None:
                self._keep_from = parse_date(due.read_from)
            read = Read(Range(due.read_from or since), "new")
            published += await self._read(client, publisher, stop, read)
        published += await self._read_named(client, publisher, stop, named)
        found, reads = await self._check_gaps(client, stop, due.checks)
        for page in found:
            published += await self._publish_found(publisher, page)
        published += await self._read_all(client, publisher, stop, reads)
        if full:
            # Last: a late event the checks found, published or not yet, would make the
            # sweep's count differ and the sweep read the whole overlap.
            sweep = await self._sweep(client, stop)
            published += await self._read_all(client, publisher, stop, sweep)
        window.prune()
        changes = window.take_changes()
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
                self._settings.poll_late_wait,
            )
        self._metrics.open_gaps.set(window.open_gaps)
        self._metrics.poll_events_read.observe(self._served - read_before)
        self._update_lag()
        return published

    async def _read_named(
        self,
        client: PatchworkClient,
        publisher: Publisher,
        stop: asyncio.Event,
        named: Sequence[tuple[int, str]],
    ) -> int:
        """Each named event not published yet, read at its own date: one event a read."""
        window = self._need_window()
        late = sorted(
            {parse_date(date) for event_id, date in named if not window.has_seen(event_id)}
        )
        reads = [
            Read(Range(date.isoformat(), (date + TICK).isoformat()), "gap")
            for date in late[:MAX_NAMED_READS]
        ]
        return await self._read_all(client, publisher, stop, reads)

    async def _read_all(
        self, client: PatchworkClient, publisher: Publisher, stop: asyncio.Event, reads: list[Read]
    ) -> int:
        # Ids the reads of older ranges still need are kept between their pages.
        self._keep_from = min(
            (parse_date(r.range.since) for r in reads if r.range.since is not None), default=None
        )
        published = 0
        for read in reads:
            published += await self._read(client, publisher, stop, read)
        return published

    async def _check_gaps(
        self, client: PatchworkClient, stop: asyncio.Event, checks: list[GapCheck]
    ) -> tuple[list[Page], list[Read]]:
        """The late events the gap checks found themselves, and the gap ranges to read."""
        # One check at most (``Due.checks``); its halves are counted side by side: Patchwork
        # serves several requests at once, and the next poll's new events wait for these.
        found = await asyncio.gather(*(self._search(client, stop, check) for check in checks))
        return [page for pages, _ in found for page in pages], [
            r for _, reads in found for r in reads
        ]

    async def _search(
        self, client: PatchworkClient, stop: asyncio.Event, check: GapCheck
    ) -> tuple[list[Page], list[Read]]:
        """Count ``check``'s range and do what its verdict says: nothing, publish the one
        event the count served, read, or count both halves (side by side)."""
        window = self._need_window()
        counted, page = await self._count(client, stop, Range(check.since, check.before))
        known = window.known_between(check.since, check.before)
        served_unseen = bool(page.items) and not window.has_seen(_item_id(page))
        match verdict(check, counted, known, served_unseen):
            case NothingNew():
                return [], []
            case ServedIt():
                return [page], []
            case ReadSpans(reads=reads):
                return [], list(reads)
            case Halve(halves=halves):
                low, high = await asyncio.gather(*(self._search(client, stop, h) for h in halves))
                return [*low[0], *high[0]], [*low[1], *high[1]]
        raise AssertionError("unreachable")

    async def _sweep(self, client: PatchworkClient, stop: asyncio.Event) -> list[Read]:
        """The overlap to read again when it is due a sweep and Patchwork's count of it
        differs from what was published (one count's cost otherwise)."""
        window = self._need_window()
        sweep = window.sweep_range()
        now = time.monotonic()
        if sweep is None or not self._sweep_interval_s or now < self._next_sweep:
            return []
        self._next_sweep = now + self._sweep_interval_s
        counted, _ = await self._count(client, stop, Range(*sweep))
        known = window.known_between(*sweep)
        read = sweep_read(sweep, counted, known)
        if read is None:
            return []
        log.info(
            "sweep: Patchwork has %s events from %s to %s, %d of them published; "
            "reading them all again",
            "an unknown number of" if counted is None else counted,
            *sweep,
            known,
        )
        return [read]

    async def _count(
        self, client: PatchworkClient, stop: asyncio.Event, span: Range
    ) -> tuple[int | None, Page]:
        """Patchwork's count of the range (None: it cannot tell), and the one-event page it
        came with."""
        assert span.since is not None and span.before is not None
        counted, page = await until_stopped(client.count(span.since, span.before), stop)
        self._served += len(page.items)
        self._metrics.patchwork_events_read.labels("count").inc(len(page.items))
        return counted, page

    async def _read(
        self, client: PatchworkClient, publisher: Publisher, stop: asyncio.Event, read: Read
    ) -> int:
        window = self._need_window()
        # Ids taken from the previous page: Patchwork's pages shift while we read them, so
        # an event can end one page and start the next. Older pages are in the window.
        previous: set[int] = set()
        published = 0
        confirming: asyncio.Task[int] | None = None
        served = self._metrics.patchwork_events_read.labels(read.kind)
        pages = client.pages(read.range.since, read.range.before)
        try:
            while True:
                page = await until_stopped(anext(pages, None), stop)
                if confirming is not None:
                    published += await confirming
                    confirming = None
                if page is None:
                    break
                self._served += len(page.items)
                served.inc(len(page.items))
                events, fresh = self._sorter.sort(page, previous, window.is_new)
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
        events, fresh = self._sorter.sort(page, set(), self._need_window().is_new)
        return await self._publish_page(publisher, events, fresh)

    async def _publish_page(
        self, publisher: Publisher, events: list[Event], fresh: list[Event]
    ) -> int:
        window = self._need_window()
        result = await publisher.publish(fresh)
        if result.failed:
            window.confirm(result.confirmed, advance=False)
            raise PublishFailed.of(result.failed)
        window.confirm(events)
        window.forget_seen_before(self._keep_from)
        self._writer.request()
        return len(fresh)

    def _need_window(self) -> Window:
        if self._window is None:
            raise RuntimeError("no window: the poller has not begun")
        return self._window

    def _snapshot(self) -> Cursor:
        return self._need_window().cursor()

    def _update_lag(self) -> None:
        newest = self._need_window().high_water_dt
        if newest is not None:
            tz = self._settings.tz
            lag = datetime.now(tz) - newest.replace(tzinfo=tz)
            self._metrics.cursor_lag.set(max(0.0, lag.total_seconds()))


async def until_stopped(aw: Awaitable[T], stop: asyncio.Event) -> T:
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
