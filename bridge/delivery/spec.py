"""What the engine needs to run one lane: a subscription's, or the checks role's."""

from __future__ import annotations

from dataclasses import dataclass

from bridge.delivery.breaker import NO_BREAKER, BreakerSpec
from bridge.delivery.queues import QueueSet


@dataclass(frozen=True, slots=True)
class LaneSpec:
    name: str
    queues: QueueSet
    exchange: str
    """What the main queue is bound to, with ``patterns``."""
    patterns: tuple[str, ...]
    retry_schedule: tuple[float, ...]
    concurrency: int
    """Deliveries at once; the channel's prefetch."""
    timeout_s: float
    """One attempt, at most."""
    replay_from: str | None = None
    """The event exchange whose replay route mirrors the bindings (None: no route)."""
    legacy: QueueSet | None = None
    """Its queues as versions before 0.2 named them, shared by every deployment."""
    breaker: BreakerSpec = NO_BREAKER
    rate: float | None = None
    """Attempts a second at most, over all the processes consuming its queue (None: any)."""
