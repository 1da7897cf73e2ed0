"""The plain baselines: what a user would write by hand for one job and nothing more
(no cursor, no window, no event log, no metrics), the floor each figure is set against."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

import aio_pika
import aiohttp
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage, AbstractQueue
from common import AMQP_URL, SECRET, TZ
from receiver import Receiver

from bridge.events import USER_AGENT
from bridge.signing import decode_secret, sign_with_key

POST_TIMEOUT_S = 15.0
SECRET_KEY = decode_secret(SECRET)
ZONE = ZoneInfo(TZ)

HeadersOf = Callable[[AbstractIncomingMessage], dict[str, str]]


def bare_headers(message: AbstractIncomingMessage) -> dict[str, str]:
    return {"Content-Type": "application/json", "webhook-id": message.message_id or ""}


def contract_headers(message: AbstractIncomingMessage) -> dict[str, str]:
    """What docs/webhooks.md makes every POST carry: Standard Webhooks (signed) and ce-* headers."""
    timestamp_s = int(time.time())
    message_id = message.message_id or ""
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp_s),
        "webhook-signature": sign_with_key(SECRET_KEY, message_id, timestamp_s, message.body),
    }
    for name, value in (message.headers or {}).items():
        if name.startswith("ce-"):
            headers[name] = str(value)
    return headers


def page_message(item: dict, body: bytes, base_url: str, contract: bool) -> aio_pika.Message:
    """One event of a page as a message: its id and body, or with ``contract`` also the
    properties and ce-*/x-patchwork-* headers docs/bus.md requires (what pamqp spends
    encoding them is the contract's cost, not the producer's)."""
    if not contract:
        return aio_pika.Message(
            body,
            message_id=str(item["id"]),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
    link_name, category = item["project"]["link_name"], item["category"]
    return aio_pika.Message(
        body,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=str(item["id"]),
        type=category,
        timestamp=datetime.now(ZONE),
        app_id="patchwork-bridge",
        headers={
            "ce-specversion": "1.0",
            "ce-id": str(item["id"]),
            "ce-source": f"{base_url}/api/1.3",
            "ce-type": f"org.patchwork.{category}",
            "ce-subject": link_name,
            "ce-time": datetime.fromisoformat(item["date"]).replace(tzinfo=ZONE).isoformat(),
            "x-patchwork-project": link_name,
            "x-patchwork-category": category,
        },
    )


async def publish_pages(
    http: aiohttp.ClientSession, base_url: str, exchange: AbstractExchange, contract: bool
) -> int:
    """GET every page (``order=date``, 250 a page, following ``rel="next"``) and publish
    each page with confirms before reading the next: the events published."""
    published = 0
    url: str | None = f"{base_url}/api/1.3/events/"
    params: dict[str, str] | None = {"order": "date", "per_page": "250"}
    while url is not None:
        async with http.get(url, params=params) as response:
            text = await response.text()
            link = response.links.get("next")
        url, params = (str(link["url"]) if link else None), None
        items = json.loads(text)
        await asyncio.gather(
            *(
                exchange.publish(
                    page_message(item, json.dumps(item).encode(), base_url, contract),
                    routing_key=f"{item['project']['link_name']}.{item['category']}",
                )
                for item in items
            )
        )
        published += len(items)
    return published


@asynccontextmanager
async def http_session(limit: int) -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(limit=limit)
    timeout = aiohttp.ClientTimeout(total=POST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        yield session


async def post_each(
    queue: AbstractQueue, http: aiohttp.ClientSession, url: str, headers_of: HeadersOf
) -> str:
    """Consume ``queue``: one POST per message, ack on 2xx, else requeue. The consumer tag.

    aiormq runs each delivery in its own task: the channel's prefetch bounds concurrency.
    """

    async def deliver(message: AbstractIncomingMessage) -> None:
        async with http.post(url, data=message.body, headers=headers_of(message)) as response:
            await response.read()
        if 200 <= response.status < 300:
            await message.ack()
        else:
            await message.nack(requeue=True)

    return await queue.consume(deliver)


@dataclass(frozen=True, slots=True)
class Drained:
    rate: float
    """Deliveries/s at the receiver, first delivery to last."""
    cpu_ms: float
    """CPU time of this process per delivery."""


async def drain(
    queue_name: str,
    receiver: Receiver,
    segment: str,
    n: int,
    prefetch: int,
    headers_of: HeadersOf = bare_headers,
    timeout_s: float = 600.0,
) -> Drained:
    """Drain ``n`` messages of an existing queue into ``receiver``'s ``segment``."""
    cpu_started = time.process_time()
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.get_queue(queue_name)
        async with http_session(prefetch) as http:
            tag = await post_each(queue, http, receiver.url(segment), headers_of)
            stats = await receiver.wait_for(segment, n, timeout_s)
            cpu_s = time.process_time() - cpu_started
            await queue.cancel(tag)
    finally:
        await connection.close()
    return Drained(stats.rate(), 1000 * cpu_s / n)
