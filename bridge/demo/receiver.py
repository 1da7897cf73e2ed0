"""A tiny webhook receiver for the demo and the compose stack: one printed line per delivery.

It shows what a real receiver gets (webhook-id, ce-* headers, the routing key they
imply) and, when ``WEBHOOK_SECRET`` is set, whether the Standard Webhooks signature
verifies (checked by the ``standardwebhooks`` reference library, not by our signer).
It is a demonstration, not a production receiver: it keeps nothing.

    python -m bridge.demo.receiver --host 0.0.0.0 --port 8080
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from aiohttp import web
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from bridge.events import CE_TYPE_PREFIX
from bridge.http import serve_app

log = logging.getLogger(__name__)

# Bodies are single Patchwork events; anything much larger is not ours.
MAX_BODY_BYTES = 1024 * 1024

SignatureCheck = Literal["valid", "invalid", "unsigned", "unchecked"]
"""valid/invalid: checked against the secret; unsigned: a secret is set but the
request has no signature; unchecked: no secret was given."""


@dataclass(frozen=True, slots=True)
class Received:
    """One POST as the receiver saw it."""

    path: str
    webhook_id: str
    ce_type: str
    ce_subject: str
    ce_id: str
    signature: SignatureCheck
    body: bytes
    headers: Mapping[str, str]

    @property
    def routing_key(self) -> str:
        """``<project>.<category>``, as on the bus: the subject plus the category in ce-type."""
        category = self.ce_type.removeprefix(CE_TYPE_PREFIX)
        return f"{self.ce_subject}.{category}" if self.ce_subject and category else "?"

    def line(self) -> str:
        return (
            f"received webhook-id={self.webhook_id or '-'} ce-type={self.ce_type or '-'} "
            f"ce-subject={self.ce_subject or '-'} routing-key={self.routing_key} "
            f"path={self.path} bytes={len(self.body)} signature={self.signature}"
        )


OnDelivery = Callable[[Received], Awaitable[None] | None]


class SignatureVerifier:
    """Checks ``webhook-signature`` with the independent ``standardwebhooks`` library."""

    def __init__(self, secret: str | None) -> None:
        self._webhook = Webhook(secret) if secret else None

    def check(self, body: bytes, headers: Mapping[str, str]) -> SignatureCheck:
        if self._webhook is None:
            return "unchecked"
        if "webhook-signature" not in headers:
            return "unsigned"
        try:
            self._webhook.verify(body, dict(headers), json_parse=False)
        # ValueError covers malformed base64, a signature without a comma and non-UTF-8 bodies.
        except (WebhookVerificationError, ValueError):
            return "invalid"
        return "valid"


def _print_line(received: Received) -> None:
    print(received.line(), flush=True)


def build_app(on_delivery: OnDelivery | None = None, secret: str | None = None) -> web.Application:
    """``on_delivery`` gets every POST (default: print one line); bad signatures get a 401."""
    verifier = SignatureVerifier(secret)
    callback: OnDelivery = on_delivery or _print_line

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        received = Received(
            path=request.path,
            webhook_id=headers.get("webhook-id", ""),
            ce_type=headers.get("ce-type", ""),
            ce_subject=headers.get("ce-subject", ""),
            ce_id=headers.get("ce-id", ""),
            signature=verifier.check(body, headers),
            body=body,
            headers=headers,
        )
        result = callback(received)
        if inspect.isawaitable(result):
            await result
        if received.signature in ("invalid", "unsigned"):
            # What a real receiver must do; the bridge then retries and dead-letters it.
            return web.Response(status=401, text="signature does not verify\n")
        return web.Response(status=204)

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/{tail:.*}", receive)
    return app


async def start_receiver(
    host: str,
    port: int,
    on_delivery: OnDelivery | None = None,
    secret: str | None = None,
) -> tuple[web.AppRunner, int]:
    """Serve on host:port (0 picks a free port); returns the runner (the caller cleans it up)
    and the bound port. ``secret`` defaults to the ``WEBHOOK_SECRET`` environment variable."""
    if secret is None:
        secret = os.environ.get("WEBHOOK_SECRET") or None
    return await serve_app(build_app(on_delivery, secret), host, port)


async def _serve(host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner, bound = await start_receiver(host, port)
    secret_note = (
        "verifying signatures, refusing unsigned or bad ones"
        if os.environ.get("WEBHOOK_SECRET")
        else "no WEBHOOK_SECRET: not verifying signatures"
    )
    print(f"webhook receiver listening on {host}:{bound} ({secret_note})", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bridge.demo.receiver",
        description="Print one line per webhook delivery; verify signatures if WEBHOOK_SECRET "
        "is set.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8080, help="port (0: any free port)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    asyncio.run(_serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
