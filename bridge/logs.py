"""Logging set-up: one line per event of note, as text or as JSON (BRIDGE_LOG_FORMAT=json)."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from aiormq.exceptions import ChannelInvalidStateError, ConnectionClosed

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
DETAIL_MAX_CHARS = 300
"""How long a detail (an error, a receiver's answer) may be in a log line or a header."""


def one_line(text: str, limit: int = DETAIL_MAX_CHARS) -> str:
    """``text`` as one line of at most ``limit`` characters, fit for a log line or a header."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ``extra={...}`` fields become keys."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def setup_logging(log_format: str = "text", level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    quiet_libraries()


def quiet_libraries() -> None:
    """aio-pika and aiormq log every reconnect at length; bridge.broker.connect's own lines say
    enough (one when a connection is lost, naming the reason, one when it is back)."""
    root = logging.getLogger()
    for noisy in ("aio_pika", "aiormq", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    for name in ("aiormq.connection", "aio_pika.tools"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, ReconnectNoise) for f in logger.filters):
            logger.addFilter(ReconnectNoise())


class ReconnectNoise(logging.Filter):
    """The records of a robust connection reconnecting as designed, which are not errors.

    A cut connection gives an ERROR from aiormq naming the broker's reason, a traceback
    of the reader that saw the socket close, and one ERROR per channel that aio-pika
    could not reopen while the connection was still down (it reopens them once it
    reconnects). Records that match nothing here pass untouched.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.msg if isinstance(record.msg, str) else ""
        if message.startswith("error when creating transport"):
            return False  # a reconnect attempt failed: bridge.broker.connect says when it is back
        if message.startswith("Unexpected connection close from remote"):
            return False  # bridge.broker.connect's line names the broker's reason too
        if message.startswith("Cancelling cause reader exited abnormally"):
            return not _connection_lost(record.exc_info[1] if record.exc_info else None)
        if message.startswith("Callback %r error") and len(record.args or ()) == 3:
            one_shot, _, exc = record.args  # type: ignore[misc]
            # Not repr(one_shot): it raises once the callback has run and been dropped.
            name = getattr(getattr(one_shot, "callback", None), "__qualname__", "")
            return not (name == "RobustChannel._on_close" and _connection_lost(exc))
        return True


def _connection_lost(exc: object) -> bool:
    if isinstance(exc, RuntimeError) and str(exc).endswith("closed"):
        return True  # aiormq: "<Connection: ...> closed"
    return isinstance(exc, ConnectionClosed | ChannelInvalidStateError | ConnectionError)
