"""The operator's HTTP endpoints of every role: /metrics, /healthz, /readyz."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from bridge.metrics import Metrics


class PortInUse(Exception):
    """A port of ours cannot be bound (most often: another bridge process has it)."""


# Returns (ready, reason); reason says what is missing when not ready.
ReadinessCheck = Callable[[], tuple[bool, str]]


def build_app(
    metrics: Metrics,
    checks: list[ReadinessCheck],
    where: Sequence[tuple[str, Callable[[], str | None]]] = (),
) -> web.Application:
    """``where``: each role's name and the RabbitMQ node it is on, said by /readyz."""

    async def metrics_handler(_: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        # Alive means the event loop answers; readiness says whether work gets done.
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        answers = [check() for check in checks]
        failing = [reason for ok, reason in answers if not ok]
        # What a ready role still says: a subscription's receiver is down, say.
        notes = "".join(f"{reason}\n" for ok, reason in answers if ok and reason)
        nodes = "".join(f"{name}: on RabbitMQ node {node()}\n" for name, node in where if node())
        if failing:
            text = "not ready: " + "; ".join(failing) + "\n" + notes + nodes
            return web.Response(status=503, text=text)
        return web.Response(text="ready\n" + notes + nodes)

    app = web.Application()
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def start_server(
    metrics: Metrics,
    checks: list[ReadinessCheck],
    host: str,
    port: int,
    *,
    where: Sequence[tuple[str, Callable[[], str | None]]] = (),
) -> tuple[web.AppRunner, int]:
    """Start serving; returns the runner (the caller cleans it up) and the bound port."""
    return await serve_app(build_app(metrics, checks, where), host, port)


async def serve_app(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on host:port (0 picks a free port); returns the runner, which the
    caller cleans up, and the port actually bound."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner, runner.addresses[0][1]
