"""The webhook sink: one signed HTTP POST per delivery, its answer turned into an outcome.

Each subscription has its own aiohttp session, so a receiver that hangs only
holds its own subscription's connections (at most ``concurrency``). The session
is created on first use inside the running loop and closed by ``close()``.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime

import aiohttp
from pydantic import SecretStr
from yarl import URL

from bridge.events import USER_AGENT
from bridge.logs import one_line
from bridge.signing import Signer, decode_secrets, decode_signing_keys
from bridge.sinks.base import Delivered, Delivery, Disable, GiveUp, Outcome, RetryLater, SinkSpec
from bridge.sinks.netguard import ForbiddenAddress, GuardedResolver, check_literal_host
from bridge.sinks.retry_after import parse_retry_after

BODY_READ_CAP_BYTES = 64 * 1024
"""How much of a response we read, only to quote it in the log; the rest is never downloaded."""
CONNECT_TIMEOUT_MAX_S = 5.0
CE_HEADERS = ("ce-specversion", "ce-id", "ce-source", "ce-type", "ce-subject", "ce-time")


class WebhookSink:
    """POSTs events to ``subscription.url``; see docs/webhooks.md for the headers."""

    enforces_timeout = True
    """aiohttp's total timeout bounds every attempt, reading the answer included."""

    def __init__(self, subscription: SinkSpec) -> None:
        if subscription.url is None:
            raise ValueError("a webhook needs a url")
        self._subscription = subscription
        self._url = URL(subscription.url)
        signing_key: SecretStr | None = getattr(subscription, "signing_key", None)
        self._signer = Signer(
            decode_secrets(subscription.secret.get_secret_value()) if subscription.secret else [],
            decode_signing_keys(signing_key.get_secret_value()) if signing_key else [],
        )
        self._auth = (
            f"Bearer {subscription.bearer_token.get_secret_value()}"
            if subscription.bearer_token is not None
            else None
        )
        # What detail lines may show of the URL: no query (it may hold a key), no fragment.
        self._shown_url = str(self._url.with_query(None).with_fragment(None))
        self._redact = [
            s
            for s in (
                self._url.raw_query_string,
                self._url.query_string,
                subscription.secret.get_secret_value() if subscription.secret else "",
                subscription.bearer_token.get_secret_value() if subscription.bearer_token else "",
            )
            if s
        ]
        # Each secret or key alone, too: a receiver may echo one of them.
        for held in (subscription.secret, signing_key):
            if held is not None:
                self._redact += held.get_secret_value().split()
        # The headers that are the same on every POST, built and checked once.
        self._fixed_headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            # We only quote the start of an answer: never ask for a compressed one.
            "Accept-Encoding": "identity",
        }
        if self._auth is not None:
            if _CONTROL_CHAR.search(self._auth):
                raise ValueError(f"{subscription.name}: bearer_token has control characters")
            self._fixed_headers["Authorization"] = self._auth
        # The URL never changes, so neither does what the SSRF guard says of an IP literal.
        self._refusal: GiveUp | None = None
        if not subscription.allow_private_network:
            try:
                # aiohttp does not resolve IP literals, so the resolver never sees them.
                check_literal_host(self._url.host or "")
            except ForbiddenAddress as exc:
                self._refusal = GiveUp("ssrf", self._scrub(f"POST {self._shown_url}: {exc}"))
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def _get_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError(f"webhook sink {self._subscription.name} is closed")
        if self._session is None:
            sub = self._subscription
            connector = aiohttp.TCPConnector(
                limit=sub.concurrency,
                limit_per_host=0,
                resolver=None if sub.allow_private_network else GuardedResolver(),
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                # Not ClientTimeout(connect=...): aiohttp counts the wait for a free
                # pooled connection in it, which is queueing, not a dead receiver.
                timeout=aiohttp.ClientTimeout(
                    total=sub.timeout, sock_connect=min(CONNECT_TIMEOUT_MAX_S, sub.timeout)
                ),
                # No proxy from the environment: the SSRF guard must see the receiver itself.
                trust_env=False,
                # We only quote the start of a body; never inflate a compressed one.
                auto_decompress=False,
            )
        return self._session

    async def deliver(self, delivery: Delivery) -> Outcome:
        if self._refusal is not None:
            return self._refusal
        headers = self._headers(delivery)
        if isinstance(headers, GiveUp):
            return headers
        session = self._get_session()
        try:
            async with session.post(
                self._url, data=delivery.body, headers=headers, allow_redirects=False
            ) as response:
                snippet = await _read_capped(response)
                return self._outcome(response, snippet)
        except ForbiddenAddress as exc:
            return GiveUp("ssrf", self._scrub(f"POST {self._shown_url}: {exc}"))
        except TimeoutError:
            timeout_s = self._subscription.timeout
            return RetryLater("timeout", f"POST {self._shown_url}: no answer within {timeout_s}s")
        except (aiohttp.ClientError, OSError) as exc:
            detail = f"POST {self._shown_url}: {type(exc).__name__}: {exc}"
            return RetryLater("connect", self._scrub(detail))

    def _headers(self, delivery: Delivery) -> dict[str, str] | GiveUp:
        # A poison message must not smuggle a header line into the request: its own
        # values are checked as they are copied (the fixed headers were checked at start).
        message_id = delivery.message_id
        if _unsafe(message_id):
            return GiveUp("invalid", f"header webhook-id of message {message_id!r}")
        timestamp_s = int(time.time())
        headers = self._fixed_headers.copy()
        headers["webhook-id"] = message_id
        headers["webhook-timestamp"] = str(timestamp_s)
        if self._signer:
            headers["webhook-signature"] = self._signer.sign(message_id, timestamp_s, delivery.body)
        for name in CE_HEADERS:
            value = delivery.headers.get(name)
            if value is None:
                continue
            if _unsafe(value):
                return GiveUp("invalid", f"header {name} of message {message_id!r}")
            headers[name] = value
        return headers

    def _outcome(self, response: aiohttp.ClientResponse, snippet: str) -> Outcome:
        status = response.status
        if 200 <= status < 300:
            return Delivered(status)  # the common case: no detail line to build
        said = f"POST {self._shown_url}: HTTP {status}"
        if snippet:
            said += f": {snippet}"
        said = self._scrub(said)
        if status == 410:
            return Disable("http_410", said, status)
        if status in (429, 503):
            delay_s = parse_retry_after(response.headers.get("Retry-After"), datetime.now(UTC))
            reason = "http_429" if status == 429 else "http_5xx"
            return RetryLater(reason, said, delay_s, status)
        if 300 <= status < 400:
            return RetryLater("http_3xx", said + " (redirects are not followed)", None, status)
        if 400 <= status < 500:
            return RetryLater("http_4xx", said, None, status)
        return RetryLater("http_5xx", said, None, status)

    def _scrub(self, text: str) -> str:
        """One line, bounded, without the secret, the token or the URL's query string."""
        for secret in self._redact:
            text = text.replace(secret, "***")
        return one_line(text)

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()


_CONTROL_CHAR = re.compile(r"[\x00-\x1f\x7f]")


def _unsafe(value: object) -> bool:
    return type(value) is not str or _CONTROL_CHAR.search(value) is not None


async def _read_capped(response: aiohttp.ClientResponse) -> str:
    """At most BODY_READ_CAP_BYTES of the body, decoded leniently for a log line.

    An unread remainder makes aiohttp close the connection instead of reusing it,
    which is the point: a receiver streaming gigabytes costs us 64 KiB.
    """
    chunks: list[bytes] = []
    size = 0
    while size < BODY_READ_CAP_BYTES:
        chunk = await response.content.read(BODY_READ_CAP_BYTES - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace")
