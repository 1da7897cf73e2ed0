"""The webhook sink against real aiohttp receivers on loopback: headers, outcomes, limits."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from zoneinfo import ZoneInfo

import pytest
from aiohttp import web
from cloudevents.core.bindings.http import HTTPMessage, from_binary
from cloudevents.core.formats.json import JSONFormat
from standardwebhooks import Webhook

from bridge.events import USER_AGENT, ce_headers, parse_event
from bridge.logs import DETAIL_MAX_CHARS
from bridge.metrics import DELIVERY_FAILURE_REASONS
from bridge.sinks.base import Delivered, Delivery, Disable, GiveUp, Outcome, RetryLater
from bridge.sinks.webhook import WebhookSink
from bridge.webhook.subscriptions import Subscription
from tests.conftest import RECORDED_EVENTS
from tests.receiver import Receiver, answering

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
TOKEN = "tok-3f9a1c77e2b8"
SOURCE = "https://patchwork.example.org/api/1.3"
TZ = ZoneInfo("Australia/Canberra")


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with Receiver() as server:
        yield server


@pytest.fixture
async def make_sink() -> AsyncIterator[Callable[..., WebhookSink]]:
    sinks: list[WebhookSink] = []

    def make(url: str, **settings: object) -> WebhookSink:
        values: dict[str, object] = {"name": "test", "url": url, "allow_private_network": True}
        values.update(settings)
        sink = WebhookSink(Subscription(**values))  # type: ignore[arg-type]
        sinks.append(sink)
        return sink

    yield make
    for sink in sinks:
        await sink.close()


def delivery(attempt: int = 1, **headers: str) -> Delivery:
    raw = (RECORDED_EVENTS / "patch-created.json").read_text()
    event = parse_event(json.loads(raw), raw)
    return Delivery(
        body=event.body,
        message_id=event.message_id,
        routing_key=event.routing_key,
        headers={**ce_headers(event, SOURCE, TZ), **headers},
        attempt=attempt,
    )


def assert_reason_is_a_metric_label(outcome: Outcome) -> None:
    if not isinstance(outcome, Delivered):
        assert outcome.reason in DELIVERY_FAILURE_REASONS


async def test_delivery_is_signed_authorised_and_carries_cloudevents_headers(
    receiver: Receiver, make_sink: Callable[..., WebhookSink]
) -> None:
    sink = make_sink(receiver.url(), secret=SECRET, bearer_token=TOKEN)
    sent = delivery()

    assert await sink.deliver(sent) == Delivered(204)

    ((path, headers, body),) = receiver.requests
    assert path == "/hook"
    assert body == sent.body
    assert Webhook(SECRET).verify(body, headers)["id"] == 3
    assert headers["webhook-id"] == sent.message_id
    assert headers["Authorization"] == f"Bearer {TOKEN}"
    assert headers["User-Agent"] == USER_AGENT
    assert headers["Content-Type"] == "application/json"
    event = from_binary(HTTPMessage(headers=headers, body=body), JSONFormat())
    assert event.get_id() == "3"
    assert event.get_source() == SOURCE
    assert event.get_type() == "org.patchwork.patch-created"
    assert event.get_subject() == "netdevbpf"
    assert event.get_time() == datetime(2026, 11, 24, 13, 14, 18, 578176, tzinfo=TZ)
    assert event.get_data()["payload"]["patch"]["id"] == 1


async def test_webhook_id_is_the_same_on_every_retry(
    receiver: Receiver, make_sink: Callable[..., WebhookSink]
) -> None:
    sink = make_sink(receiver.url(), secret=SECRET)
    for attempt in (1, 2, 3):
        await sink.deliver(delivery(attempt))
    ids = {headers["webhook-id"] for _, headers, _ in receiver.requests}
    assert ids == {"3"}
    for _, headers, body in receiver.requests:
        Webhook(SECRET).verify(body, headers)


async def test_without_secret_or_token_those_headers_are_absent(
    receiver: Receiver, make_sink: Callable[..., WebhookSink]
) -> None:
    await make_sink(receiver.url()).deliver(delivery())
    ((_, headers, _),) = receiver.requests
    assert "webhook-signature" not in headers
    assert "Authorization" not in headers
    assert headers["webhook-id"] == "3"


async def test_gone_disables_the_subscription(
    receiver: Receiver, make_sink: Callable[..., WebhookSink]
) -> None:
    receiver.handler = answering(410)
    outcome = await make_sink(receiver.url()).deliver(delivery())
    assert isinstance(outcome, Disable)
    assert (outcome.reason, outcome.status) == ("http_410", 410)
    assert_reason_is_a_metric_label(outcome)


@pytest.mark.parametrize(
    ("code", "retry_after", "reason", "delay_s"),
    [
        (429, "120", "http_429", 120.0),
        (503, "7", "http_5xx", 7.0),
        (429, "86400", "http_429", 3600.0),
        (503, "", "http_5xx", None),
        (429, "whenever", "http_429", None),
    ],
)
async def test_too_many_requests_and_unavailable_honour_retry_after(
    receiver: Receiver,
    make_sink: Callable[..., WebhookSink],
    code: int,
    retry_after: str,
    reason: str,
    delay_s: float | None,
) -> None:
    receiver.handler = answering(code, **({"Retry-After": retry_after} if retry_after else {}))
    outcome = await make_sink(receiver.url()).deliver(delivery())
    assert outcome == RetryLater(reason, outcome.detail, delay_s, code)  # type: ignore[union-attr]
    assert_reason_is_a_metric_label(outcome)


async def test_retry_after_as_an_http_date(
    receiver: Receiver, make_sink: Callable[..., WebhookSink]
) -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=600), usegmt=True)
    receiver.handler = answering(503, **{"Retry-After": when})
    outcome = await make_sink(receiver.url()).deliver(delivery())
    assert isinstance(outcome, RetryLater) and outcome.delay_s is not None
    assert 590 <= outcome.delay_s <= 600


@pytest.mark.parametrize(
    ("code", "reason"), [(500, "http_5xx"), (502, "http_5xx"), (404, "http_4xx"), (400, "http_4xx")]
)
async def test_other_failures_retry_on_the_schedule(
    receiver: Receiver, make_sink: Callable[..., WebhookSink], code: int, reason: str
) -> None:
    receiver.handler = answering(code)
    outcome = await make_sink(receiver.url()).deliver(delivery())
    assert outcome == RetryLater(
        reason, f"POST {receiver.url()}: HTTP {code}: status {code}", None, code
    )


async def test_redirect_is_not_followed(
    receiver: Receiver, make_sink: Callable[..., WebhookSink]
) -> None:
    receiver.handler = answering(307, Location=receiver.url("/elsewhere"))
    outcome = await make_sink(receiver.url()).deliver(delivery())
    assert isinstance(outcome, RetryLater)
    assert (outcome.reason, outcome.status) == ("http_3xx", 307)
    assert [path for path, _, _ in receiver.requests] == ["/hook"]


async def test_hanging_receiver_is_a_timeout(
    receiver: Receiver, make_sink: Callable[..., WebhookSink]
) -> None:
    receiver.handler = receiver.hang
    outcome = await make_sink(receiver.url(), timeout=0.3).deliver(delivery())
    assert isinstance(outcome, RetryLater)
    assert outcome.reason == "timeout"
    assert outcome.status is None


async def test_huge_response_body_is_not_read_in_full(
    receiver: Receiver, make_sink: Callable[..., WebhookSink]
) -> None:
    # The body never ends: had the sink read it all, this would be a timeout, not an answer.
    receiver.handler = receiver.endless
    outcome = await make_sink(receiver.url(), timeout=30).deliver(delivery())
    assert isinstance(outcome, RetryLater)
    assert (outcome.reason, outcome.status) == ("http_5xx", 500)
    assert len(outcome.detail) <= DETAIL_MAX_CHARS


async def test_refused_connection_is_a_connect_failure(
    make_sink: Callable[..., WebhookSink],
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens on the port any more.
    outcome = await make_sink(f"http://127.0.0.1:{port}/hook").deliver(delivery())
    assert isinstance(outcome, RetryLater)
    assert outcome.reason == "connect"
    assert f"127.0.0.1:{port}" in outcome.detail


@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]", "localhost"])
async def test_loopback_receiver_is_refused_without_allow_private_network(
    receiver: Receiver, make_sink: Callable[..., WebhookSink], host: str
) -> None:
    sink = make_sink(f"http://{host}:{receiver.port}/hook", allow_private_network=False)
    outcome = await sink.deliver(delivery())
    assert isinstance(outcome, GiveUp)
    assert outcome.reason == "ssrf"
    assert "loopback" in outcome.detail
    assert receiver.requests == []


async def test_details_never_show_secret_token_or_query_string(
    receiver: Receiver, make_sink: Callable[..., WebhookSink]
) -> None:
    async def echo_everything(request: web.Request) -> web.Response:
        return web.Response(status=500, text=f"{request.path_qs} {dict(request.headers)}")

    receiver.handler = echo_everything
    sink = make_sink(receiver.url("/hook?api_key=k3y-in-query"), secret=SECRET, bearer_token=TOKEN)
    outcome = await sink.deliver(delivery())
    assert isinstance(outcome, RetryLater)
    assert receiver.requests[0][0] == "/hook?api_key=k3y-in-query"
    assert outcome.detail.startswith(f"POST {receiver.url()}: HTTP 500")
    for secret in (TOKEN, SECRET, "k3y-in-query"):
        assert secret not in outcome.detail


async def test_requests_in_flight_never_exceed_concurrency(
    receiver: Receiver, make_sink: Callable[..., WebhookSink]
) -> None:
    receiver.handler = receiver.hang
    sink = make_sink(receiver.url(), concurrency=2, timeout=10)
    tasks = [asyncio.create_task(sink.deliver(delivery())) for _ in range(6)]
    await until(lambda: receiver.in_flight == 2)
    # Give a third request every chance to arrive; it must not.
    await asyncio.wait(tasks, timeout=0.3)
    assert len(receiver.requests) == 2
    receiver.release.set()
    outcomes = await asyncio.gather(*tasks)
    assert outcomes == [Delivered(200)] * 6


async def test_a_poison_header_is_given_up_not_sent(
    receiver: Receiver, make_sink: Callable[..., WebhookSink]
) -> None:
    outcome = await make_sink(receiver.url()).deliver(
        delivery(**{"ce-subject": "netdevbpf\r\nX-Injected: 1"})
    )
    assert isinstance(outcome, GiveUp) and outcome.reason == "invalid"
    assert receiver.requests == []


async def test_closed_sink_refuses_work(
    receiver: Receiver, make_sink: Callable[..., WebhookSink]
) -> None:
    sink = make_sink(receiver.url())
    await sink.deliver(delivery())
    await sink.close()
    await sink.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        await sink.deliver(delivery())


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)
