"""What every benchmark sets up: its constants, the bridge to run (in this process or as
`python -m bridge`), backlogs of events, and subscriptions files."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import socket
import sys
import tempfile
import uuid
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from bridge.demo.patchwork_double import CATEGORIES, FakePatchwork
from bridge.events import Event, parse_event
from bridge.metrics import Metrics
from bridge.runtime import InProcess, build_roles
from bridge.settings import Settings
from tests.broker import AMQP_URL  # TEST_AMQP_URL, as for the tests
from tests.patchwork_cost import MEASURED, ServingCost

TZ = "Australia/Canberra"
# The ce-source of pre-loaded messages; any Patchwork API base URL will do.
SOURCE = "http://127.0.0.1:8000/api/1.3"
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
CONTROL_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 30.0
PRELOAD_CHUNK = 1000

# -- events, subscriptions, topology ----------------------------------------------------


def add_cost_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cost",
        choices=["measured", "none"],
        default="measured",
        help="the double's serving cost: as measured on a real Patchwork, or none",
    )


def serving_cost(args: argparse.Namespace) -> ServingCost | None:
    """What ``--cost`` asks the Patchwork double to charge each request."""
    return MEASURED if args.cost == "measured" else None


def fill_backlog(fake: FakePatchwork, n: int, days: float = 3.0) -> None:
    """``n`` events of every category spread over the last ``days``, as a producer
    restarting after an outage sees them (so the dedup window stays small)."""
    categories = itertools.cycle(CATEGORIES)
    first = datetime.now() - timedelta(days=days)
    step = timedelta(days=days) / n
    for i in range(n):
        fake.add_event(next(categories), date=first + i * step)


def backlog_events(n: int) -> list[Event]:
    """``n`` bus events exactly as the producer would read them from Patchwork."""
    fake = FakePatchwork(tz=TZ)
    fill_backlog(fake, n)
    events = []
    for event_id in range(1, n + 1):
        raw = fake.item_bytes(event_id).decode()
        events.append(parse_event(json.loads(raw), raw))
    return events


@dataclass(frozen=True)
class Hook:
    """One ``[[webhook]]`` of a subscriptions file written for a benchmark."""

    name: str
    url: str
    concurrency: int = 16
    timeout: float = 15.0
    secret: str | None = SECRET
    rate: float | None = None
    extra: tuple[str, ...] = ()
    """More ``key = value`` lines, as written."""

    def toml(self) -> str:
        lines = [
            "[[webhook]]",
            f'name = "{self.name}"',
            f'url = "{self.url}"',
            f"concurrency = {self.concurrency}",
            f"timeout = {self.timeout}",
            "allow_private_network = true",
        ]
        if self.secret is not None:
            lines.append(f'secret = "{self.secret}"')
        if self.rate is not None:
            lines.append(f"rate = {self.rate}")
        lines.extend(self.extra)
        return "\n".join(lines) + "\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_id() -> str:
    return uuid.uuid4().hex[:8]


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="patchwork-bridge-bench-") as tmp:
        yield Path(tmp)


def write_subscriptions(path: Path, hooks: Sequence[Hook]) -> Path:
    path.write_text("\n".join(hook.toml() for hook in hooks), encoding="utf-8")
    return path


# -- the bridge, in this process or as `python -m bridge run` ---------------------------


def bridge_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "amqp_url": AMQP_URL,
        "patchwork_timezone": TZ,
        "log_level": "WARNING",
    }
    values.update(overrides)
    return Settings(**values)


class InProcessBridge(InProcess):
    """``run``'s roles (producer + webhook) as ``patchwork-bridge demo`` wires them, or the
    roles of another ``command``; a role's failure at the end is printed, so one bad run
    does not hide the figures of the others."""

    def __init__(self, settings: Settings, command: str = "run") -> None:
        self.metrics = Metrics()
        super().__init__(
            build_roles(command, settings, self.metrics), stop_timeout_s=STOP_TIMEOUT_S
        )

    def request_stop(self) -> None:
        self.stop.set()

    async def close(self) -> None:
        try:
            await super().close()
        except TimeoutError:
            print(f"  roles did not stop within {STOP_TIMEOUT_S:g}s", file=sys.stderr)
        except Exception as exc:
            print(f"  a role failed: {exc!r}", file=sys.stderr)


def bridge_env(**settings: str) -> dict[str, str]:
    """The environment of a ``python -m bridge`` process: ours minus any BRIDGE_* plus these."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("BRIDGE_")}
    env.update({f"BRIDGE_{k.upper()}": v for k, v in settings.items()})
    return env


def add_loop_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--loop",
        choices=["asyncio", "uvloop"],
        default="asyncio",
        help="the event loop of this process, so of every side measured in it (uvloop: "
        "pip install uvloop)",
    )


def run_on(loop: str, main: Callable[[], Coroutine[Any, Any, Any]]) -> None:
    """``main()`` on the event loop ``--loop`` names."""
    factory = None
    if loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())
