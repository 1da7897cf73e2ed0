"""``patchwork-bridge migrate``: move this deployment's messages out of the queue names of
versions before 0.2, which every deployment on a vhost shared.

Those versions named a subscription's queues ``bridge.webhook.<name>`` (``.retry.<d>s``,
``.dead``, ``.disabled``) and the checks role's ``bridge.checks``, whatever the exchange.
This version names them after the exchange (``bridge.delivery.queues``). For each
subscription of BRIDGE_SUBSCRIPTIONS, and for the checks lane:

1. the new queues are declared and bound, then the old main queue is unbound from this
   deployment's exchange: from then on new events reach only the new queues;
2. every message of this deployment is moved, confirmed copy first, then ack: waiting
   events and retries to the new main queue (a retry then is tried at once: it carries no
   due time), dead letters to the new ``.dead``; a disabled subscription stays disabled;
3. an old queue left empty is deleted.

Whose a message is: one routed from an exchange is that exchange's deployment's; a copy
the old bridge moved between its queues (a retry, a dead letter) carries no exchange, and
is this deployment's when its ``ce-source`` is this deployment's Patchwork (set
BRIDGE_PATCHWORK_URL). A copy that says neither (the checks role's, or any without
BRIDGE_PATCHWORK_URL) is moved only with ``--claim-copies``: the operator knows whether
another deployment ever used these queues, the messages do not. What is another
deployment's, or cannot be told, is left where it is, and said. Running it again moves
what is left; nothing is lost if it is interrupted (a message is acked only once its copy
is confirmed).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from bridge.broker.calls import BROKER_TIMEOUT_S, close_channel
from bridge.broker.errors import BROKER_ERRORS
from bridge.broker.topology import declare_exchange, publish_confirmed
from bridge.checks.result import ROUTING_PATTERN, results_exchange
from bridge.cli.common import CliError, Commands, command, configured, connected
from bridge.delivery.messages import copy_message, header_text
from bridge.delivery.queues import (
    LEGACY_CHECKS,
    QueueControl,
    QueueSet,
    TopologyError,
    checks_queues,
    declare_lane,
    legacy_subscription_queues,
    subscription_queues,
)
from bridge.settings import Settings, load_settings
from bridge.webhook.subscriptions import DEFAULT_RETRY_SCHEDULE_S, Subscription


@dataclass(frozen=True, slots=True)
class Move:
    """One lane's old and new queues, and what routes to them."""

    what: str
    old: QueueSet
    new: QueueSet
    exchange: str
    """What the main queues are bound to."""
    patterns: Sequence[str]
    retry_schedule: Sequence[float]
    replay_from: str | None


@dataclass(slots=True)
class Moved:
    """What happened to one old queue's messages."""

    moved: int = 0
    left: Counter[str] = field(default_factory=Counter)
    """Messages left, by why: another deployment's exchange, or an unknown owner."""


def moves(settings: Settings, subscriptions: list[Subscription]) -> list[Move]:
    ex = settings.exchange
    lanes = [
        Move(
            f"subscription {s.name}",
            legacy_subscription_queues(s.name),
            subscription_queues(ex, s.name),
            ex,
            s.events,
            s.retry_schedule,
            ex,
        )
        for s in subscriptions
    ]
    checks = Move(
        "the checks role",
        QueueSet(LEGACY_CHECKS),
        checks_queues(ex),
        results_exchange(ex),
        [ROUTING_PATTERN],
        DEFAULT_RETRY_SCHEDULE_S,
        None,
    )
    return [*lanes, checks]


