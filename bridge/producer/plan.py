"""What one poll asks Patchwork, as typed steps, and what each answer means. Pure, table-tested.

A poll reads what is new (``Read`` from the window's ``since``), then counts the open gaps'
ranges (``GapCheck``: a one-event page whose ``rel="last"`` is the count), then, when due,
counts the sweep's range. ``verdict`` says what a count means: nothing new, the one event
it served is the late one, read these ranges, or halve and count again. The poller only
performs the steps (``bridge.producer.poller``); the window decides what is due
(``bridge.producer.window``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from bridge.producer.window import READ_WHOLE_BELOW_EVENTS, GapCheck

ReadKind = Literal["new", "gap", "sweep"]
"""Why a range is read: a metric label of ``patchwork_events_read``."""


@dataclass(frozen=True, slots=True)
class Range:
    """``since <= date < before`` in Patchwork's naive server time, passed verbatim;
    ``None`` is unbounded."""

    since: str | None
    before: str | None = None


@dataclass(frozen=True, slots=True)
class Read:
    """Read every page of ``range`` and publish what is new."""

    range: Range
    kind: ReadKind


# -- what a gap check's count means ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NothingNew:
    """Patchwork has as many events there as were published."""


@dataclass(frozen=True, slots=True)
class ServedIt:
    """One more than published, and the one event the count served is not published: it
    is the late event. Published from the count's page; nothing to read."""


@dataclass(frozen=True, slots=True)
class ReadSpans:
    """A difference in one range (or an unknown count): read it."""

    reads: tuple[Read, ...]


@dataclass(frozen=True, slots=True)
class Halve:
    """A difference over several ranges: count each half, and so on."""

    halves: tuple[GapCheck, GapCheck]


Verdict = NothingNew | ServedIt | ReadSpans | Halve


def verdict(check: GapCheck, counted: int | None, known: int, served_unseen: bool) -> Verdict:
    """What Patchwork's count of ``check``'s range means.

    ``counted`` is None when Patchwork cannot count (no ``rel="last"``); ``known`` is how
    many events of the range were published; ``served_unseen`` whether the one event the
    count served is one not published yet. A count serves one event at most, where a read
    would serve every neighbour of the gap again: ranges are read only where a count says,
    and halved only while reading them whole would cost more (``READ_WHOLE_BELOW_EVENTS``).
    """
    if counted is not None and counted == known:
        return NothingNew()
    if counted == known + 1 and served_unseen:
        return ServedIt()  # the oldest event of the range is the only one missing
    if counted is None or len(check.spans) == 1:
        return ReadSpans(tuple(Read(Range(since, before), "gap") for since, before in check.spans))
    if known < READ_WHOLE_BELOW_EVENTS:
        return ReadSpans((Read(Range(check.since, check.before), "gap"),))
    return Halve(check.halves())


def sweep_read(sweep: tuple[str, str], counted: int | None, known: int) -> Read | None:
    """The sweep's range to read when Patchwork's count differs from what was published."""
    if counted is not None and counted == known:
        return None
    return Read(Range(*sweep), "sweep")
