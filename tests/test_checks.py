"""CI results back into Patchwork as checks, against the double's checks API and a real
RabbitMQ: the whole loop (patch -> event -> CI -> result -> check -> check-created event on
the bus), series fan-out, redelivery, and where each kind of failure ends."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aio_pika
import httpx
import jsonschema
import pika
import pytest
from pydantic import SecretStr

from bridge.broker.topology import declare_exchange
from bridge.checks.result import InvalidResult, parse_result, results_exchange
from bridge.checks.role import build_checks_role
from bridge.delivery.messages import LAST_ERROR, LAST_REASON
from bridge.delivery.queues import checks_queues
from bridge.demo.patchwork_double import FakePatchwork
from bridge.metrics import Metrics
from bridge.runtime import InProcess
from bridge.schema import SCHEMAS_DIR
from bridge.settings import Settings
from tests.amqp_helpers import drain, get_all, wait_for
from tests.broker import AMQP_URL
from tests.stream_helpers import DPDK, NIPA, producer, stream_role, stream_settings
from tests.test_producer import TZ

MAINTAINER = "maintainer-token-0123456789"
SCHEDULE = [0.2, 0.4]


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"patch": 1, "state": "success", "context": "build"}, None),
        ({"series": 2, "state": "fail", "context": "kernelci_boot-x86"}, None),
        ({"patch": 1, "series": 2, "state": "success", "context": "b"}, "exactly one of"),
        ({"state": "success", "context": "b"}, "exactly one of"),
        ({"patch": 1, "state": "great", "context": "b"}, "state:"),
        ({"patch": 1, "state": "success", "context": "Build x86"}, "context:"),
        ({"patch": 1, "state": "success", "context": "b" * 256}, "context:"),
        ({"patch": 1, "state": "success", "context": "b", "target_url": "x" * 201}, "target_url"),
        ({"patch": 1, "state": "success", "context": "b", "target_url": "ftp://x"}, "target_url"),
        ({"patch": 0, "state": "success", "context": "b"}, "patch:"),
        ({"patch": 1, "state": "success", "context": "b", "colour": "red"}, "colour:"),
        ([1, 2], "result:"),
    ],
)
def test_a_result_is_checked_before_anything_reaches_patchwork(body, problem):
    if problem is None:
        assert parse_result(json.dumps(body).encode()).state == body["state"]
    else:
        with pytest.raises(InvalidResult, match=problem):
            parse_result(json.dumps(body).encode())


@pytest.mark.parametrize(
    "body",
    [
        {"patch": 1, "state": "success", "context": "build"},
        {"patch": 1, "series": 2, "state": "success", "context": "b"},
        {"state": "success", "context": "b"},
        {"patch": 1, "state": "great", "context": "b"},
        {"patch": 1, "state": "success", "context": "b", "colour": "red"},
        {"series": 9, "state": "fail", "context": "x_y", "target_url": "https://ci/1"},
    ],
)
def test_the_published_json_schema_agrees_with_the_role(body):
    """schemas/check-result.json is what CI authors validate against: no surprises."""
    schema = json.loads((SCHEMAS_DIR / "check-result.json").read_text())
    valid = jsonschema.Draft202012Validator(schema).is_valid(body)
    try:
        parse_result(json.dumps(body).encode())
        accepted = True
    except InvalidResult:
        accepted = False
    assert valid == accepted


def test_a_result_that_is_not_json_is_invalid():
    with pytest.raises(InvalidResult, match="not a JSON object"):
        parse_result(b"\xff{")


@pytest.fixture
async def patchwork_with_checks() -> AsyncIterator[FakePatchwork]:
    fake = FakePatchwork(tz=TZ, maintainers={MAINTAINER: {"netdevbpf"}})
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def clean_checks(amqp, exchange_name) -> AsyncIterator[None]:
    """The checks lane's queues of the test's deployment, and its results exchange: only
    its own, deleted after."""
    yield
    channel = await amqp.channel()
    for queue in checks_queues(exchange_name).watched(SCHEDULE):
        await channel.queue_delete(queue)
    await channel.exchange_delete(results_exchange(exchange_name))
    await channel.close()


def checks_settings(fake: FakePatchwork, exchange: str, tmp_path: Path, **kw) -> Settings:
    return stream_settings(fake, exchange, tmp_path).model_copy(
        update={"patchwork_token": SecretStr(MAINTAINER), "checks_rate": 50.0, **kw}
    )


@asynccontextmanager
async def checks_role(settings: Settings, metrics: Metrics | None = None) -> AsyncIterator[None]:
    role = build_checks_role(settings, metrics or Metrics(), retry_schedule=SCHEDULE)
    async with InProcess([role]) as bridge:
        await bridge.wait_ready()
        yield


async def publish_result(amqp, exchange: str, result: dict, project: str = "netdevbpf") -> None:
    channel = await amqp.channel(publisher_confirms=True)
    target = await declare_exchange(channel, results_exchange(exchange))
    await target.publish(
        aio_pika.Message(json.dumps(result).encode(), content_type="application/json"),
        routing_key=f"{project}.check",
        mandatory=True,
    )
    await channel.close()


def dead_reasons(messages: list[aio_pika.abc.AbstractIncomingMessage]) -> list[str]:
    return [f"{m.headers[LAST_REASON]}: {m.headers[LAST_ERROR]}" for m in messages]


@pytest.mark.broker
async def test_the_whole_loop_a_ci_result_becomes_a_check_and_its_event_comes_back(
    patchwork_with_checks, exchange_name, bound_queue, tmp_path, amqp, clean_checks
):
    fake = patchwork_with_checks
    settings = checks_settings(fake, exchange_name, tmp_path)
    async with producer(settings), checks_role(settings):
        fake.add_event("patch-created", project="netdevbpf")
        (created,) = await drain(bound_queue, expected=1)  # the CI system's own queue
        patch_id = json.loads(created.body)["payload"]["patch"]["id"]
        result = {
            "patch": patch_id,
            "state": "success",
            "context": "build-x86",
            "target_url": "https://ci.example.org/runs/1",
            "description": "built",
        }
        await publish_result(amqp, exchange_name, result)
        (check_event,) = await drain(bound_queue, expected=1, timeout=30)
    (check,) = fake.checks.checks[patch_id]
    assert {k: check[k] for k in result if k != "patch"} == {
        k: v for k, v in result.items() if k != "patch"
    }
    assert check_event.routing_key == "netdevbpf.check-created"
    payload = json.loads(check_event.body)["payload"]
    assert payload["patch"]["id"] == patch_id
    assert payload["check"]["id"] == check["id"]
    assert payload["check"]["context"] == "build-x86"


@pytest.mark.broker
async def test_a_series_result_is_one_check_on_each_patch_and_twice_is_still_once(
    patchwork_with_checks, exchange_name, tmp_path, amqp, clean_checks
):
    fake = patchwork_with_checks
    fake.series_patches[7] = [11, 12, 13]
    result = {"series": 7, "state": "warning", "context": "checkpatch"}
    async with checks_role(checks_settings(fake, exchange_name, tmp_path)):
        await publish_result(amqp, exchange_name, result)
        await wait_for(lambda: sum(len(c) for c in fake.checks.checks.values()) == 3)
        posts = fake.checks.posts
        await publish_result(amqp, exchange_name, result)  # delivered twice: a CI's retry
        await publish_result(amqp, exchange_name, {**result, "state": "success"})  # news
        await wait_for(lambda: sum(len(c) for c in fake.checks.checks.values()) == 6)
        await asyncio.sleep(0.5)
    assert sorted(fake.checks.checks) == [11, 12, 13]
    for checks in fake.checks.checks.values():
        assert [c["state"] for c in checks] == ["warning", "success"]
    assert fake.checks.posts == posts + 3  # the repeat posted nothing


@pytest.mark.broker
async def test_refused_and_invalid_results_are_dead_lettered_with_their_reason(
    patchwork_with_checks, exchange_name, tmp_path, amqp, clean_checks
):
    fake = patchwork_with_checks
    fake.checks.patch_projects[21] = "linux-kselftest"  # not maintained by the token's user
    metrics = Metrics()
    async with checks_role(checks_settings(fake, exchange_name, tmp_path), metrics):
        await publish_result(
            amqp,
            exchange_name,
            {"patch": 21, "state": "fail", "context": "b"},
            project="linux-kselftest",
        )
        await publish_result(amqp, exchange_name, {"patch": 1, "state": "great", "context": "b"})

        async def two_dead() -> bool:
            return (await queue_depth(amqp, checks_queues(exchange_name).dead)) == 2

        await wait_for(two_dead, timeout=30)
    dead = await get_all(amqp, checks_queues(exchange_name).dead)
    reasons = dead_reasons(dead)
    assert any("forbidden" in r for r in reasons), reasons
    assert any("invalid" in r for r in reasons), reasons
    assert fake.checks.checks == {}


@pytest.mark.broker
@pytest.mark.parametrize("fault", ["500", "503", "hang"])
async def test_server_errors_and_timeouts_retry_through_the_broker_until_created(
    patchwork_with_checks, exchange_name, tmp_path, amqp, clean_checks, fault
):
    fake = patchwork_with_checks
    fake.checks.fail_next(fault)
    settings = checks_settings(fake, exchange_name, tmp_path, patchwork_timeout=1.0)
    async with checks_role(settings):
        await publish_result(amqp, exchange_name, {"patch": 3, "state": "pending", "context": "b"})
        await wait_for(lambda: len(fake.checks.checks.get(3, [])) == 1, timeout=30)
    assert fake.checks.posts == 2  # the failed one, then the one that made it
    assert await queue_depth(amqp, checks_queues(exchange_name).dead) == 0


@pytest.mark.broker
async def test_a_ci_that_only_speaks_http_posts_its_result_to_the_stream_port(
    patchwork_with_checks, exchange_name, tmp_path, clean_checks
):
    fake = patchwork_with_checks
    settings = checks_settings(fake, exchange_name, tmp_path)
    good = {"patch": 5, "state": "success", "context": "http-ci", "project": "netdevbpf"}
    async with (
        producer(settings),
        checks_role(settings),
        stream_role(settings) as url,
        httpx.AsyncClient(timeout=30) as client,
    ):

        async def post(body: object, token: str = NIPA) -> httpx.Response:
            headers = {"Authorization": f"Bearer {token}"}
            return await client.post(f"{url}/v1/checks", json=body, headers=headers)

        accepted = await post(good)
        refusals = [
            (await post(good, token="wrong-token-0123456789"), 401, "unknown token"),
            (await post(good, token=DPDK), 403, "may not post checks to 'netdevbpf.check'"),
            (await post({**good, "state": "great"}), 400, "state:"),
            (await post({k: v for k, v in good.items() if k != "project"}), 400, "project:"),
        ]
        await wait_for(lambda: len(fake.checks.checks.get(5, [])) == 1, timeout=30)
    assert accepted.status_code == 202 and "queued" in accepted.json()
    for answer, status, reason in refusals:
        assert (answer.status_code, reason in answer.text) == (status, True), answer.text
    assert [c["context"] for c in fake.checks.checks[5]] == ["http-ci"]


@pytest.mark.broker
async def test_a_result_the_broker_refuses_is_answered_503_with_when_to_send_it_again(
    patchwork_with_checks, amqp, exchange_name, tmp_path, clean_checks
):
    """The results queue is full and refuses publishes: the CI is told to send the result
    again, and when; the refusal is counted. Nothing reaches Patchwork."""
    settings = checks_settings(patchwork_with_checks, exchange_name, tmp_path)
    metrics = Metrics()
    channel = await amqp.channel()
    results = await declare_exchange(channel, results_exchange(exchange_name))
    full = await channel.declare_queue(
        f"{exchange_name}-full", arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
    )
    await full.bind(results, "#")
    good = {"patch": 5, "state": "success", "context": "http-ci", "project": "netdevbpf"}
    try:
        async with (
            producer(settings),
            stream_role(settings, metrics) as url,
            httpx.AsyncClient(timeout=30) as client,
        ):
            answer = await client.post(
                f"{url}/v1/checks", json=good, headers={"Authorization": f"Bearer {NIPA}"}
            )
    finally:
        await full.delete()
        await channel.close()
    assert answer.status_code == 503, answer.text
    assert "send it again" in answer.text
    assert answer.headers["Retry-After"] == "3"
    refused = metrics.registry.get_sample_value(
        "patchwork_bridge_stream_requests_refused_total", {"status": "503"}
    )
    assert refused == 1
    assert not patchwork_with_checks.checks.checks


async def queue_depth(amqp, queue: str) -> int:
    channel = await amqp.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0
    finally:
        await channel.close()


@pytest.fixture
async def two_project_maintainer() -> AsyncIterator[FakePatchwork]:
    """The bridge's token maintains netdevbpf and dpdk: Patchwork's own 403 would not stop
    a check on either."""
    fake = FakePatchwork(tz=TZ, maintainers={MAINTAINER: {"netdevbpf", "dpdk"}})
    fake.checks.patch_projects.update({31: "netdevbpf", 32: "dpdk"})
    fake.series_projects[9] = "netdevbpf"
    fake.series_patches[9] = [33, 34]
    await fake.start()
    yield fake
    await fake.stop()


@pytest.mark.broker
async def test_a_result_naming_another_project_than_its_patchs_is_dead_lettered_unposted(
    two_project_maintainer, exchange_name, tmp_path, amqp, clean_checks, caplog
):
    """Over AMQP: a netdevbpf patch under dpdk.check, and a netdevbpf series under dpdk.check.
    The token could post both; the bridge posts neither, and says why in one line each."""
    fake = two_project_maintainer
    async with checks_role(checks_settings(fake, exchange_name, tmp_path)):
        await publish_result(
            amqp, exchange_name, {"patch": 31, "state": "fail", "context": "b"}, project="dpdk"
        )
        await publish_result(
            amqp, exchange_name, {"series": 9, "state": "fail", "context": "b"}, project="dpdk"
        )
        await publish_result(  # the same token, the right project: posted
            amqp, exchange_name, {"patch": 32, "state": "success", "context": "b"}, project="dpdk"
        )

        async def two_dead() -> bool:
            return (await queue_depth(amqp, checks_queues(exchange_name).dead)) == 2

        await wait_for(two_dead, timeout=30)
        await wait_for(lambda: 32 in fake.checks.checks, timeout=30)
    dead = sorted(dead_reasons(await get_all(amqp, checks_queues(exchange_name).dead)))
    assert dead == [
        "wrong_project: patch 31 belongs to project 'netdevbpf', not to 'dpdk' named by "
        "the result; no check created",
        "wrong_project: series 9 belongs to project 'netdevbpf', not to 'dpdk' named by "
        "the result; no check created",
    ]
    assert set(fake.checks.checks) == {32}
    assert fake.checks.posts == 1
    refusals = [r for r in caplog.records if "wrong_project" in r.getMessage()]
    assert len(refusals) == 2 and all("\n" not in r.getMessage() for r in refusals)


@pytest.mark.broker
async def test_a_consumer_may_not_post_a_check_on_a_patch_of_a_project_it_may_not_read(
    two_project_maintainer, exchange_name, tmp_path, clean_checks
):
    """Over HTTP: the dpdk consumer names dpdk for a netdevbpf patch and a netdevbpf series.
    Both are refused with 403 before anything is queued; its own project's patch goes."""
    fake = two_project_maintainer
    settings = checks_settings(fake, exchange_name, tmp_path)
    async with (
        producer(settings),
        checks_role(settings),
        stream_role(settings) as url,
        httpx.AsyncClient(timeout=30) as client,
    ):

        async def post(body: dict) -> httpx.Response:
            headers = {"Authorization": f"Bearer {DPDK}"}
            return await client.post(f"{url}/v1/checks", json=body, headers=headers)

        patch = await post({"project": "dpdk", "patch": 31, "state": "fail", "context": "x"})
        series = await post({"project": "dpdk", "series": 9, "state": "fail", "context": "x"})
        own = await post({"project": "dpdk", "patch": 32, "state": "success", "context": "x"})
        await wait_for(lambda: 32 in fake.checks.checks, timeout=30)
        await asyncio.sleep(0.5)  # anything else queued would have been posted by now
    assert (patch.status_code, series.status_code, own.status_code) == (403, 403, 202)
    assert patch.text.strip() == (
        "patch 31 belongs to project 'netdevbpf', not to 'dpdk' named by the result; "
        "no check created"
    )
    assert "series 9 belongs to project 'netdevbpf'" in series.text
    assert set(fake.checks.checks) == {32}
    assert fake.checks.posts == 1


@pytest.mark.broker
async def test_a_result_published_without_a_message_id_becomes_a_check(
    patchwork_with_checks, exchange_name, tmp_path, clean_checks
):
    """pika, kombu and most clients set no message_id: the result is taken all the same."""
    fake = patchwork_with_checks
    body = json.dumps({"patch": 8, "state": "success", "context": "pika-ci"}).encode()
    async with checks_role(checks_settings(fake, exchange_name, tmp_path)):
        await asyncio.to_thread(publish_with_pika, results_exchange(exchange_name), body)
        await wait_for(lambda: len(fake.checks.checks.get(8, [])) == 1, timeout=30)
    assert fake.checks.checks[8][0]["context"] == "pika-ci"


def publish_with_pika(exchange: str, body: bytes) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(exchange, "netdevbpf.check", body, pika.BasicProperties())
    finally:
        connection.close()
