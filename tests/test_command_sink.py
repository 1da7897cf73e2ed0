"""The command sink runs a real program per event: stdin, environment, exit codes, timeouts."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from bridge.metrics import DELIVERY_FAILURE_REASONS
from bridge.sinks.base import Delivered, Delivery, GiveUp, RetryLater
from bridge.sinks.command import CommandSink
from bridge.webhook.subscriptions import Subscription

BODY = b'{"id": 42, "category": "series-completed", "project": {"link_name": "netdevbpf"}}'


@pytest.fixture
async def make_sink() -> AsyncIterator[Callable[..., CommandSink]]:
    sinks: list[CommandSink] = []

    def make(script: str, *args: str, **settings: object) -> CommandSink:
        command = [sys.executable, "-c", textwrap.dedent(script), *args]
        values: dict[str, object] = {"name": "cmd", "sink": "command", "command": command}
        values.update(settings)
        sink = CommandSink(Subscription(**values))  # type: ignore[arg-type]
        sinks.append(sink)
        return sink

    yield make
    for sink in sinks:
        await sink.close()


def delivery(body: bytes = BODY, attempt: int = 1) -> Delivery:
    return Delivery(body, "42", "netdevbpf.series-completed", attempt=attempt)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); only a reaped process is gone.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ")[-1][0] != "Z"


async def test_program_gets_the_event_on_stdin_and_its_ids_in_the_environment(
    make_sink: Callable[..., CommandSink], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BRIDGE_AMQP_URL", "amqp://bridge:s3cret@broker/")
    out = tmp_path / "seen.json"
    sink = make_sink(
        """
        import json, os, sys
        seen = {"body": sys.stdin.read(), "env": dict(os.environ)}
        open(sys.argv[1], "w").write(json.dumps(seen))
        """,
        str(out),
    )
    assert await sink.deliver(delivery(attempt=2)) == Delivered()
    seen = json.loads(out.read_text())
    assert seen["body"].encode() == BODY
    assert seen["env"]["PATCHWORK_EVENT_ID"] == "42"
    assert seen["env"]["PATCHWORK_ROUTING_KEY"] == "netdevbpf.series-completed"
    assert seen["env"]["PATCHWORK_ATTEMPT"] == "2"
    assert "PATH" in seen["env"]
    assert not [k for k in seen["env"] if k.startswith("BRIDGE_")]


async def test_exit_75_asks_for_a_retry(make_sink: Callable[..., CommandSink]) -> None:
    sink = make_sink("import sys; sys.stderr.write('receiver busy\\n'); sys.exit(75)")
    outcome = await sink.deliver(delivery())
    assert isinstance(outcome, RetryLater)
    assert outcome.reason == "sink_error"
    assert outcome.delay_s is None
    assert "exit 75 (EX_TEMPFAIL): receiver busy" in outcome.detail


async def test_any_other_failure_retries_too_and_quotes_the_end_of_stderr(
    make_sink: Callable[..., CommandSink],
) -> None:
    sink = make_sink("import sys; sys.stderr.write('x' * 100000 + 'the real error'); sys.exit(3)")
    outcome = await sink.deliver(delivery())
    assert isinstance(outcome, RetryLater)
    assert outcome.reason in DELIVERY_FAILURE_REASONS
    assert "exit 3" in outcome.detail
    assert len(outcome.detail) <= 300


async def test_program_that_ignores_stdin_still_counts(
    make_sink: Callable[..., CommandSink],
) -> None:
    sink = make_sink("pass")
    assert await sink.deliver(delivery(body=b"[" + b"0," * 500_000 + b"0]")) == Delivered()


async def test_missing_program_is_given_up(tmp_path: Path) -> None:
    sink = CommandSink(
        Subscription(name="c", sink="command", command=[str(tmp_path / "no-such-hook"), "--x"])
    )
    outcome = await sink.deliver(delivery())
    assert isinstance(outcome, GiveUp)
    assert outcome.reason == "sink_error"
    assert "no-such-hook" in outcome.detail and "No such file" in outcome.detail


async def test_timeout_kills_the_program_and_its_children_and_reaps_them(
    make_sink: Callable[..., CommandSink], tmp_path: Path
) -> None:
    pids = tmp_path / "pids"
    sink = make_sink(
        """
        import os, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open(sys.argv[1], "w").write(f"{os.getpid()} {child.pid}")
        time.sleep(60)
        """,
        str(pids),
        timeout=1.0,
    )
    outcome = await sink.deliver(delivery())
    assert isinstance(outcome, RetryLater)
    assert outcome.reason == "timeout"
    parent, child = (int(p) for p in pids.read_text().split())
    assert not alive(parent)  # killed and reaped by the sink
    await until(lambda: not alive(child))  # killed with its group; init reaps it


async def test_cancelled_delivery_kills_the_program(
    make_sink: Callable[..., CommandSink], tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    sink = make_sink(
        "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(60)",
        str(pid_file),
        timeout=60,
    )
    task = asyncio.create_task(sink.deliver(delivery()))
    await until(lambda: pid_file.exists() and pid_file.read_text() != "")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not alive(int(pid_file.read_text()))


async def test_no_more_than_concurrency_programs_run_at_once(
    make_sink: Callable[..., CommandSink], tmp_path: Path
) -> None:
    # Each run records its start and end; overlapping intervals show the parallelism.
    log = tmp_path / "log"
    sink = make_sink(
        """
        import os, sys, time
        with open(sys.argv[1], "a") as f:
            f.write(f"start {os.getpid()}\\n"); f.flush()
            time.sleep(0.2)
            f.write(f"end {os.getpid()}\\n")
        """,
        str(log),
        concurrency=2,
    )
    outcomes = await asyncio.gather(*(sink.deliver(delivery()) for _ in range(5)))
    assert outcomes == [Delivered()] * 5
    running = peak = 0
    for line in log.read_text().splitlines():
        running += 1 if line.startswith("start") else -1
        peak = max(peak, running)
    assert peak <= 2


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)
