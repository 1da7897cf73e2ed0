"""A receiver's ``Retry-After`` (RFC 9110), as the seconds it asks for, within bounds."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from bridge.delivery.retry import RETRY_AFTER_MAX_S

RETRY_AFTER_MIN_S = 1.0
"""A receiver asking for 0 s still gets a breath, so a 429 loop cannot spin."""


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds a ``Retry-After`` header asks for, clamped to [1 s, 1 h]; None if absent or invalid.

    RFC 9110 allows delta-seconds (``120``) or an HTTP-date; ``now`` must be
    timezone-aware and is only used for the date form. A date in the past means
    "now", which the minimum turns into one second.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isascii() and text.isdigit():
        seconds = float(int(text))
    else:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:  # "-0000" in the date: RFC 5322 says UTC
            when = when.replace(tzinfo=UTC)
        seconds = (when - now).total_seconds()
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, RETRY_AFTER_MIN_S), RETRY_AFTER_MAX_S)
