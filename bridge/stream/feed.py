"""One client's events: read from the log from its position, then handed on by the hub.

``Feed.entries`` is three phases (history, seam, live). The seam between the log and the
hub is exact: the client joins the hub, which notes the last offset it had handed out (the
seam), and the client reads the log up to the seam itself. Offsets in a stream are
consecutive, so nothing falls between and nothing is sent twice.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime

from aio_pika.abc import AbstractIncomingMessage

from bridge.broker.calls import BROKER_TIMEOUT_S
from bridge.eventlog import IDLE_END_S, SINCE_SKEW, logged_event, offset_of
from bridge.stream.hub import Hub, LogEntry, Subscriber, entry_of
from bridge.stream.positions import BadPosition, Position, position_of
from bridge.stream.reads import LogReads

log = logging.getLogger(__name__)

HISTORY_PREFETCH = 100
"""Per client catching up: what the broker may send ahead of what the client took."""
FIRST_WAIT_S = 3.0
"""A position with nothing at it within this long is not in this log."""
HELD_WAIT_S = BROKER_TIMEOUT_S
"""For a read of what the log is known to hold: a busy broker may take this long to start
sending; after that the client's stream ends (or it gets a 503) and it tries again."""


class LogStalled(Exception):
    """The log sent nothing where it must hold events: the client's stream ends, and it
    resumes from its last id."""


@dataclass(frozen=True, slots=True)
class Gap:
    """The client asked for a position older than the log: events between are gone."""

    asked: Position
    oldest: Position


@dataclass(frozen=True, slots=True)
class After:
    """Resume right after this position (Last-Event-ID)."""

    position: Position


@dataclass(frozen=True, slots=True)
class Since:
    """Events dated at or after this time, naive in Patchwork's zone, as replay's --since."""

    local: datetime
    utc: datetime


Start = After | Since | None
"""None: from now on."""


