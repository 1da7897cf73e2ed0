"""AMQP topic patterns over ``<project>.<category>``: checked, matched, and compared.

The webhook role binds them, the stream role filters by them and checks a consumer's
request against what it may ask for, replay copies by them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import cache

_WORD = r"(?:[A-Za-z0-9_-]+|\*|#)"
_PATTERN_RE = re.compile(rf"{_WORD}(?:\.{_WORD})*")
_MAX_PATTERN_BYTES = 255  # an AMQP binding key is a short string


def check_pattern(pattern: str) -> None:
    """ValueError unless ``pattern`` is an AMQP topic pattern the bridge can bind.

    Words are separated by ``.``; ``*`` and ``#`` stand only as whole words.
    """
    if len(pattern.encode()) > _MAX_PATTERN_BYTES:
        raise ValueError(f"pattern longer than {_MAX_PATTERN_BYTES} bytes")
    if not _PATTERN_RE.fullmatch(pattern):
        raise ValueError(
            f"bad topic pattern {pattern!r}: words of letters, digits, '-' or '_' separated"
            " by '.', with '*' (one word) and '#' (any words) only as whole words"
        )


def matches(pattern: str, routing_key: str) -> bool:
    """Topic match: ``*`` is exactly one word, ``#`` zero or more (``a.#`` matches ``a``)."""
    return _match_words(pattern.split("."), routing_key.split("."))


class TopicMatcher:
    """Several patterns compiled once; true if any matches (a queue bound with each of them)."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self._patterns = [tuple(p.split(".")) for p in patterns]
        self._everything = ("#",) in self._patterns  # the default: no work per event

    def __call__(self, routing_key: str) -> bool:
        if self._everything:
            return True
        words = routing_key.split(".")
        return any(_match_words(p, words) for p in self._patterns)


def _match_words(pattern: Iterable[str], words: list[str]) -> bool:
    # The set of positions in ``words`` reachable after each pattern word: linear
    # in both lengths, no backtracking blow-up on patterns like "#.#.#.x".
    reachable = {0}
    for word in pattern:
        if word == "#":
            reachable = set(range(min(reachable), len(words) + 1))
        elif word == "*":
            reachable = {i + 1 for i in reachable if i < len(words)}
        else:
            reachable = {i + 1 for i in reachable if i < len(words) and words[i] == word}
        if not reachable:
            return False
    return len(words) in reachable


def covers(allowed: str, requested: str) -> bool:
    """Whether every routing key ``requested`` matches is also matched by ``allowed``.

    ``netdevbpf.*`` covers ``netdevbpf.patch-created`` but not ``#``: a consumer allowed
    the first may ask for the second only.
    """
    return _covers(tuple(allowed.split(".")), tuple(requested.split(".")))


@cache
def _covers(allowed: tuple[str, ...], requested: tuple[str, ...]) -> bool:
    if not allowed:
        return not requested
    head, rest = allowed[0], allowed[1:]
    if head == "#":  # absorbs any run of the requested words, wildcards included
        return _covers(rest, requested) or (bool(requested) and _covers(allowed, requested[1:]))
    if not requested or requested[0] == "#":
        return False  # only a '#' covers a '#'
    if head == "*":
        return _covers(rest, requested[1:])
    return requested[0] == head and _covers(rest, requested[1:])
