"""The log as clients catching up read it: each stretch read from the broker once, for all.

Two hundred clients back after a day, each resuming from its own position, were two
hundred reads of the same stretch of the log: the broker sent every event once per
client, and this process parsed each frame as often. Here at most ``AT_ONCE`` reads run
on the broker, and each keeps what it brings for a while (``KEEP`` messages). A client
whose next offset is kept takes it from there; one whose next offset a running read is
about to bring waits for it; one waiting its turn for a read of its own follows the
first read that brings its offset instead. So clients spread over the log move behind a
few reads (bench/stream.py --resume: 200 clients over 20,000 events, a sixth of the
broker's work of a read per client, and live in a third of the time).

By time (``?since=``) a client reads on its own: where a time starts is the broker's to
find. A client too slow to keep up with a shared read falls out of what is kept and reads
on its own again; nothing is skipped, at worst read twice.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from bridge.broker.connect import RecycledConnection
from bridge.eventlog import offset_of, read_log

KEEP = 4096
"""Messages kept after a read brought them, while any client reads: about 4 KB each, so
16 MB at most. A client further behind its read than this reads on its own."""
AT_ONCE = 16
"""Reads on the broker at the same time at most; the other clients wait their turn. 200
clients resuming a day-old position at once, each with a read of its own, kept the history
connection so busy that its heartbeat lapsed and every one of their streams ended."""
YIELD_EVERY = 32
"""Kept messages a client takes before it lets the others run."""
FOLLOW_WAIT_S = 5.0
"""How long a client waits on another's read that brings nothing (its own client takes
nothing, or a busy broker is slow to start) before it reads on its own."""


@dataclass(frozen=True, slots=True)
class How:
    """A read's waits and prefetch, as ``read_log`` takes them."""

    first_wait_s: float
    idle_end_s: float
    prefetch: int