class Migration:
    def __init__(
        self,
        connection: AbstractConnection,
        settings: Settings,
        out: TextIO,
        *,
        dry_run: bool = False,
        claim_copies: bool = False,
    ) -> None:
        self._connection = connection
        self._settings = settings
        self._out = out
        self._dry_run = dry_run
        self._claim_copies = claim_copies
        self._source = (
            f"{settings.patchwork_url}/api/{settings.patchwork_api_version}"
            if settings.patchwork_url
            else None
        )
        self._control = QueueControl(connection)

    async def run(self, lanes: list[Move]) -> int:
        """Messages moved in all."""
        total = 0
        try:
            for lane in lanes:
                total += await self._lane(lane)
        finally:
            await self._control.close()
        return total

    async def _lane(self, lane: Move) -> int:
        # A retry of 0.1 carries no due time: it goes to the main queue, tried at once.
        targets = {lane.old.main: lane.new.main}
        targets.update({old: lane.new.main for old in lane.old.every_retry(lane.retry_schedule)})
        targets[lane.old.dead] = lane.new.dead
        found = {q: await self._control.inspect(q) for q in [*targets, lane.old.marker]}
        existing = {q: r for q, r in found.items() if r is not None}
        if self._dry_run:
            for queue, found_ok in existing.items():
                print(
                    f"{lane.what}: {queue} holds {found_ok.message_count} messages", file=self._out
                )
            return 0
        if not existing:
            return 0
        await self._declare_new(lane, unbind_old=lane.old.main in existing)
        if lane.old.marker in existing:
            await self._control.set_disabled(lane.new, True, self._settings.queue_type)
            await self._control.set_disabled(lane.old, False, self._settings.queue_type)
            print(f"{lane.what}: disabled, as it was", file=self._out)
        moved = 0
        for old, new in targets.items():
            if old not in existing:
                continue
            result = await self._move(lane, old, new)
            moved += result.moved
            left = "".join(f", {n} left ({why})" for why, n in result.left.items())
            print(f"{lane.what}: {old} -> {new}: moved {result.moved}{left}", file=self._out)
            if result.left[UNKNOWN]:
                print(
                    f"{lane.what}: {old}: {result.left[UNKNOWN]} copies do not say whose they "
                    "are; if no other deployment ever used this queue, run again with "
                    "--claim-copies",
                    file=self._out,
                )
            if not result.left:
                await self._delete_if_empty(old)
        return moved

    async def _declare_new(self, lane: Move, *, unbind_old: bool) -> None:
        """The new queues first, bound; then the old main queue no longer bound to this
        deployment's exchange. Between the two, an event reaches both: a duplicate with
        the same id, never a loss."""
        channel = await self._connection.channel()
        try:
            await declare_exchange(channel, lane.exchange)
            await declare_lane(
                channel,
                lane.exchange,
                lane.new,
                lane.patterns,
                lane.retry_schedule,
                self._settings.queue_type,
                replay_from=lane.replay_from,
            )
            if unbind_old:
                old_main = await channel.get_queue(lane.old.main, ensure=False)
                for pattern in lane.patterns:
                    await old_main.unbind(lane.exchange, pattern, timeout=BROKER_TIMEOUT_S)
        finally:
            await close_channel(channel)

    async def _move(self, lane: Move, old: str, new: str) -> Moved:
        """Move this deployment's messages of ``old`` to ``new``; the others are held unacked
        until the end, when closing the channel hands them back in their places."""
        result = Moved()
        channel = await self._connection.channel(publisher_confirms=True)
        try:
            queue = await channel.get_queue(old, ensure=True)
            for _ in range(queue.declaration_result.message_count or 0):
                message = await queue.get(no_ack=False, fail=False, timeout=BROKER_TIMEOUT_S)
                if message is None:
                    break
                owner = self._owner(message, lane, routed=old == lane.old.main)
                if owner == OURS or (owner == UNKNOWN and self._claim_copies):
                    await _copy(channel, message, new)
                    result.moved += 1
                else:
                    result.left[owner] += 1  # held unacked until the channel closes
        finally:
            await close_channel(channel)  # hands back what was held, in its place
        return result

    def _owner(self, message: AbstractIncomingMessage, lane: Move, *, routed: bool) -> str:
        if routed and message.exchange:
            return OURS if message.exchange == lane.exchange else THEIR_EXCHANGE
        source = header_text((message.headers or {}).get("ce-source"))
        if self._source is not None and source:
            return OURS if source == self._source else THEIR_PATCHWORK
        return UNKNOWN

    async def _delete_if_empty(self, queue: str) -> None:
        channel = await self._connection.channel()
        try:
            await channel.queue_delete(
                queue, if_unused=True, if_empty=True, timeout=BROKER_TIMEOUT_S
            )
            print(f"deleted {queue}", file=self._out)
        except BROKER_ERRORS as exc:
            print(f"kept {queue}: {exc}", file=self._out)
        finally:
            await close_channel(channel)


