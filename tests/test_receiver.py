"""The demo's webhook receiver: what it reports for each POST, and its signature verdict."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
from standardwebhooks import Webhook

from bridge.demo.receiver import Received, start_receiver

SECRET = "whsec_" + base64.b64encode(b"receiver-test-secret-32-bytes-ok").decode()
BODY = json.dumps({"id": 7, "category": "patch-created", "project": {"link_name": "netdev"}})
CE_HEADERS = {
    "ce-specversion": "1.0",
    "ce-id": "evt-7",
    "ce-type": "org.patchwork.patch-created",
    "ce-subject": "netdev",
    "webhook-id": "evt-7",
    "Content-Type": "application/json",
}


def signed(body: str, secret: str = SECRET) -> dict[str, str]:
    """Headers as the bridge signs them, produced by the independent library."""
    now = datetime.now(UTC)
    signature = Webhook(secret).sign(msg_id="evt-7", timestamp=now, data=body)
    return {
        **CE_HEADERS,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signature,
    }


@pytest.fixture
async def receiver() -> AsyncIterator[Callable[..., object]]:
    """Start receivers on free loopback ports; each is cleaned up after the test."""
    runners = []

    async def start(secret: str | None = None) -> tuple[str, list[Received]]:
        seen: list[Received] = []
        runner, port = await start_receiver("127.0.0.1", 0, seen.append, secret=secret)
        runners.append(runner)
        return f"http://127.0.0.1:{port}", seen

    yield start
    for runner in runners:
        await runner.cleanup()


async def post(url: str, body: str, headers: dict[str, str]) -> int:
    timeout = aiohttp.ClientTimeout(total=10)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(url, data=body.encode(), headers=headers) as response,
    ):
        return response.status


async def test_delivery_is_reported_with_its_routing_key(receiver) -> None:
    base, seen = await receiver()

    status = await post(f"{base}/hooks/patchwork", BODY, CE_HEADERS)

    assert status == 204
    [got] = seen
    assert (got.webhook_id, got.ce_type, got.ce_subject) == (
        "evt-7",
        "org.patchwork.patch-created",
        "netdev",
    )
    assert got.routing_key == "netdev.patch-created"
    assert got.path == "/hooks/patchwork"
    assert got.body == BODY.encode()
    assert got.signature == "unchecked"


async def test_signature_from_the_shared_secret_verifies(receiver) -> None:
    base, seen = await receiver(secret=SECRET)

    status = await post(base + "/", BODY, signed(BODY))

    assert status == 204
    assert [r.signature for r in seen] == ["valid"]


async def test_signature_over_another_body_is_refused(receiver) -> None:
    base, seen = await receiver(secret=SECRET)

    status = await post(base + "/", BODY + " ", signed(BODY))

    assert status == 401
    assert [r.signature for r in seen] == ["invalid"]


async def test_signature_with_another_secret_is_refused(receiver) -> None:
    base, seen = await receiver(secret=SECRET)
    other = "whsec_" + base64.b64encode(b"a-completely-different-secret!!!").decode()

    status = await post(base + "/", BODY, signed(BODY, other))

    assert status == 401
    assert [r.signature for r in seen] == ["invalid"]


async def test_garbled_signature_header_is_refused_not_a_crash(receiver) -> None:
    base, seen = await receiver(secret=SECRET)
    headers = {**signed(BODY), "webhook-signature": "not-a-signature"}

    status = await post(base + "/", BODY, headers)

    assert status == 401
    assert [r.signature for r in seen] == ["invalid"]


async def test_unsigned_delivery_is_refused_when_a_secret_is_expected(receiver) -> None:
    base, seen = await receiver(secret=SECRET)

    status = await post(base + "/", BODY, CE_HEADERS)

    assert status == 401
    assert [r.signature for r in seen] == ["unsigned"]


async def test_async_callback_is_awaited_before_the_answer(receiver) -> None:
    done: list[str] = []

    async def slow(received: Received) -> None:
        await asyncio.sleep(0)
        done.append(received.webhook_id)

    runner, port = await start_receiver("127.0.0.1", 0, slow)
    try:
        status = await post(f"http://127.0.0.1:{port}/", BODY, CE_HEADERS)
    finally:
        await runner.cleanup()

    assert status == 204
    assert done == ["evt-7"]


async def test_command_line_receiver_prints_one_line_per_delivery_and_stops_on_sigterm() -> None:
    env = {**os.environ, "WEBHOOK_SECRET": SECRET}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge.demo.receiver",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        stdout=asyncio.subprocess.PIPE,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert process.stdout is not None
    try:
        banner = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
        assert "verifying signatures" in banner
        port = int(banner.split(":")[1].split()[0])

        assert await post(f"http://127.0.0.1:{port}/hook", BODY, signed(BODY)) == 204
        line = (await asyncio.wait_for(process.stdout.readline(), 10)).decode()
        assert await post(f"http://127.0.0.1:{port}/hook", BODY, CE_HEADERS) == 401
        unsigned = (await asyncio.wait_for(process.stdout.readline(), 10)).decode()
    finally:
        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), 10)

    assert "webhook-id=evt-7" in line
    assert "ce-type=org.patchwork.patch-created" in line
    assert "ce-subject=netdev" in line
    assert "routing-key=netdev.patch-created" in line
    assert "signature=valid" in line
    assert "signature=unsigned" in unsigned
    assert code == 0


def test_a_plain_install_verifies_signatures_in_the_demo() -> None:
    """The demo says "(signed)" and counts valid signatures: the verifier it uses must come
    with ``pip install patchwork-bridge``, not only with the test extra."""
    from importlib.metadata import requires

    plain = [r for r in requires("patchwork-bridge") or [] if "extra ==" not in r]
    assert any(r.startswith("standardwebhooks") for r in plain), plain


def test_line_marks_missing_headers_instead_of_guessing() -> None:
    got = Received(
        path="/",
        webhook_id="",
        ce_type="",
        ce_subject="",
        ce_id="",
        signature="unchecked",
        body=b"{}",
        headers={},
    )
    assert "webhook-id=- ce-type=- ce-subject=- routing-key=?" in got.line()
