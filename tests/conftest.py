"""Fixtures shared by the suite: unique broker names per test, cleaned up afterwards."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator

import aio_pika
import pytest

from bridge.broker.topology import replay_exchange
from bridge.delivery.history import history_queue
from bridge.demo.patchwork_double import FakePatchwork
from bridge.eventlog import log_queue
from bridge.producer.lock import quorum_lock_queue
from tests.broker import AMQP_URL, rabbitmqctl

# Every Settings() and every role run as a process talks to the broker under test.
os.environ["BRIDGE_AMQP_URL"] = AMQP_URL

RECORDED_EVENTS = (
    __import__("pathlib").Path(__file__).resolve().parents[1]
    / "bridge"
    / "demo"
    / "data"
    / "events"
)


RUN = uuid.uuid4().hex[:4]
"""In every name this run of the suite makes on the broker, so that its last check looks
at its own names only: other deployments and other runs use the broker meanwhile."""


@pytest.fixture
def unique() -> str:
    return RUN + uuid.uuid4().hex[:6]


@pytest.fixture
async def amqp() -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    connection = await aio_pika.connect(AMQP_URL, timeout=10)
    yield connection
    await connection.close()


@pytest.fixture
async def exchange_name(amqp: aio_pika.abc.AbstractConnection, unique: str) -> AsyncIterator[str]:
    """A fresh exchange name; the exchange is deleted after the test whoever declared it."""
    name = f"test-{unique}"
    yield name
    channel = await amqp.channel()
    await channel.exchange_delete(name)
    await channel.queue_delete(log_queue(name))  # the event log a producer declared
    await channel.queue_delete(history_queue(name))  # the webhook role's attempt history
    await channel.queue_delete(quorum_lock_queue(name))  # a producer's lock on a cluster
    await channel.close()


@pytest.fixture
async def bound_queue(
    amqp: aio_pika.abc.AbstractConnection, exchange_name: str, unique: str
) -> AsyncIterator[str]:
    """A durable queue bound with ``#`` to the test's exchange, as a CI system would bind one."""
    channel = await amqp.channel()
    exchange = await channel.declare_exchange(
        exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await channel.declare_queue(f"test-{unique}-all", durable=True)
    await queue.bind(exchange, "#")
    yield queue.name
    await channel.queue_delete(queue.name)
    await channel.close()


@pytest.fixture
async def patchwork() -> AsyncIterator[FakePatchwork]:
    """A started Patchwork double in Patchwork's default zone, stopped after the test."""
    fake = FakePatchwork(tz="Australia/Canberra")
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def ci_queue(
    amqp: aio_pika.abc.AbstractConnection, exchange_name: str, unique: str
) -> AsyncIterator[str]:
    """A fresh queue name for a CI system's own queue; it, its .dead and the replay route
    `bind` makes for it in the test's deployment are deleted after."""
    name = f"test-ci-{unique}"
    yield name
    channel = await amqp.channel()
    for queue in (name, f"{name}.dead"):
        await channel.queue_delete(queue)
    await channel.exchange_delete(replay_exchange(exchange_name, name))
    await channel.close()


BROKER_FIXTURES = frozenset({"amqp", "exchange_name", "bound_queue", "ci_queue"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that talks to RabbitMQ ``broker``: through a broker fixture here, or
    by its module's ``pytestmark``. ``pytest -m "not broker"`` runs the rest in seconds."""
    for item in items:
        if BROKER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.broker)


def _broker_names(kind: str) -> set[str] | None:
    """Queue or exchange names on the broker under test; None if rabbitmqctl cannot tell."""
    try:
        result = rabbitmqctl(f"list_{kind}", "name", "-q", "--no-table-headers")
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    return {line.strip() for line in result.stdout.splitlines() if line.strip()}


@pytest.fixture(scope="session", autouse=True)
def nothing_left_on_the_broker(request: pytest.FixtureRequest) -> Iterator[None]:
    """Tests use their own queues and exchanges and delete them: at the end of the session
    no name of this run (``RUN``) is left. Names of others are none of its business."""
    yield
    if not any(item.get_closest_marker("broker") for item in request.session.items):
        return  # nothing of this run talked to the broker (-m "not broker")
    for kind in ("queues", "exchanges"):
        after = _broker_names(kind)
        if after is None:
            continue  # no rabbitmqctl here (a run of the tests that need no broker)
        left = sorted(name for name in after if RUN in name)
        assert not left, f"the tests left {len(left)} {kind} on the broker: {left[:10]}"