class LogReads:
    def __init__(
        self,
        reads: RecycledConnection,
        exchange: str,
        at_once: int | None = None,
        keep: int = KEEP,
    ) -> None:
        """``at_once``: reads on the broker at the same time at most; a client with none
        waits its turn, and follows a read that brings its offset meanwhile."""
        self._reads = reads
        self._exchange = exchange
        self._slots = asyncio.Semaphore(at_once or AT_ONCE)
        self._keep = keep
        self._kept: dict[int, AbstractIncomingMessage] = {}
        """Offset -> message, oldest first."""
        self._fronts: Counter[int] = Counter()
        """The next offset of each read running now."""
        self._arrivals: dict[int, asyncio.Event] = {}
        """Offset -> set when a read brings it, or the read about to bring it ends."""
        self._readers = 0
        """Clients reading by offset now; the kept messages go with the last."""
        self._ends: set[int] = set()
        """Where reads found the log's end (no message within their idle end): a client
        that followed one there ends too, instead of asking the broker again."""
        self.broker_reads = 0
        """Reads opened on the broker (for tests and the bench)."""

    async def read(
        self, start: int | datetime, *, first_wait_s: float, idle_end_s: float, prefetch: int
    ) -> AsyncGenerator[AbstractIncomingMessage]:
        """The log from ``start`` to its end, in order, as ``read_log`` reads it. Raises
        LogMissing when there is no log."""
        how = How(first_wait_s, idle_end_s, prefetch)
        if isinstance(start, datetime):
            async with self._slots, self._reads.lease() as connection:
                async for message in self._own(connection, start, how):
                    yield message
            return
        self._readers += 1
        try:
            async for message in self._shared(start, how):
                yield message
        finally:
            self._readers -= 1
            if not self._readers:
                self._kept.clear()
                self._ends.clear()
                self._arrivals.clear()

    async def _shared(self, offset: int, how: How) -> AsyncGenerator[AbstractIncomingMessage]:
        loop = asyncio.get_running_loop()
        waiting_since: float | None = None
        """Since when the read of this offset's front has brought nothing."""
        taken = 0
        while True:
            kept = self._kept.get(offset)
            if kept is not None:
                yield kept
                offset, waiting_since, taken = offset + 1, None, taken + 1
                if not taken % YIELD_EVERY:
                    # Kept messages need no wait, and an SSE write seldom waits: without
                    # this, followers would hold the loop and starve the heartbeats.
                    await asyncio.sleep(0)
                continue
            if taken and offset in self._ends:
                return  # the read it followed found the end here
            if self._fronts[offset]:
                waiting_since = waiting_since or loop.time()
                left = waiting_since + FOLLOW_WAIT_S - loop.time()
                if left > 0:
                    await self._arrival(offset, left)
                    continue
                # Theirs is stuck (its client takes nothing): read on our own.
            if not await self._slot_or_arrival(offset):
                continue  # a read brought it while this one waited for a slot
            try:
                if offset in self._kept or (waiting_since is None and self._fronts[offset]):
                    continue
                # Our own read, to the log's end: ending it where it meets what another
                # read brought would save the broker a little and cost it a channel's close
                # and open per meeting, which under load held its answers back by seconds.
                async with self._reads.lease() as connection:
                    async for message in self._own(connection, offset, how):
                        got = offset_of(message)
                        if got >= offset:  # the broker starts at its chunk's start
                            yield message
                            offset = got + 1
                self._ends.add(offset)
                return
            finally:
                self._slots.release()

    async def _slot_or_arrival(self, offset: int) -> bool:
        """Wait for a slot (True: held) or for a read to bring ``offset`` (False)."""
        if not self._slots.locked():
            await self._slots.acquire()
            return True
        acquiring = asyncio.ensure_future(self._slots.acquire())
        waiting = asyncio.ensure_future(self._arrival_of(offset).wait())
        try:
            await asyncio.wait((acquiring, waiting), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            await self._drop(acquiring, waiting)  # cancelled: a slot it got is given back
            raise
        return await self._drop(acquiring, waiting, keep=True)

    async def _drop(
        self, acquiring: asyncio.Future[Any], waiting: asyncio.Future[Any], keep: bool = False
    ) -> bool:
        """Stop both waits; whether the slot was got (and, unless ``keep``, given back)."""
        waiting.cancel()
        acquiring.cancel()  # nothing, once it is done
        await asyncio.gather(acquiring, return_exceptions=True)
        held = not acquiring.cancelled()
        if held and not keep:
            self._slots.release()
        return held

    async def _own(
        self, connection: AbstractConnection, start: int | datetime, how: How
    ) -> AsyncGenerator[AbstractIncomingMessage]:
        """One read on the broker, on a channel of its own; what it brings by offset is kept."""
        self.broker_reads += 1
        front = self._advance(None, start) if isinstance(start, int) else None
        messages = read_log(
            connection,
            self._exchange,
            start,
            first_wait_s=how.first_wait_s,
            idle_end_s=how.idle_end_s,
            prefetch=how.prefetch,
        )
        try:
            async with contextlib.aclosing(messages):
                async for message in messages:
                    if front is not None:
                        offset = offset_of(message)
                        self._keep_one(offset, message)
                        front = self._advance(front, offset + 1)
                    yield message
        finally:
            self._advance(front, None)

    def _advance(self, old: int | None, new: int | None) -> int | None:
        """Move a read's front; those waiting at the old one look again (it was brought,
        or will not be by this read)."""
        if old is not None:
            self._fronts[old] -= 1
            if not self._fronts[old]:
                del self._fronts[old]
            arrival = self._arrivals.pop(old, None)
            if arrival is not None:
                arrival.set()
        if new is not None:
            self._fronts[new] += 1
        return new

    def _keep_one(self, offset: int, message: AbstractIncomingMessage) -> None:
        if offset in self._kept:
            return
        self._kept[offset] = message
        if len(self._kept) > self._keep:
            del self._kept[next(iter(self._kept))]

    async def _arrival(self, offset: int, within_s: float) -> None:
        """Until a read brings ``offset`` or the read about to ends, or ``within_s``."""
        try:
            async with asyncio.timeout(within_s):
                await self._arrival_of(offset).wait()
        except TimeoutError:
            pass

    def _arrival_of(self, offset: int) -> asyncio.Event:
        """The event set when ``offset`` is brought (``_advance`` sets and forgets it)."""
        arrival = self._arrivals.get(offset)
        if arrival is None:
            arrival = self._arrivals[offset] = asyncio.Event()
        return arrival
