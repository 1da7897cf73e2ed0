"""The wake-up from Patchwork's PostgreSQL: the trigger's commands, the listener through
commits, rollbacks, a cut connection and a missing trigger, and a producer woken by a
commit long before its next poll."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pydantic import SecretStr

from bridge.cli.common import CliError
from bridge.cli.wakeup import act
from bridge.demo.patchwork_double import CATEGORIES
from bridge.metrics import Metrics
from bridge.producer.role import Producer
from bridge.runtime import InProcess
from bridge.settings import Settings
from bridge.wakeup.listener import Listener
from bridge.wakeup.sql import INSTALL
from tests.amqp_helpers import drain, wait_for
from tests.pg_patchwork import PgPatchwork
from tests.postgres import OwnPostgres, patchwork_database

TZ = "UTC"


@pytest.fixture
async def db(unique: str) -> AsyncIterator[str]:
    async with patchwork_database(f"pwb_{unique}") as dsn:
        yield dsn


async def insert_event(dsn: str, *, commit: bool = True, event_id: int | None = None) -> int:
    async with await psycopg.AsyncConnection.connect(dsn) as connection:
        columns = "id, category, project_id, date" if event_id else "category, project_id, date"
        values = "%s, %s, %s, %s" if event_id else "%s, %s, %s"
        params = ("patch-created", 1, datetime.now(UTC).replace(tzinfo=None))
        row = await (
            await connection.execute(
                f"INSERT INTO patchwork_event ({columns}) VALUES ({values}) RETURNING id",
                ((event_id, *params) if event_id else params),
            )
        ).fetchone()
        assert row is not None
        if commit:
            await connection.commit()
        else:
            await connection.rollback()
        return int(row[0])


async def test_the_trigger_commands_are_idempotent_and_check_says_what_is_so(db: str) -> None:
    with pytest.raises(CliError, match="no trigger patchwork_bridge_notify on patchwork_event"):
        await act("check", db)
    assert (await act("install", db)).startswith("installed")
    assert (await act("install", db)).startswith("installed")  # again: replaced, no error
    assert await act("check", db) == (
        "ok: trigger patchwork_bridge_notify on patchwork_event; notifications on "
        "patchwork_bridge_events arrive"
    )
    assert (await act("uninstall", db)).startswith("uninstalled")
    assert (await act("uninstall", db)).startswith("uninstalled")
    with pytest.raises(CliError, match="no trigger"):
        await act("check", db)
    assert "CREATE TRIGGER patchwork_bridge_notify AFTER INSERT ON patchwork_event" in INSTALL


async def test_a_database_that_does_not_answer_is_one_line(unique: str) -> None:
    with pytest.raises(CliError, match=r"^wakeup check: .*(refused|failed)") as caught:
        await act("check", "host=127.0.0.1 port=1 user=postgres password=s3cret connect_timeout=2")
    assert "s3cret" not in str(caught.value)


@pytest.fixture
async def listening(db: str) -> AsyncIterator[tuple[Listener, Metrics]]:
    await act("install", db)
    metrics = Metrics()
    listener = Listener(db, metrics, retry_first_s=0.05)
    stop = asyncio.Event()
    task = asyncio.create_task(listener.run(stop))
    try:
        await wait_for(lambda: listener.healthy, 10, "listening")
        yield listener, metrics
    finally:
        stop.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_commit_wakes_it_and_a_rollback_does_not(
    db: str, listening: tuple[Listener, Metrics]
) -> None:
    listener, _ = listening
    listener.take()  # the resync of listening's start
    rolled_back = await insert_event(db, commit=False)
    committed = await insert_event(db)
    # PostgreSQL delivers notifications in commit order: a rolled-back one would come first.
    await wait_for(lambda: listener.notifications > 0, 5, "the wake-up of a commit")
    named, resync = listener.take()
    assert [event_id for event_id, _ in named] == [committed] != [rolled_back]
    assert listener.notifications == 1 and not resync


async def test_it_keeps_listening_across_its_quiet_checks(db: str) -> None:
    """Past several of the checks a quiet connection gets (0.3 s here, 15 s by default)."""
    await act("install", db)
    listener = Listener(db, Metrics(), health_check_s=0.1)
    stop = asyncio.Event()
    task = asyncio.create_task(listener.run(stop))
    try:
        await wait_for(lambda: listener.healthy, 10, "listening")
        await asyncio.sleep(0.35)  # three quiet checks
        assert listener.healthy and not task.done()
        listener.woken.clear()
        await insert_event(db)
        await wait_for(listener.woken.is_set, 5, "a wake-up after the quiet checks")
    finally:
        stop.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_cut_connection_is_said_once_and_listening_resumes(
    db: str, listening: tuple[Listener, Metrics], caplog: pytest.LogCaptureFixture
) -> None:
    listener, metrics = listening
    caplog.set_level(logging.INFO, logger="bridge.wakeup.listener")
    async with await psycopg.AsyncConnection.connect(db, autocommit=True) as admin:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    await wait_for(lambda: not listener.healthy, 20, "the cut to be seen")
    await wait_for(lambda: listener.healthy, 20, "listening again")
    lost = [r for r in caplog.records if "not listening" in r.getMessage()]
    assert len(lost) == 1 and lost[0].levelno == logging.WARNING
    failures = metrics.registry.get_sample_value(
        "patchwork_bridge_wakeup_failures_total", {"reason": "connection"}
    )
    assert failures == 1
    listener.woken.clear()
    await insert_event(db)
    await wait_for(listener.woken.is_set, 5, "a wake-up after the cut")


async def test_without_the_trigger_it_says_so_once_and_the_poller_polls(
    db: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="bridge.wakeup.listener")
    metrics = Metrics()
    listener = Listener(db, metrics, trigger_recheck_s=0.05)
    stop = asyncio.Event()
    task = asyncio.create_task(listener.run(stop))
    await wait_for(lambda: listener.attempts >= 3, 10, "three looks for the trigger")
    stop.set()
    await asyncio.wait_for(task, 10)
    assert not listener.healthy
    (said,) = [r.getMessage() for r in caplog.records]
    assert "no trigger patchwork_bridge_notify on patchwork_event" in said
    assert "wakeup install" in said
    failures = metrics.registry.get_sample_value(
        "patchwork_bridge_wakeup_failures_total", {"reason": "no_trigger"}
    )
    assert failures == 1  # once, not at each of the three looks


@pytest.fixture
async def pg_patchwork(db: str) -> AsyncIterator[PgPatchwork]:
    fake = PgPatchwork(dsn=db, tz=TZ)
    await fake.start()
    yield fake
    await fake.stop()


@pytest.mark.timeout(90)
async def test_a_commit_reaches_the_bus_long_before_the_next_poll(
    db: str, pg_patchwork: PgPatchwork, exchange_name: str, bound_queue: str, tmp_path: Path
) -> None:
    """Polls (and safety polls) an hour apart: only the wake-up can bring each event, and
    each costs one poll."""
    await act("install", db)
    settings = Settings(
        exchange=exchange_name,
        patchwork_url=pg_patchwork.url,
        patchwork_timezone=TZ,
        state_dir=tmp_path / "state",
        poll_interval=3600.0,
        poll_safety_interval=3600.0,
        poll_late_wait=60.0,
        start="beginning",
        patchwork_timeout=5.0,
        patchwork_db=SecretStr(db),
    )
    metrics = Metrics()
    producer = Producer(settings, metrics)
    async with InProcess([producer]) as bridge:
        await bridge.wait_ready(20)
        await wait_for(
            lambda: metrics.registry.get_sample_value("patchwork_bridge_wakeup_listening") == 1,
            20,
            "listening",
        )
        await asyncio.sleep(0.5)  # the poll that listening starts with is done

        def polls() -> float:
            return metrics.registry.get_sample_value("patchwork_bridge_polls_total") or 0.0

        before = polls()
        for _ in range(3):
            event = await pg_patchwork.write()
            assert event is not None
            (message,) = await drain(bound_queue, expected=1, timeout=20)
            assert message.message_id == str(event["id"])
        await wait_for(lambda: polls() - before >= 3, 10, "the third poll's count")
        await asyncio.sleep(0.5)
        assert polls() - before == 3


def producer_env(
    exchange: str, patchwork: PgPatchwork, tmp_path: Path, **settings: str
) -> dict[str, str]:
    return {
        **os.environ,
        "BRIDGE_EXCHANGE": exchange,
        "BRIDGE_PATCHWORK_URL": patchwork.url,
        "BRIDGE_PATCHWORK_TIMEZONE": TZ,
        "BRIDGE_STATE_DIR": str(tmp_path / "state"),
        "BRIDGE_START": "beginning",
        "BRIDGE_HTTP_PORT": "0",
        "BRIDGE_LOG_LEVEL": "INFO",
        **settings,
    }


async def write_like_patchwork(
    patchwork: PgPatchwork, n: int, rng: random.Random
) -> list[dict[str, Any]]:
    """``n`` events from eight writers at once, as Patchwork's mail feeders write them: one
    in four holds its transaction open 0.3-1.5 s (committing after newer ones), one in
    eight rolls back (its id burnt). The committed events, as the API serves them."""
    gate = asyncio.Semaphore(8)

    async def one(i: int) -> dict[str, Any] | None:
        async with gate:
            return await patchwork.write(
                CATEGORIES[i % len(CATEGORIES)],
                build_s=rng.uniform(0, 0.005),
                hold_s=rng.uniform(0.3, 1.5) if rng.random() < 0.25 else rng.uniform(0, 0.01),
                commit=rng.random() >= 0.125,
            )

    written = await asyncio.gather(*(one(i) for i in range(n)))
    return [event for event in written if event is not None]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("woken", [False, True], ids=["polling", "woken"])
async def test_every_committed_event_once_with_writers_out_of_order_and_rolling_back(
    woken: bool,
    db: str,
    pg_patchwork: PgPatchwork,
    exchange_name: str,
    bound_queue: str,
    tmp_path: Path,
) -> None:
    """A producer process on the PostgreSQL double: polling every 0.2 s, or woken by the
    trigger with polls an hour apart (every event is then found by what its own
    notification names, late commits too)."""
    if woken:
        await act("install", db)
        settings = {
            "BRIDGE_PATCHWORK_DB": db,
            "BRIDGE_POLL_INTERVAL": "3600",
            "BRIDGE_POLL_SAFETY_INTERVAL": "3600",
        }
    else:
        settings = {"BRIDGE_POLL_INTERVAL": "0.2"}
    log = tmp_path / "log"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "producer",
        env=producer_env(exchange_name, pg_patchwork, tmp_path, **settings),
        stderr=log.open("wb"),
    )  # fmt: skip
    try:
        if woken:
            await wait_for(lambda: "wakeup: listening" in log.read_text(), 30, "listening")
        else:
            await wait_for(lambda: "this producer polls" in log.read_text(), 30, "polling")
        committed = await write_like_patchwork(pg_patchwork, 120, random.Random(34))
        got = await drain(bound_queue, expected=len(committed), timeout=60)
        assert await drain(bound_queue, expected=0, timeout=1.5) == []  # nothing twice
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 30)
    assert sorted(int(m.message_id) for m in got) == sorted(e["id"] for e in committed)
    assert pg_patchwork.rolled_back and not set(pg_patchwork.rolled_back) & {
        int(m.message_id) for m in got
    }
    assert process.returncode == 0, log.read_text()[-3000:]
    assert "Traceback" not in log.read_text()


@pytest.mark.timeout(240)
async def test_a_cut_and_a_database_restart_mid_flow_lose_nothing_said_once_each_way(
    exchange_name: str, bound_queue: str, tmp_path: Path, unique: str
) -> None:
    """A PostgreSQL server of this test's own. While events are written, the listen
    connection is cut (``pg_terminate_backend``), then the server restarts: each time the
    listener says once that it stopped listening, the producer polls meanwhile, listening
    resumes (said once), and every committed event arrives once."""
    async with (
        OwnPostgres() as server,
        patchwork_database(f"pwb_{unique}", server.dsn) as db,
    ):
        await act("install", db)
        patchwork = PgPatchwork(dsn=db, tz=TZ)
        await patchwork.start()
        log = tmp_path / "log"
        env = producer_env(
            exchange_name, patchwork, tmp_path,
            BRIDGE_PATCHWORK_DB=db, BRIDGE_POLL_INTERVAL="0.5",
            BRIDGE_POLL_SAFETY_INTERVAL="3600",
        )  # fmt: skip
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge", "producer", env=env, stderr=log.open("wb")
        )
        try:
            await wait_for(lambda: "wakeup: listening" in log.read_text(), 30, "listening")
            rng = random.Random(29)
            writing = asyncio.create_task(write_like_patchwork(patchwork, 30, rng))
            async with await psycopg.AsyncConnection.connect(db, autocommit=True) as admin:
                await admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE query LIKE 'LISTEN%%' OR query LIKE 'SELECT count(*) FROM pg_trigger%%'"
                )
            await wait_for(lambda: "wakeup: not listening" in log.read_text(), 30, "the cut")
            await wait_for(
                lambda: log.read_text().count("wakeup: listening") >= 2, 60, "listening again"
            )
            committed = await writing
            await server.stop("fast")
            await wait_for(
                lambda: log.read_text().count("wakeup: not listening") >= 2, 30, "the restart"
            )
            await server.start()
            await wait_for(
                lambda: log.read_text().count("wakeup: listening") >= 3, 60, "listening again"
            )
            committed += await write_like_patchwork(patchwork, 30, rng)
            got = await drain(bound_queue, expected=len(committed), timeout=90)
            assert await drain(bound_queue, expected=0, timeout=1.5) == []
        finally:
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), 30)
            await patchwork.stop()
    text = log.read_text()
    assert sorted(int(m.message_id) for m in got) == sorted(e["id"] for e in committed)
    assert text.count("wakeup: not listening") == 2, text[-3000:]
    assert text.count("wakeup: listening") == 3
    assert process.returncode == 0 and "Traceback" not in text, text[-3000:]


async def test_a_dropped_trigger_is_said_once_and_the_poller_polls_as_before(
    db: str, caplog: pytest.LogCaptureFixture
) -> None:
    await act("install", db)
    caplog.set_level(logging.WARNING, logger="bridge.wakeup.listener")
    listener = Listener(
        db, Metrics(), health_check_s=0.2, retry_first_s=0.05, trigger_recheck_s=0.05
    )
    stop = asyncio.Event()
    task = asyncio.create_task(listener.run(stop))
    try:
        await wait_for(lambda: listener.healthy, 10, "listening")
        await act("uninstall", db)
        await wait_for(lambda: not listener.healthy, 10, "the dropped trigger to be seen")
        # It reconnects, and finds no trigger again, twice: still said once.
        await wait_for(lambda: listener.attempts >= 3, 10, "two more looks")
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    (said,) = [r.getMessage() for r in caplog.records]
    assert "was dropped" in said and "wakeup install" in said
