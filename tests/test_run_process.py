"""`patchwork-bridge run` as an operator starts it, with four subscriptions in different health."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import os
import secrets
import signal
import socket
import sys
from pathlib import Path

import pytest
from aiohttp import web
from cloudevents.core.bindings.http import HTTPMessage, from_binary
from cloudevents.core.formats.json import JSONFormat
from standardwebhooks import Webhook

from bridge.delivery.history import history_queue
from bridge.demo.patchwork_double import FakePatchwork
from bridge.eventlog import log_queue
from bridge.sinks.netguard import refusal_reason
from bridge.webhook.subscriptions import load_subscriptions
from tests.amqp_helpers import delete_subscription_queues, get_all, lane, queue_depth, wait_for
from tests.receiver import Receiver

TZ = "Europe/Berlin"
PROJECTS = ("netdevbpf", "dpdk", "linux-kselftest")
CATEGORIES = ("patch-created", "series-completed", "check-created", "cover-created")


@pytest.mark.timeout(150)
async def test_run_delivers_to_the_healthy_isolates_the_broken_and_leaks_no_secret(
    unique, tmp_path, amqp
):
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    token = "tok-" + secrets.token_hex(16)
    first_attempts: set[str] = set()
    throttled: set[str] = set()

    async def flaky(request):
        webhook_id = request.headers["webhook-id"]
        if webhook_id not in first_attempts:
            first_attempts.add(webhook_id)
            if len(first_attempts) % 4 == 0:  # a quarter of first attempts
                throttled.add(webhook_id)
                return web.Response(status=503, headers={"Retry-After": "1"})
        return web.Response(status=204)

    async def hang(request):
        await asyncio.sleep(3600)
        return web.Response(status=204)

    async def fail(request):
        return web.Response(status=500, text="broken")

    async def record(request):
        return web.Response(status=204)

    receivers = {
        "flaky": Receiver(flaky),
        "hanging": Receiver(hang),
        "always-500": Receiver(fail),
        "loopback": Receiver(record),
    }
    urls = {name: await r.start() for name, r in receivers.items()}
    # A name, not a literal: the file refuses a loopback literal at load; a name that
    # resolves to a refused address is what the SSRF guard stops at delivery time.
    host = socket.gethostname()
    assert refusal_reason(ipaddress.ip_address(socket.gethostbyname(host))), (
        f"{host} must resolve to a loopback or private address on a test machine"
    )
    urls["loopback"] = urls["loopback"].replace("127.0.0.1", host)
    names = {name: f"{name}-{unique}" for name in receivers}
    subscriptions = tmp_path / "subscriptions.toml"
    token_file = tmp_path / "flaky-token"
    token_file.write_text(token + "\n")
    subscriptions.write_text(
        f"""
[[webhook]]
name = "{names["flaky"]}"
url = "{urls["flaky"]}"
events = ["netdevbpf.*", "*.series-completed"]
secret = "{secret}"
bearer_token_file = "{token_file}"
allow_private_network = true

[[webhook]]
name = "{names["hanging"]}"
url = "{urls["hanging"]}"
timeout = 30.0
concurrency = 2
allow_private_network = true

[[webhook]]
name = "{names["always-500"]}"
url = "{urls["always-500"]}"
events = ["dpdk.*"]
retry_schedule = [0.2, 0.2]
breaker_failures = 0  # a receiver that always fails: this test wants its dead letters
allow_private_network = true

