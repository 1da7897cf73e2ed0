"""``patchwork-bridge demo``: the whole path on one machine with nothing but RabbitMQ.

Recorded Patchwork events (bundled in ``bridge/demo/data``) are served by a local
Patchwork double; the real producer polls it and publishes to a throw-away
exchange; the real webhook consumer delivers them, signed, to a local receiver
that prints each one. Everything the demo declared is deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import os
import secrets
import signal
import sys
import tempfile
from pathlib import Path

import aio_pika

from bridge.broker.connect import connect, connect_plain
from bridge.broker.errors import BrokerRefused
from bridge.broker.nodes import UNREACHABLE
from bridge.broker.topology import replay_exchange
from bridge.delivery.history import history_queue
from bridge.delivery.queues import subscription_queues
from bridge.demo.patchwork_double import FakePatchwork, seed
from bridge.demo.receiver import Received, start_receiver
from bridge.eventlog import log_queue
from bridge.logs import setup_logging
from bridge.metrics import Metrics
from bridge.runtime import InProcess, build_roles
from bridge.settings import Settings, SettingsError, load_settings
from bridge.waiting import sleep_unless
from bridge.webhook.subscriptions import load_subscriptions

TIMEOUT_S = 60.0
BROKER_WAIT_S = 10.0
"""How long the demo waits for RabbitMQ before it says there is none."""


def cli(args: argparse.Namespace) -> int:
    try:
        base = load_settings()
    except SettingsError as exc:
        print(f"patchwork-bridge: {exc}", file=sys.stderr)
        return 2
    setup_logging(base.log_format, "WARNING")
    # An exchange the user named is theirs (a CI consumer may watch it): keep it.
    own_exchange = "BRIDGE_EXCHANGE" in os.environ
    try:
        answers = asyncio.run(_broker_answers(base))
    except BrokerRefused as exc:  # RabbitMQ runs, and refused the login or the vhost
        print(f"patchwork-bridge demo: {exc}", file=sys.stderr)
        return 2
    if not answers:
        print(
            f"patchwork-bridge demo: no RabbitMQ at {base.amqp_url_redacted} within "
            f"{BROKER_WAIT_S:g}s; start one (`rabbitmq-server -detached`, or "
            "`docker compose up -d rabbitmq`) or set BRIDGE_AMQP_URL",
            file=sys.stderr,
        )
        return 1
    return asyncio.run(run_demo(base, args.events, args.linger, keep_exchange=own_exchange))


async def _broker_answers(settings: Settings) -> bool:
    """One plain connection within BROKER_WAIT_S: the demo needs a broker, and says so."""
    # aiormq logs a refused connection as an ERROR with its own text; one line is enough.
    quieted = [logging.getLogger(name) for name in ("aiormq", "aio_pika")]
    levels = [logger.level for logger in quieted]
    for logger in quieted:
        logger.setLevel(logging.CRITICAL)
    try:
        return await _connect_once(settings)
    finally:
        for logger, level in zip(quieted, levels, strict=True):
            logger.setLevel(level)


async def _connect_once(settings: Settings) -> bool:
    """Whether RabbitMQ answers; raises BrokerRefused when it answers no."""
    try:
        async with asyncio.timeout(BROKER_WAIT_S):
            connection = await connect_plain(settings, "demo check")
    except UNREACHABLE:
        return False
    await connection.close()
    return True


async def run_demo(base: Settings, events: int, linger_s: float, *, keep_exchange: bool) -> int:
    """Replay ``events`` recorded events; keep the double up ``linger_s`` after the last one."""
    run_id = secrets.token_hex(3)
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    received: list[Received] = []
    all_in = asyncio.Event()

    def on_delivery(delivery: Received) -> None:
        received.append(delivery)
        print(f"  [{len(received):3d}/{events}] {delivery.line()}", flush=True)
        if len(received) >= events:
            all_in.set()

    patchwork = FakePatchwork()
    seed(patchwork, events)
    await patchwork.start()
    receiver, port = await start_receiver("127.0.0.1", 0, on_delivery, secret=secret)
    with tempfile.TemporaryDirectory(prefix="patchwork-bridge-demo-") as tmp:
        subscriptions = Path(tmp) / "subscriptions.toml"
        subscriptions.write_text(
            f'[[webhook]]\nname = "demo-{run_id}"\nurl = "http://127.0.0.1:{port}/hooks/patchwork"\n'
            f'secret = "{secret}"\nallow_private_network = true\n',
            encoding="utf-8",
        )
        settings = base.model_copy(
            update={
                "exchange": base.exchange if keep_exchange else f"patchwork-demo-{run_id}",
                "patchwork_url": patchwork.url,
                "patchwork_timezone": "Australia/Canberra",
                "start": "beginning",
                "state_dir": Path(tmp) / "state",
                "poll_interval": 0.5,
                "subscriptions": subscriptions,
            }
        )
        print(
            f"Patchwork double at {patchwork.url} with {events} recorded events\n"
            f"exchange {settings.exchange!r} on {settings.amqp_url_redacted}\n"
            f"webhook receiver at http://127.0.0.1:{port}/hooks/patchwork (signed)\n",
            flush=True,
        )
        interrupted = asyncio.Event()

        def interrupt() -> None:
            if not interrupted.is_set():
                print(
                    "\ninterrupted: stopping the roles, then deleting the demo's queues"
                    + ("" if keep_exchange else " and exchange"),
                    file=sys.stderr,
                    flush=True,
                )
            interrupted.set()
            all_in.set()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, interrupt)
        try:
            async with InProcess(build_roles("run", settings, Metrics())) as bridge:
                await bridge.until(all_in, TIMEOUT_S)
                # Other consumers of the exchange may still fetch mboxes from the double.
                await sleep_unless(interrupted, linger_s)
        finally:
            await receiver.cleanup()
            await patchwork.stop()
            await _clean_up(settings, delete_exchange=not keep_exchange)
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
    if interrupted.is_set():
        print("patchwork-bridge demo: interrupted; cleaned up", file=sys.stderr)
        return 130
    valid = sum(r.signature == "valid" for r in received)
    print(
        f"\n{len(received)} of {events} events delivered through RabbitMQ, "
        f"{valid} with a valid Standard Webhooks signature"
    )
    return 0 if len(received) >= events else 1


async def _clean_up(settings: Settings, *, delete_exchange: bool) -> None:
    """Delete every queue of the demo's subscription, and its exchange if it made it."""
    assert settings.subscriptions is not None
    connection = await connect(settings, "demo")
    try:
        channel = await connection.channel()
        for subscription in load_subscriptions(settings.subscriptions):
            queues = subscription_queues(settings.exchange, subscription.name)
            for name in [
                *queues.watched(subscription.retry_schedule),
                queues.marker,
                queues.breaker,
            ]:
                await channel.queue_delete(name)
            await channel.exchange_delete(replay_exchange(settings.exchange, queues.main))
        if delete_exchange:
            await channel.exchange_delete(settings.exchange)
            await channel.queue_delete(log_queue(settings.exchange))
            await channel.queue_delete(
                history_queue(settings.exchange)
            )  # the webhook role's attempt history
    except aio_pika.exceptions.AMQPError as exc:
        print(f"could not clean up everything: {exc}", file=sys.stderr)
    finally:
        await connection.close()
