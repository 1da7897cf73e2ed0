"""`patchwork-bridge demo` as a newcomer runs it, with the example CI consumer watching."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aio_pika
import pytest

from bridge.delivery.history import history_queue
from bridge.eventlog import log_queue
from tests.broker import AMQP_URL

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(120)
async def test_demo_delivers_every_event_and_cleans_up(unique):
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "demo", "--events", "15",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 90)
    text = out.decode()
    assert process.returncode == 0, text + err.decode()
    assert text.count("signature=valid") == 15
    assert "15 of 15 events delivered through RabbitMQ, 15 with a valid" in text
    # A newcomer's first run: nothing alarming on the way out either.
    assert not [line for line in err.decode().splitlines() if "WARNING" in line or "ERROR" in line]
    exchange = text.split("exchange '", 1)[1].split("'", 1)[0]
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        with pytest.raises(aio_pika.exceptions.ChannelClosed):
            await channel.declare_exchange(exchange, passive=True)  # cleaned up
    finally:
        await connection.close()


@pytest.mark.timeout(120)
async def test_example_ci_consumer_prints_the_series_of_the_demo(unique):
    exchange, queue = f"test-{unique}", f"test-{unique}-ci"
    env = {
        **os.environ,
        "AMQP_URL": AMQP_URL,
        "EXCHANGE": exchange,
        "QUEUE": queue,
        "BRIDGE_EXCHANGE": exchange,
    }
    consumer = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "examples" / "ci_consumer.py"),
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        for _ in range(100):  # the consumer declares its queue when it is ready
            try:
                await channel.declare_queue(queue, passive=True)
                break
            except aio_pika.exceptions.ChannelClosed:
                channel = await connection.channel()
                await asyncio.sleep(0.1)
        # 22 recorded events cycle through the 11 categories: two series-completed.
        demo = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge", "demo", "--events", "22", "--linger", "3",
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        demo_out, demo_err = await asyncio.wait_for(demo.communicate(), 90)
        assert demo.returncode == 0, demo_out.decode() + demo_err.decode()
        consumer.terminate()
        out, _ = await asyncio.wait_for(consumer.communicate(), 30)
        lines = [line for line in out.decode().splitlines() if "would test series" in line]
        assert len(lines) == 2, out.decode()
        assert all("patches from the mbox" in line for line in lines)
    finally:
        if consumer.returncode is None:
            consumer.kill()
            await consumer.wait()
        channel = await connection.channel()
        for name in (queue, f"{queue}.dead"):
            await channel.queue_delete(name)
        await channel.exchange_delete(exchange)
        await channel.queue_delete(log_queue(exchange))
        await channel.queue_delete(history_queue(exchange))  # the webhook role's attempt history
        await connection.close()


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"password": "wrong"}, "refused the login of user"),
        ({"path": "/no-such-vhost"}, "refused to open the vhost"),
    ],
)
def test_a_broker_that_answers_no_is_named_not_called_missing(change, said):
    """Issue 29, findings 3 and 4: RabbitMQ runs and refuses; the demo says so at once."""
    from urllib.parse import urlsplit, urlunsplit

    from tests.test_settings import run_bridge

    parts = urlsplit(AMQP_URL)
    netloc = parts.netloc
    if "password" in change:
        user = parts.username or "guest"
        netloc = f"{user}:{change['password']}@{parts.hostname}:{parts.port or 5672}"
    url = urlunsplit(parts._replace(netloc=netloc, path=change.get("path", parts.path)))
    ran = run_bridge("demo", BRIDGE_AMQP_URL=url)
    assert ran.returncode == 2
    assert said in ran.stderr and "no RabbitMQ" not in ran.stderr
    assert "wrong" not in ran.stderr  # never the password
    assert len(ran.stderr.strip().splitlines()) == 1


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_ctrl_c_while_it_lingers_cleans_up_and_says_so(sig):
    """Issue 29, finding 7: Ctrl-C (or docker stop) during ``--linger``."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "demo", "--events", "5", "--linger", "600",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    seen = ""
    async with asyncio.timeout(90):
        while "[  5/5]" not in seen:
            line = await process.stdout.readline()
            assert line, seen
            seen += line.decode()
    exchange = seen.split("exchange '", 1)[1].split("'", 1)[0]
    process.send_signal(sig)
    _, err = await asyncio.wait_for(process.communicate(), 60)
    text = err.decode()
    assert process.returncode == 130, text
    assert "interrupted: stopping the roles, then deleting" in text
    assert text.strip().splitlines()[-1] == "patchwork-bridge demo: interrupted; cleaned up"
    assert "Traceback" not in text
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        with pytest.raises(aio_pika.exceptions.ChannelClosed):
            await channel.declare_exchange(exchange, passive=True)  # cleaned up
        channel = await connection.channel()
        with pytest.raises(aio_pika.exceptions.ChannelClosed):
            await channel.declare_queue(log_queue(exchange), passive=True)
    finally:
        await connection.close()