[[webhook]]
name = "{names["loopback"]}"
url = "{urls["loopback"]}"
"""
    )
    patchwork = FakePatchwork(tz=TZ)
    events = [
        patchwork.add_event(CATEGORIES[i % len(CATEGORIES)], PROJECTS[i % len(PROJECTS)])
        for i in range(60)
    ]
    await patchwork.start()
    exchange = f"test-{unique}"
    env = run_env(patchwork, exchange, tmp_path, subscriptions, BRIDGE_LOG_LEVEL="DEBUG")
    flaky_wanted = {
        str(e["id"])
        for e in events
        if e["project"]["link_name"] == "netdevbpf" or e["category"] == "series-completed"
    }
    dpdk_wanted = {str(e["id"]) for e in events if e["project"]["link_name"] == "dpdk"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "run", env=env, stderr=asyncio.subprocess.PIPE
    )
    try:

        def flaky_has_all() -> bool:
            requests = receivers["flaky"].requests
            got = {hit.webhook_id for hit in requests}
            return got >= flaky_wanted and len(requests) >= len(flaky_wanted) + len(throttled)

        async def dead_letters_complete() -> bool:
            dead_500 = await queue_depth(amqp, lane(exchange, names["always-500"]).dead)
            dead_loopback = await queue_depth(amqp, lane(exchange, names["loopback"]).dead)
            return dead_500 == len(dpdk_wanted) and dead_loopback == len(events)

        await wait_for(flaky_has_all, 60)
        await wait_for(dead_letters_complete, 60)
        dead_500 = await get_all(amqp, lane(exchange, names["always-500"]).dead)
        dead_loopback = await get_all(amqp, lane(exchange, names["loopback"]).dead)
    finally:
        process.send_signal(signal.SIGTERM)
        log = (await asyncio.wait_for(process.communicate(), 40))[1].decode()
        await delete_topology(amqp, subscriptions, exchange)
        for r in receivers.values():
            await r.stop()
        await patchwork.stop()
    assert process.returncode == 0, log[-3000:]

    # The flaky receiver got every matching event, signed, with token and CloudEvents headers.
    verifier = Webhook(secret)
    successes = {}
    for _, headers, body in receivers["flaky"].requests:
        verifier.verify(body, headers)  # raises if the signature does not verify
        assert headers["Authorization"] == f"Bearer {token}"
        assert headers["User-Agent"].startswith("patchwork-bridge/")
        assert headers["Content-Type"] == "application/json"
        event = from_binary(
            HTTPMessage(headers={k.lower(): v for k, v in headers.items()}, body=body),
            JSONFormat(),
        )
        assert event.get_id() == headers["webhook-id"]
        assert event.get_time().utcoffset() is not None
        item = json.loads(body)
        assert event.get_type() == f"org.patchwork.{item['category']}"
        assert body == patchwork.item_bytes(item["id"])
        successes[headers["webhook-id"]] = successes.get(headers["webhook-id"], 0) + 1
    assert set(successes) == flaky_wanted
    assert throttled, "some first attempts were answered 503"
    # Each throttled event came twice (503, then success); every other event once.
    assert all(successes[i] == (2 if i in throttled else 1) for i in flaky_wanted)

    # The always-500 subscription ends with exactly its events dead, after 3 attempts each.
    assert {m.message_id for m in dead_500} == dpdk_wanted
    assert len(dead_500) == len(dpdk_wanted)
    assert all(m.headers["x-bridge-last-status"] == 500 for m in dead_500)
    assert len(receivers["always-500"].requests) == 3 * len(dpdk_wanted)

    # The loopback URL without allow_private_network never got a request.
    assert receivers["loopback"].requests == []
    assert {m.headers["x-bridge-last-reason"] for m in dead_loopback} == {"ssrf"}

    # The hanging receiver held only its own two slots.
    assert len(receivers["hanging"].requests) <= 2

    for leaked in (secret, secret.removeprefix("whsec_"), token):
        assert leaked not in log


def run_env(
    patchwork: FakePatchwork, exchange: str, tmp_path: Path, subscriptions: Path, **more: str
) -> dict[str, str]:
    """The environment of a ``run`` process against the double, from the first event."""
    return {
        **os.environ,
        "BRIDGE_PATCHWORK_URL": patchwork.url,
        "BRIDGE_PATCHWORK_TIMEZONE": TZ,
        "BRIDGE_EXCHANGE": exchange,
        "BRIDGE_STATE_DIR": str(tmp_path / "state"),
        "BRIDGE_START": "beginning",
        "BRIDGE_POLL_INTERVAL": "0.2",
        "BRIDGE_SUBSCRIPTIONS": str(subscriptions),
        "BRIDGE_HTTP_PORT": "0",
        **more,
    }


async def delete_topology(connection, subscriptions: Path, exchange: str) -> None:
    """Every queue the bridge declared for the file's subscriptions, and the exchange."""
    await delete_subscription_queues(connection, exchange, load_subscriptions(subscriptions))
    channel = await connection.channel()
    await channel.exchange_delete(exchange)
    await channel.queue_delete(log_queue(exchange))
    await channel.queue_delete(history_queue(exchange))  # the webhook role's attempt history
    await channel.close()


@pytest.mark.timeout(120)
async def test_ctrl_c_says_what_it_waits_for_and_a_second_one_stops_at_once(amqp, unique, tmp_path):
    """Issue 29, finding 7: with receivers that never answer, the first Ctrl-C says what
    the stop waits for; the second stops without waiting, and nothing in flight is lost:
    every event is back in the subscription's queue for the next start."""
    released = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await released.wait()
        return web.Response(status=204)

    receiver = Receiver(hang)
    await receiver.start()
    name = f"slow-{unique}"
    subscriptions = tmp_path / "subscriptions.toml"
    subscriptions.write_text(
        f'[[webhook]]\nname = "{name}"\nurl = "{receiver.url()}"\ntimeout = 60\n'
        "concurrency = 2\nallow_private_network = true\n"
    )
    patchwork = FakePatchwork(tz=TZ)
    events = patchwork.add_events(5)
    await patchwork.start()
    exchange = f"test-{unique}"
    env = run_env(patchwork, exchange, tmp_path, subscriptions)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "run", env=env, stderr=asyncio.subprocess.PIPE
    )
    assert process.stderr is not None
    said: list[str] = []

    async def until_said(text: str) -> None:
        while not any(text in line for line in said):
            line = await process.stderr.readline()  # type: ignore[union-attr]
            assert line, "\n".join(said)
            said.append(line.decode())

    try:
        await wait_for(lambda: len(receiver.requests) == 2, 60, "two deliveries in flight")
        process.send_signal(signal.SIGINT)
        await asyncio.wait_for(until_said("for 2 deliveries in flight to finish"), 30)
        assert any("SIGINT: stopping" in line and "Ctrl-C again" in line for line in said)
        process.send_signal(signal.SIGINT)
        rest = (await asyncio.wait_for(process.communicate(), 30))[1].decode()
        said.extend(rest.splitlines())
        log = "\n".join(said)
        assert process.returncode == 130, log[-3000:]
        assert "SIGINT again: stopping now" in log
        assert "still running after" not in log  # it did not wait the drain out
        assert "Traceback" not in log
        # Nothing was acked: all five wait in the queue for the next start.
        assert await queue_depth(amqp, lane(exchange, name).main) == len(events)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        released.set()
        await delete_topology(amqp, subscriptions, exchange)
        await receiver.stop()
        await patchwork.stop()