OURS = "ours"
THEIR_EXCHANGE = "another deployment's exchange"
THEIR_PATCHWORK = "another deployment's Patchwork"
UNKNOWN = "owner unknown"


async def _copy(channel: AbstractChannel, message: AbstractIncomingMessage, queue: str) -> None:
    """Confirmed copy first, then the ack: interrupted, it leaves a duplicate, never a loss."""
    await publish_confirmed(channel, queue, copy_message(message, _headers(message)))
    await message.ack()


def _headers(message: AbstractIncomingMessage) -> dict[str, Any]:
    """The copy keeps every header the old bridge wrote; a routed event starts clean, with
    its routing key recorded (it travels under the queue's name from now on)."""
    headers = dict(message.headers or {})
    if message.exchange:
        headers.setdefault("x-bridge-routing-key", message.routing_key or "")
    return headers


async def migrate(
    settings: Settings,
    lanes: list[Move],
    *,
    dry_run: bool = False,
    claim_copies: bool = False,
    out: TextIO | None = None,
) -> int:
    """The command itself, with the lanes to move chosen (tests call this)."""
    out = out or sys.stdout
    async with connected(settings, "migrate") as connection:
        try:
            migration = Migration(
                connection, settings, out, dry_run=dry_run, claim_copies=claim_copies
            )
            moved = await migration.run(lanes)
        except TopologyError as exc:
            raise CliError(str(exc)) from None
        except BROKER_ERRORS as exc:
            raise CliError(
                f"migrate stopped ({type(exc).__name__}: {exc}); run it again: nothing moved "
                "is lost, and what is left is moved then"
            ) from None
    if not dry_run:
        print(f"moved {moved} messages to this deployment's queues", file=out)
    return moved


def register(commands: Commands) -> None:
    migrate_ = commands.add_parser(
        "migrate",
        help="move this deployment's messages out of the queue names before 0.2 (bridge.*)",
        description="Versions before 0.2 named queues bridge.webhook.<name> and bridge.checks, "
        "shared by every deployment on a vhost. Move this deployment's waiting, retrying and "
        "dead messages into its own queues (<exchange>.webhook.<name>, <exchange>.checks), "
        "carry a disabled state over, and delete the old queues it empties. Messages of "
        "another deployment are left in place. Set BRIDGE_PATCHWORK_URL: it tells this "
        "deployment's retries and dead letters from another's. Safe to run again.",
    )
    migrate_.add_argument("--dry-run", action="store_true", help="show what is there, move nothing")
    migrate_.add_argument(
        "--claim-copies",
        action="store_true",
        help="also move retries and dead letters that do not say whose they are (the checks "
        "role's; a subscription's without BRIDGE_PATCHWORK_URL): only if no other deployment "
        "ever used the old queues",
    )
    migrate_.set_defaults(run=run)


@command
async def run(args: argparse.Namespace) -> None:
    settings = load_settings()
    # Without BRIDGE_SUBSCRIPTIONS (a checks-only site), the checks lane alone.
    subscriptions = configured(settings) if settings.subscriptions is not None else []
    await migrate(
        settings,
        moves(settings, subscriptions),
        dry_run=args.dry_run,
        claim_copies=args.claim_copies,
    )
