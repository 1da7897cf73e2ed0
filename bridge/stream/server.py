"""The stream's HTTP side: ``GET /v1/events`` (Server-Sent Events, framed by aiohttp-sse),
``GET /`` (a page showing the live stream), ``POST /v1/checks`` (a CI result onto the
results exchange). See docs/stream.md and docs/checks.md."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from html import escape
from importlib import resources

import aio_pika
import aiohttp
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection
from aiohttp import web
from aiohttp_sse import EventSourceResponse, sse_response
from aiormq import spec

from bridge.broker.calls import BROKER_TIMEOUT_S, raise_if_cancelled
from bridge.broker.connect import RecycledConnection
from bridge.broker.errors import BROKER_ERRORS, BROKER_TROUBLE, NotConfirmed
from bridge.broker.topology import declare_exchange
from bridge.checks.patchwork import PatchworkChecks
from bridge.checks.patchwork import Refused as PatchworkRefused
from bridge.checks.result import CheckResult, InvalidResult, parse_result, results_exchange
from bridge.eventlog import LogMissing
from bridge.metrics import Metrics
from bridge.settings import Settings
from bridge.signing import public_keys, read_key_file
from bridge.sinks.base import GiveUp
from bridge.stream.consumers import StreamConsumers
from bridge.stream.feed import Feed, Gap, LogStalled
from bridge.stream.hub import Hub
from bridge.stream.positions import BadPosition
from bridge.stream.query import (
    Refused,
    StreamRequest,
    authenticate,
    parse_request,
    refuse_token_in_query,
)
from bridge.stream.reads import LogReads
from bridge.topics import TopicMatcher, covers

log = logging.getLogger(__name__)

LOG_UNREADABLE: tuple[type[BaseException], ...] = (LogStalled, *BROKER_ERRORS)
"""Why a stream cannot start just now: the client gets a 503 and tries again."""

RETRY_MS = 3000
"""How long a client waits before reconnecting: sent once, with the first event (a
block of its own would reach some clients as an empty event)."""
SEND_TIMEOUT_S = 30.0
"""A write to a client that takes longer than this ends its stream (``stalled``)."""
WRITE_BATCH = 100
"""Events waiting for a client go out together, this many at most per write."""
CLOSE_TIMEOUT_S = 5.0
MAX_RESULT_BYTES = 16_384


class ClientStalled(Exception):
    """A write to the client did not finish within SEND_TIMEOUT_S."""


class KeepAliveResponse(EventSourceResponse):
    """aiohttp-sse's response, whose keep-alive is a comment line and nothing more.

    aiohttp-sse (3.0) ends its ``: ping`` comment with a blank line. The SSE spec says a
    blank line with no data dispatches nothing, but httpx-sse (0.4.3, the current release)
    dispatches an empty ``message`` event there once it has seen an ``id``, and a client
    that parses every event's data as JSON dies at the first keep-alive (15 s in). A
    comment line alone keeps proxies open just the same, and no parser can make an event
    of it: the blank line that ends the next event ends only that event.
    """

    async def _ping(self) -> None:  # aiohttp-sse's own loop, with the comment line alone
        message = f": ping{self._sep}".encode()
        while True:
            await asyncio.sleep(self._ping_interval)
            try:
                async with asyncio.timeout(self._send_timeout):
                    await self.write(message)
            except TimeoutError:
                self._abort_transport()
                break
            except (ConnectionResetError, RuntimeError):  # RuntimeError: written after EOF
                break


class StreamServer:
    """The handlers, and the clients they serve, so that shutdown and metrics reach them."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        consumers: StreamConsumers,
        hub: Hub,
        connection: AbstractRobustConnection,
        reads: RecycledConnection,
        patchwork: PatchworkChecks | None = None,
    ) -> None:
        """``patchwork``: where a posted result's project is checked before it is queued
        (None: the checks role alone checks). Owned by the caller."""
        self._settings = settings
        self._patchwork = patchwork
        self._metrics = metrics
        self._consumers = consumers
        self._hub = hub
        self._connection = connection
        self._reads = LogReads(reads, settings.exchange)
        """Where clients catching up read the log, sharing what they read."""
        self.closing = asyncio.Event()
        self._results: tuple[AbstractChannel, AbstractExchange] | None = None
        """The confirming channel results are published on, and the exchange on it."""
        self._results_lock = asyncio.Lock()
        self.feeds: dict[Feed, str] = {}
        """Each connected client's feed, with its consumer's name."""
        metrics.stream_started(list(consumers.names))
        self._public_keys = (
            public_keys(read_key_file(settings.signing_key_file))
            if settings.signing_key_file
            else []
        )

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/events", self.events)
        app.router.add_post("/v1/checks", self.post_check)
        app.router.add_get("/", self.page)
        app.router.add_get("/v1/signing-keys", self.signing_keys)
        return app

    async def signing_keys(self, _: web.Request) -> web.Response:
        """The public keys that verify the deployment's ``v1a`` webhook signatures: public,
        so no token is asked for."""
        return web.json_response({"keys": self._public_keys})

    async def page(self, _: web.Request) -> web.Response:
        html = resources.files("bridge.stream").joinpath("page.html").read_text("utf-8")
        # Its times are shown in the reader's zone: the page must know Patchwork's.
        zone = escape(self._settings.patchwork_timezone, quote=True)
        return web.Response(
            text=html.replace("{patchwork_timezone}", zone),
            content_type="text/html",
            headers={
                # The page talks to this server only; the token never leaves it.
                "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
                "style-src 'unsafe-inline'; connect-src 'self'",
                "Referrer-Policy": "no-referrer",
            },
        )

    async def events(self, request: web.Request) -> web.StreamResponse:
        try:
            asked = parse_request(
                request.query, request.headers, self._consumers, self._settings.tz
            )
        except Refused as exc:
            return self._refuse(request, exc.status, exc.reason)
        feed = Feed(
            self._hub,
            self._reads,
            TopicMatcher(asked.patterns),
            self._settings.stream_client_buffer,
        )
        try:
            gap = await feed.open(asked.start)
        except BadPosition as exc:
            return self._refuse(request, 400, str(exc))
        except LogMissing:
            return self._unavailable("no event log yet: is a producer running?")
        except LOG_UNREADABLE as exc:
            log.warning(
                "stream: cannot read the event log for %s (%s)",
                asked.consumer.name,
                str(exc) or type(exc).__name__,
            )
            return self._unavailable("the event log cannot be read just now")
        return await self._stream(request, asked, feed, gap)

    async def _stream(
        self, request: web.Request, asked: StreamRequest, feed: Feed, gap: Gap | None
    ) -> web.StreamResponse:
        name = asked.consumer.name
        began = time.monotonic()
        sent = [0]
        self.feeds[feed] = name
        self._metrics.stream_clients.labels(name).inc()
        reason = "client"
        try:
            async with sse_response(
                request,
                ping_interval=self._settings.stream_keepalive,
                send_timeout=SEND_TIMEOUT_S,
                response_cls=KeepAliveResponse,
            ) as response:
                if gap is not None:
                    gone = {"asked": str(gap.asked), "oldest": str(gap.oldest)}
                    await response.send(json.dumps(gone), event="gap")
                reason = await self._pump(feed, response, name, sent)
                if reason in ("slow", "stalled") and request.transport is not None:
                    # Its socket is full: a clean end would wait on it. It resumes anyway.
                    request.transport.abort()
        except (ConnectionResetError, asyncio.CancelledError):
            reason = "client"
            raise
        finally:
            del self.feeds[feed]
            await feed.close()
            self._metrics.stream_clients.labels(name).dec()
            self._metrics.stream_disconnects.labels(reason).inc()
            log.info(
                "stream: %s (%s) gone after %d events in %.0fs: %s",
                name,
                request.remote,
                sent[0],
                time.monotonic() - began,
                reason,
            )
        return response

    async def _pump(
        self, feed: Feed, response: EventSourceResponse, name: str, sent: list[int]
    ) -> str:
        """Send the feed until the client goes, falls behind, or the server stops; says why."""
        counter = self._metrics.stream_events_sent.labels(name)

        async def send_all() -> None:
            # Each event's block is rendered once for all clients, and what is waiting
            # goes out in one write: per client, per event, aiohttp-sse's send() formats
            # the block again and writes it alone (bench/stream.py: the role's CPU per
            # delivery). aiohttp-sse still owns the response, keep-alives and timeouts.
            prefix = f"retry: {RETRY_MS}\r\n".encode()  # once, inside the first block
            batch: list[bytes] = []
            async for entry in feed.entries():
                batch.append(entry.frame)
                if feed.waiting() and len(batch) < WRITE_BATCH:
                    continue
                try:
                    async with asyncio.timeout(SEND_TIMEOUT_S):
                        await response.write(prefix + b"".join(batch))
                except TimeoutError:  # not the broker's: a read of the log times out too
                    raise ClientStalled from None
                prefix = b""
                sent[0] += len(batch)
                counter.inc(len(batch))
                batch = []

        sender = asyncio.create_task(send_all(), name=f"stream-{name}")
        others = {
            asyncio.ensure_future(self.closing.wait()): "shutdown",
            asyncio.ensure_future(feed.subscriber.overflowed.wait()): "slow",
            asyncio.ensure_future(response.wait()): "client",  # its keep-alive failed
        }
        try:
            done, _ = await asyncio.wait([sender, *others], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in [sender, *others]:
                waiter.cancel()
            await asyncio.gather(sender, *others, return_exceptions=True)
        if sender not in done:
            return next(others[w] for w in others if w in done)
        exc = sender.exception() if not sender.cancelled() else None
        if isinstance(exc, LogStalled):
            log.warning("stream: %s: %s; it resumes from its last id", name, exc)
            return "broker"
        if isinstance(exc, ClientStalled):
            return "stalled"
        if isinstance(exc, ConnectionResetError):
            return "client"
        if isinstance(exc, BROKER_ERRORS):
            log.warning("stream: %s: the event log failed under it (%s)", name, exc)
            return "broker"
        log.error("stream: %s: sending failed", name, exc_info=exc)
        return "error"

    async def post_check(self, request: web.Request) -> web.Response:
        """A CI result over HTTP: 202 once the broker confirms it on the results exchange."""
        try:
            refuse_token_in_query(request.query)
            consumer = authenticate(request.headers, self._consumers)
            if request.content_length is not None and request.content_length > MAX_RESULT_BYTES:
                raise Refused(413, f"a result is at most {MAX_RESULT_BYTES} bytes")
            body = await request.content.read(MAX_RESULT_BYTES + 1)
            result = parse_result(body)
            if result.project is None:
                raise Refused(400, "project: required over HTTP (the project's link name)")
            key = f"{result.project}.check"
            if not any(covers(allowed, key) for allowed in consumer.events):
                raise Refused(403, f"consumer {consumer.name!r} may not post checks to {key!r}")
            await self._check_project(result, result.project)
        except InvalidResult as exc:
            return self._refuse(request, 400, f"not a check result: {exc}")
        except Refused as exc:
            return self._refuse(request, exc.status, exc.reason)
        message_id = uuid.uuid4().hex
        try:
            await self._publish_result(body, key, message_id, consumer.name)
        except BROKER_TROUBLE as exc:
            raise_if_cancelled()
            log.warning("stream: result of %s not published (%s)", consumer.name, exc)
            return self._unavailable(f"not queued ({type(exc).__name__}); send it again")
        log.info("stream: %s queued a %s result for %s", consumer.name, result.state, result.target)
        return web.json_response({"queued": message_id}, status=202)

    async def _check_project(self, result: CheckResult, project: str) -> None:
        """Refused (403) when Patchwork says the patch or series is another project's. The
        checks role checks again before it posts (the result waits in the broker meanwhile),
        so a Patchwork that does not answer now only delays the answer to the CI."""
        if self._patchwork is None:
            return  # no BRIDGE_PATCHWORK_URL here: the checks role alone checks
        try:
            await self._patchwork.target(result, project)
        except PatchworkRefused as refused:
            outcome = refused.outcome
            if isinstance(outcome, GiveUp) and outcome.reason == "wrong_project":
                raise Refused(403, outcome.detail) from None
            if isinstance(outcome, GiveUp) and outcome.reason in ("not_found", "empty_series"):
                raise Refused(404, outcome.detail) from None
            log.info("stream: cannot check %s's project now (%s)", result.target, outcome)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.info("stream: cannot check %s's project now (%s)", result.target, exc)

    async def _publish_result(self, body: bytes, key: str, message_id: str, by: str) -> None:
        async with self._results_lock:
            if self._results is None or self._results[0].is_closed:
                channel = await self._connection.channel(publisher_confirms=True)
                exchange = await declare_exchange(
                    channel, results_exchange(self._settings.exchange)
                )
                self._results = (channel, exchange)
            _, exchange = self._results
        answer = await exchange.publish(
            aio_pika.Message(
                body,
                message_id=message_id,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                headers={"x-patchwork-bridge-consumer": by},
            ),
            routing_key=key,
            mandatory=True,  # no checks queue yet: an error, not a silent drop
            timeout=BROKER_TIMEOUT_S,
        )
        if not isinstance(answer, spec.Basic.Ack):
            raise NotConfirmed("no queue takes results: has the checks role run yet?")

    def _refuse(self, request: web.Request, status: int, reason: str) -> web.Response:
        self._metrics.stream_refused.labels(str(status)).inc()
        # The path only: a query string may hold a token someone put there.
        log.info(
            "stream: refused %s %s from %s: %d %s",
            request.method,
            request.path,
            request.remote,
            status,
            reason,
        )
        headers = {"WWW-Authenticate": 'Bearer realm="patchwork-bridge"'} if status == 401 else {}
        return web.Response(status=status, text=reason + "\n", headers=headers)

    def _unavailable(self, reason: str) -> web.Response:
        """503: nothing wrong with the request; the client tries again after ``RETRY_MS``.
        Logged where the cause is known."""
        self._metrics.stream_refused.labels("503").inc()
        headers = {"Retry-After": str(RETRY_MS // 1000)}
        return web.Response(status=503, text=reason + "\n", headers=headers)

    def sample_lag(self) -> None:
        """``stream_client_lag_events``: the furthest-behind client of each consumer."""
        tail = self._hub.tail
        worst = dict.fromkeys(self._consumers.names, 0)
        for feed, name in self.feeds.items():
            if tail is not None and feed.last_read is not None:
                worst[name] = max(worst[name], tail - feed.last_read)
        for name, lag in worst.items():
            self._metrics.stream_lag.labels(name).set(lag)
