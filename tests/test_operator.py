"""What an operator meets first: stopping while RabbitMQ is away, a refused login, a busy
port. Real processes, as `docker stop` and a terminal see them."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from urllib.parse import urlsplit, urlunsplit

import pytest

from bridge.delivery.history import history_queue
from bridge.eventlog import log_queue
from bridge.settings import load_settings
from tests.broker import AMQP_URL

UNREACHABLE = "amqp://guest:guest@127.0.0.1:1/"
STOP_BOUND_S = 5.0
"""docker stop waits 10 s before SIGKILL; a process must be gone well within that."""


def env(**settings: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    return {
        **clean,
        "BRIDGE_PATCHWORK_URL": "http://127.0.0.1:9/",
        "BRIDGE_HTTP_PORT": "0",
        **{f"BRIDGE_{k.upper()}": v for k, v in settings.items()},
    }


async def start(command: str, environment: dict[str, str], tmp_path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", command,
        env={**environment, "BRIDGE_STATE_DIR": str(tmp_path)},
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def read_until(process: asyncio.subprocess.Process, text: str) -> str:
    assert process.stderr is not None
    seen = ""
    while text not in seen:
        line = await asyncio.wait_for(process.stderr.readline(), 30)
        assert line, f"process ended before saying {text!r}: {seen}"
        seen += line.decode()
    return seen


@pytest.mark.parametrize("command", ["producer", "webhook"])
async def test_sigterm_stops_a_role_waiting_for_rabbitmq(command, tmp_path):
    subscriptions = tmp_path / "subscriptions.toml"
    subscriptions.write_text('[[webhook]]\nname = "ci"\nurl = "https://ci.example.org/hook"\n')
    process = await start(
        command, env(amqp_url=UNREACHABLE, subscriptions=str(subscriptions)), tmp_path
    )
    before = await read_until(process, "cannot reach RabbitMQ")
    process.send_signal(signal.SIGTERM)
    _, rest = await asyncio.wait_for(process.communicate(), STOP_BOUND_S)
    assert process.returncode == 0, before + rest.decode()
    assert "Traceback" not in before + rest.decode()
    assert "retrying" not in rest.decode()  # no new attempt after the signal


@pytest.mark.broker
async def test_a_refused_login_is_one_line_naming_it_and_exit_2(tmp_path):
    parts = urlsplit(AMQP_URL)
    wrong = urlunsplit(
        parts._replace(netloc=f"guest:not-the-password@{parts.hostname}:{parts.port or 5672}")
    )
    process = await start("producer", env(amqp_url=wrong), tmp_path)
    _, err = await asyncio.wait_for(process.communicate(), 60)
    text = err.decode()
    assert process.returncode == 2, text
    assert "refused the login of user 'guest'" in text
    assert "BRIDGE_AMQP_URL" in text
    assert "not-the-password" not in text
    assert "Traceback" not in text


async def test_a_busy_metrics_port_is_one_line_naming_the_setting(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        process = await start(
            "producer", env(amqp_url=UNREACHABLE, http_host="127.0.0.1", http_port=str(port)),
            tmp_path,
        )  # fmt: skip
        _, err = await asyncio.wait_for(process.communicate(), 30)
    text = err.decode()
    assert process.returncode == 2, text
    assert f"BRIDGE_HTTP_PORT: cannot serve metrics on 127.0.0.1:{port}" in text
    assert "Traceback" not in text


def test_log_level_is_taken_in_any_case(monkeypatch):
    monkeypatch.setenv("BRIDGE_LOG_LEVEL", "debug")
    assert load_settings().log_level == "DEBUG"


@pytest.mark.broker
async def test_a_producer_of_another_exchange_on_a_busy_state_directory_refuses_to_start(
    tmp_path, unique, amqp
):
    """Producers of one exchange share a directory safely (one polls, the others stand by,
    see test_eventlog); of two exchanges, the second would write the first's cursor."""
    first_exchange, second_exchange = f"test-{unique}-a", f"test-{unique}-b"
    first = await start("producer", env(amqp_url=AMQP_URL, exchange=first_exchange), tmp_path)
    try:
        await read_until(first, "this producer polls")  # it holds the directory now
        second = await start("producer", env(amqp_url=AMQP_URL, exchange=second_exchange), tmp_path)
        _, err = await asyncio.wait_for(second.communicate(), 30)
        text = err.decode()
        assert second.returncode == 2, text
        assert f"BRIDGE_STATE_DIR {tmp_path}: in use by another producer (pid {first.pid})" in text
        assert "Traceback" not in text
    finally:
        first.send_signal(signal.SIGTERM)
        await asyncio.wait_for(first.communicate(), STOP_BOUND_S)
        channel = await amqp.channel()
        for exchange in (first_exchange, second_exchange):
            await channel.exchange_delete(exchange)
            await channel.queue_delete(log_queue(exchange))
            await channel.queue_delete(
                history_queue(exchange)
            )  # the webhook role's attempt history
        await channel.close()


