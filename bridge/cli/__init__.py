"""The commands: each module registers its parser and carries the command out."""

from __future__ import annotations

from types import ModuleType

from bridge.cli import (
    bind,
    check_config,
    deliveries,
    demo,
    dlq,
    keys,
    migrate,
    replay,
    roles,
    subscriptions,
    wakeup,
)

COMMANDS: tuple[ModuleType, ...] = (
    roles,
    demo,
    dlq,
    deliveries,
    subscriptions,
    bind,
    replay,
    migrate,
    keys,
    wakeup,
    check_config,
)
"""In the order ``--help`` lists them."""
