"""What a gap check's count means, as a table: Patchwork's count and what was published in,
the poller's next step out (bridge.producer.plan)."""

from __future__ import annotations

import pytest

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
from bridge.producer.window import READ_WHOLE_BELOW_EVENTS, GapCheck

A = ("2026-12-06T10:00:00.000001", "2026-12-06T10:00:01")
B = ("2026-12-06T10:00:05.000001", "2026-12-06T10:00:06")
C = ("2026-12-06T10:00:09.000001", "2026-12-06T10:00:10")
FEW, MANY = READ_WHOLE_BELOW_EVENTS - 1, READ_WHOLE_BELOW_EVENTS
ONE = GapCheck((A,))
THREE = GapCheck((A, B, C))


def read(*spans: tuple[str, str]) -> ReadSpans:
    return ReadSpans(tuple(Read(Range(*span), "gap") for span in spans))


TABLE = [
    # (check, counted, known, served_unseen, expected)
    (ONE, 0, 0, False, NothingNew()),  # the writer has not committed yet: nothing served
    (THREE, 12, 12, True, NothingNew()),
    (ONE, 1, 0, True, ServedIt()),  # the one event served is the late one
    (THREE, 13, 12, True, ServedIt()),  # ... and it is the oldest of the range
    (ONE, 1, 0, False, read(A)),  # one more, but not the one served: read the range
    (ONE, 2, 0, True, read(A)),  # two late in one range: read it
    (ONE, None, 0, False, read(A)),  # a Patchwork that cannot count: read
    (THREE, None, 5, True, read(A, B, C)),
    # A difference over several ranges holding few published events: one read of them all
    # (two counts a halving step would cost more).
    (THREE, 14, 12, True, read((A[0], C[1]))),
    (THREE, 13, 12, False, read((A[0], C[1]))),
    (THREE, FEW + 2, FEW, True, read((A[0], C[1]))),
    # ... and holding many: halve.
    (THREE, MANY + 2, MANY, True, Halve((GapCheck((A,)), GapCheck((B, C))))),
    (THREE, MANY + 1, MANY, False, Halve((GapCheck((A,)), GapCheck((B, C))))),
    # Fewer than published (an event deleted in Patchwork): look closer, as for more.
    (THREE, MANY - 1, MANY, False, Halve((GapCheck((A,)), GapCheck((B, C))))),
    (THREE, 11, 12, False, read((A[0], C[1]))),
]


@pytest.mark.parametrize(("check", "counted", "known", "served_unseen", "expected"), TABLE)
def test_verdict(check, counted, known, served_unseen, expected):
    assert verdict(check, counted, known, served_unseen) == expected


def test_halving_ends_in_single_ranges_read_where_the_counts_differ():
    """The search the poller performs, done here against a made-up Patchwork: late events
    in A and C, none in B, and too many events published in them to read them whole. Only
    A and C are read; B costs its count alone."""
    late = {A: 1, B: 0, C: 2}
    published = {A: MANY, B: MANY, C: MANY}

    def count(check: GapCheck) -> int:
        return sum(published[s] + late[s] for s in check.spans)

    reads: list[Read] = []
    counts = 0
    pending = [THREE]
    while pending:
        check = pending.pop()
        counts += 1
        known = sum(published[s] for s in check.spans)
        match verdict(check, count(check), known, served_unseen=False):
            case Halve(halves=halves):
                pending.extend(halves)
            case ReadSpans(reads=found):
                reads.extend(found)
    assert sorted(r.range.since for r in reads) == [A[0], C[0]]
    assert counts == 5  # the whole, A, B+C, B, C


def test_the_sweep_reads_its_range_only_when_the_count_differs():
    sweep = ("2026-12-06T09:55:00", "2026-12-06T10:00:00")
    assert sweep_read(sweep, 40, 40) is None
    assert sweep_read(sweep, 41, 40) == Read(Range(*sweep), "sweep")
    assert sweep_read(sweep, None, 40) == Read(Range(*sweep), "sweep")