async def test_an_unwritable_state_directory_is_one_line(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    process = await start("producer", env(amqp_url=UNREACHABLE), blocked / "state")
    _, err = await asyncio.wait_for(process.communicate(), 30)
    text = err.decode()
    assert process.returncode == 2, text
    assert f"BRIDGE_STATE_DIR {blocked / 'state'}: cannot write there" in text
    assert "Traceback" not in text


async def test_a_corrupt_cursor_is_one_line_saying_what_to_do(tmp_path):
    (tmp_path / "cursor.json").write_text('{"version": 2, "high_wat')
    process = await start("producer", env(amqp_url=UNREACHABLE), tmp_path)
    _, err = await asyncio.wait_for(process.communicate(), 30)
    text = err.decode()
    assert process.returncode == 2, text
    assert f"{tmp_path / 'cursor.json'}: unreadable cursor" in text
    assert "move it away to restart" in text
    assert "Traceback" not in text


async def test_the_demo_without_rabbitmq_says_how_to_start_one(tmp_path):
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "demo",
        env={**env(amqp_url=UNREACHABLE)}, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(process.communicate(), 30)
    text = err.decode()
    assert process.returncode == 1, text
    assert "no RabbitMQ at amqp://guest:***@127.0.0.1:1/" in text
    assert "rabbitmq-server -detached" in text
    assert "Traceback" not in text and "ERROR" not in text


@pytest.mark.broker
async def test_a_listing_read_only_in_part_ends_quietly(tmp_path, exchange_name):
    """`subscriptions list | head -1`: the reader goes before the lines come (finding 8 of
    issue 29 said "RabbitMQ refused the list (BrokenPipeError)")."""
    subscriptions = tmp_path / "subscriptions.toml"
    subscriptions.write_text(
        "".join(
            f'[[webhook]]\nname = "ci-{i}"\nurl = "https://ci.example.org/{i}"\n' for i in range(3)
        )
    )
    read, write = os.pipe()
    os.close(read)  # the reader has gone
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge", "subscriptions", "list",
            env=env(AMQP_URL=AMQP_URL, EXCHANGE=exchange_name, SUBSCRIPTIONS=str(subscriptions)),
            stdout=write, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
    finally:
        os.close(write)
    _, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 141  # as a shell reports a command ended by SIGPIPE
    assert stderr == b""  # no traceback, and no word of RabbitMQ


@pytest.mark.broker
async def test_a_queue_declared_otherwise_stops_the_role_in_one_line(
    tmp_path, amqp, exchange_name, unique
):
    """Issue 29, finding 6: a retry queue left with other arguments (another queue type)."""
    subscriptions = tmp_path / "subscriptions.toml"
    name = f"topo-{unique}"
    subscriptions.write_text(f'[[webhook]]\nname = "{name}"\nurl = "https://ci.example.org/"\n')
    clash = f"{exchange_name}.webhook.{name}.retry.1s"
    channel = await amqp.channel()
    await channel.declare_queue(clash, durable=True, arguments={"x-queue-type": "quorum"})
    process = None
    try:
        process = await start(
            "webhook",
            env(
                AMQP_URL=AMQP_URL,
                EXCHANGE=exchange_name,
                SUBSCRIPTIONS=str(subscriptions),
                QUEUE_TYPE="classic",
            ),
            tmp_path,
        )
        _, stderr = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process is not None and process.returncode is None:
            process.kill()  # it should have stopped by itself: never leave it running
            await process.wait()
        channel = await amqp.channel()
        for queue in (
            clash,
            f"{exchange_name}.webhook.{name}",
            f"{exchange_name}.webhook.{name}.retry.0.25s",
        ):
            await channel.queue_delete(queue)
        await channel.exchange_delete(f"{exchange_name}.replay.{exchange_name}.webhook.{name}")
        await channel.close()
    text = stderr.decode()
    assert process.returncode not in (0, None)
    assert "Traceback" not in text and "ExceptionGroup" not in text
    last = text.strip().splitlines()[-1]
    assert last.startswith(f"patchwork-bridge: cannot declare queue {clash}")
    assert "check BRIDGE_QUEUE_TYPE" in last
