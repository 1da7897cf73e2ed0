"""One page of Patchwork items into events: which are usable, which are new, how late.

Unusable items are counted and named once each; events of other projects are dropped
here (Patchwork's API cannot filter the events of several projects); each new event is
checked against its category's schema and measured for how late it became visible.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from bridge.events import BadEvent, Event, parse_event
from bridge.metrics import Metrics
from bridge.producer.patchwork import Page
from bridge.settings import Settings

log = logging.getLogger(__name__)

# Bad items are logged once each; remember that many so memory stays bounded.
WARNED_MAX = 10_000
ZONE_TOLERANCE = timedelta(minutes=1)
"""Event dates this far ahead of our clock are clock skew; further, a wrong time zone."""

EventCheck = Callable[[str, Any], None]
"""Called with (category, item) for every event before it is published; see bridge.schema."""


class PageSorter:
    def __init__(
        self, settings: Settings, metrics: Metrics, check_event: EventCheck | None = None
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._tz = settings.tz
        self._projects = frozenset(settings.patchwork_projects)
        self._check_event = check_event
        self._zone_warned = False
        self._warned: dict[tuple[str, str], None] = {}

    def sort(
        self, page: Page, previous: set[int], is_new: Callable[[Event], bool]
    ) -> tuple[list[Event], list[Event]]:
        """(every usable event of the page, the ones to publish now)."""
        events: list[Event] = []
        fresh: list[Event] = []
        for item, raw in page.items:
            try:
                event = parse_event(item, raw)
            except BadEvent as exc:
                self._metrics.bad_events.labels(exc.reason).inc()
                self._warn_once(exc.reason, str(exc))
                continue
            events.append(event)
            if event.id in previous or not is_new(event):
                continue  # seen in an earlier poll, or on the previous page as pages shifted
            if self._projects and event.project not in self._projects:
                continue
            if self._check_event is not None:
                self._check_event(event.category, item)
            fresh.append(event)
        if fresh:
            now = datetime.now(self._tz).replace(tzinfo=None)
            for event in fresh:
                self._metrics.event_visibility_delay.observe(
                    max(0.0, (now - event.when).total_seconds())
                )
            self._check_zone(max(event.when for event in fresh) - now)
        return events, fresh

    def _check_zone(self, ahead: timedelta) -> None:
        """Dates ahead of our clock in the configured zone mean another zone (once a run):
        every ce-time would be off by it and the lag would read 0."""
        if ahead <= ZONE_TOLERANCE or self._zone_warned:
            return
        self._zone_warned = True
        log.warning(
            "Patchwork's newest event is dated %.1f h ahead of the time now in "
            "BRIDGE_PATCHWORK_TIMEZONE=%s: set it to Patchwork's TIME_ZONE (its default is "
            "Australia/Canberra)",
            ahead.total_seconds() / 3600,
            self._settings.patchwork_timezone,
        )

    def _warn_once(self, reason: str, detail: str) -> None:
        key = (reason, detail)
        if key in self._warned:
            return
        if len(self._warned) >= WARNED_MAX:
            self._warned.pop(next(iter(self._warned)))
        self._warned[key] = None
        log.warning("skipping unusable item from Patchwork (%s)", detail)
