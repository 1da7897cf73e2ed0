"""Find a subscription's sink among the ``patchwork_bridge.sinks`` entry points.

A plugin package registers ``name = "module:Factory"`` in that group; the
factory is called with a ``bridge.sinks.base.SinkSpec`` and returns a ``Sink``. The
built-ins (``webhook``, ``command``) are registered the same way, in this
package's pyproject.toml.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from typing import Protocol

from bridge.settings import SettingsError
from bridge.sinks.base import Sink, SinkSpec, is_sink

GROUP = "patchwork_bridge.sinks"


def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def sink_names() -> list[str]:
    """Names a subscription may give as ``sink``."""
    return sorted(_entry_points())


class NamedSinkSpec(SinkSpec, Protocol):
    @property
    def sink(self) -> str:
        """The entry point's name."""


def load_sink(subscription: NamedSinkSpec) -> Sink:
    """Build the subscription's sink; SettingsError naming the subscription if that fails.

    Sinks open no connection here (they do that lazily, inside the running loop),
    so this is safe to call at start-up for every subscription.
    """
    where = f"webhook {subscription.name!r}: sink"
    entry_point = _entry_points().get(subscription.sink)
    if entry_point is None:
        installed = ", ".join(sink_names()) or "none"
        raise SettingsError(f"{where}: unknown sink {subscription.sink!r} (installed: {installed})")
    try:
        factory = entry_point.load()
    except (ImportError, AttributeError) as exc:
        raise SettingsError(f"{where}: cannot load {entry_point.value} ({exc})") from None
    try:
        sink = factory(subscription)
    except (ValueError, TypeError) as exc:
        # Sinks raise these for settings they cannot use; their messages hold no secrets.
        raise SettingsError(f"{where}: {subscription.sink}: {exc}") from None
    if not is_sink(sink):
        raise SettingsError(f"{where}: {entry_point.value} did not build a Sink")
    return sink