class Feed:
    def __init__(
        self,
        hub: Hub,
        reads: LogReads,
        wanted: Callable[[str], bool],
        limit: int,
    ) -> None:
        self._hub = hub
        self._reads = reads
        self.subscriber = Subscriber(wanted, limit)
        self.last_read: int | None = None
        """The newest offset this client is past (sent, or not wanted)."""
        self._since: datetime | None = None
        self._history: AsyncGenerator[AbstractIncomingMessage] | None = None
        self._first: AbstractIncomingMessage | None = None

    async def open(self, start: Start) -> Gap | None:
        """Find the start before anything is sent: raises BadPosition, LogMissing, and
        LogStalled when the broker does not send in time what the log is known to hold."""
        if start is None:
            return None  # from now on: the hub alone
        if isinstance(start, Since):
            await self._open_since(start)
            return None
        return await self._open_after(start.position)

    async def _open_since(self, start: Since) -> None:
        self._since = start.local
        read_from, tail = start.utc - SINCE_SKEW, self._hub.tail
        held = self._hub.holds_published_since(read_from)
        self._history = self._read(read_from, held)
        self._first = await anext(self._history, None)  # raises LogMissing now, not later
        if self._first is not None:
            return
        if held or self._hub.tail != tail:
            # The log holds events from then, or got some meanwhile, and the read sent
            # none: a broker too busy to answer, not an empty range.
            await self.close()
            raise LogStalled("the event log sent nothing from a time it holds")
        self.last_read = tail  # nothing after it yet: the seam read starts there

    async def _open_after(self, asked: Position) -> Gap | None:
        held = self._hub.holds(asked.offset)
        self._history = self._read(asked.offset, held)
        first = await anext(self._history, None)
        found = None if first is None else position_of(offset_of(first), first.message_id)
        if found is None and held:
            await self.close()  # a broker too busy to answer, not a position past the end
            raise LogStalled("the event log sent nothing from a position it holds")
        if found is None or found.offset < asked.offset:
            await self.close()
            raise BadPosition("Last-Event-ID: a position past the end of this stream's log")
        if found.offset > asked.offset:
            self._first = first  # the log starts after the position asked for
            return Gap(asked, found)
        if found.tag != asked.tag:
            await self.close()
            raise BadPosition("Last-Event-ID: a position of another log than this one")
        self.last_read = found.offset  # the client has it
        return None

    async def entries(self) -> AsyncIterator[LogEntry]:
        """The client's events in three phases, each once; ends only by raising (a broker
        error, or the hub's overflow seen by the caller).

        1. History: the log from the client's start until close to the hub's tail.
        2. The seam: joined to the hub, which notes the last offset it handed out before
           (or, if it had handed out none, its first event for the client tells it); the
           client reads the log from where its history ended up to there.
        3. Live: what the hub hands it, after the seam.
        """
        if self._history is not None:
            async for entry in self._catch_up():
                yield entry
        self._hub.subscribe(self.subscriber)
        if self._since is not None and self.last_read is None and self.subscriber.seam is not None:
            # It found nothing when the hub had handed nothing out; the hub has since: what
            # it handed out before this client joined is read by nobody. It asks again.
            raise LogStalled("the event log got events while this stream was starting")
        first_live: LogEntry | None = None
        if self.last_read is not None:  # else from now on: nothing before to read
            if self.subscriber.seam is None:
                first_live = await self.subscriber.entries.get()  # the hub sets the seam
            seam = self.subscriber.seam
            assert seam is not None
            async for entry in self._read_on(
                lambda: self.last_read is None or self.last_read >= seam
            ):
                yield entry
        async for entry in self._live(first_live):
            yield entry

    async def _live(self, first: LogEntry | None) -> AsyncIterator[LogEntry]:
        """The hub's events, from ``first``; those the seam read already sent are skipped."""
        live = first
        while True:
            if live is not None and (self.last_read is None or live.offset > self.last_read):
                self.last_read = live.offset
                yield live
            live = await self.subscriber.entries.get()

    def waiting(self) -> int:
        """Events the hub has handed this client that it has not taken yet."""
        return self.subscriber.entries.qsize()

    async def _catch_up(self) -> AsyncIterator[LogEntry]:
        """The history, read until close to the hub's tail: joining the hub further behind,
        the hub would fill this client's buffer while the seam read runs, and drop it."""
        assert self._history is not None
        if self._first is not None:
            first, self._first = self._first, None
            for entry in self._take(first):
                yield entry
        async for message in self._history:
            for entry in self._take(message):
                yield entry
            if self._near_tail():
                break  # the hub takes it from here
        await self.close()
        if self._hub.tail is None:
            # The hub has handed nothing out (nothing was published since the role
            # started): the read ran to the log's end, and the hub's first event will tell
            # the seam.
            return
        async for entry in self._read_on(self._near_tail):
            yield entry

    def _near_tail(self) -> bool:
        """Close enough to the hub's tail to join it. Never while the hub has handed out
        nothing: the whole history is then older than anything it will hand out."""
        tail, last = self._hub.tail, self.last_read
        if tail is None:
            return False
        return last is None or tail - last <= self.subscriber.entries.maxsize // 2

    async def _read_on(self, far_enough: Callable[[], bool]) -> AsyncIterator[LogEntry]:
        """The log from ``last_read`` on, until ``far_enough()``.

        Every offset up to the hub's tail is in the log, so a read that ends first (the
        broker paused for longer than the read's idle end, as under load) is followed by
        another from where it stopped: going live there would skip the events between.
        """
        while not far_enough():
            before = self.last_read
            assert before is not None
            async with contextlib.aclosing(self._read(before + 1, held=True)) as messages:
                async for message in messages:
                    for entry in self._take(message):
                        yield entry
                    if far_enough():
                        return
            if self.last_read == before:
                raise LogStalled(f"the event log sent nothing after offset {before}")

    def _take(self, message: AbstractIncomingMessage) -> list[LogEntry]:
        offset = offset_of(message)
        if self.last_read is not None and offset <= self.last_read:
            return []
        self.last_read = offset
        entry = entry_of(message, offset)
        if entry is None or not self.subscriber.wanted(entry.routing_key):
            return []
        if self._since is not None:
            event = logged_event(message)
            if event is None or event.when < self._since:
                return []
        return [entry]

    async def _read(
        self, start: int | datetime, held: bool
    ) -> AsyncGenerator[AbstractIncomingMessage]:
        """A read of the log from ``start``, shared with other clients reading the same
        stretch (bridge/stream/reads.py). One of what the log is known to hold (``held``)
        waits HELD_WAIT_S, first and between messages: its callers stop it when far enough,
        and ending it at a busy broker's pause would only open another (a channel, a
        consumer, a seek: what makes the broker slower still)."""
        messages = self._reads.read(
            start,
            first_wait_s=HELD_WAIT_S if held else FIRST_WAIT_S,
            idle_end_s=HELD_WAIT_S if held else IDLE_END_S,
            prefetch=HISTORY_PREFETCH,
        )
        async with contextlib.aclosing(messages):
            async for message in messages:
                yield message

    async def close(self) -> None:
        self._hub.unsubscribe(self.subscriber)
        if self._history is not None:
            history, self._history = self._history, None
            await history.aclose()
