"""The producer's durable cursor: where polling resumes, and which recent ids are already out.

Written atomically (temp file, fsync, rename) so a crash leaves either the old
or the new cursor, never half of one.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
"""2 adds the newest id and the open id gaps; a version 1 file is read as having none."""


class CursorError(Exception):
    """The cursor file exists but cannot be read; we refuse to guess where to resume."""


class StateDirError(Exception):
    """BRIDGE_STATE_DIR cannot be used: not writable, or another producer holds it."""


@dataclass(frozen=True, slots=True)
class Gap:
    """An id not seen yet while ids around it are: an event whose writer has not committed."""

    below: str
    """``date`` of the seen event just below the missing id (verbatim)."""
    above: str
    """``date`` of the seen event just above it."""
    opened_at: float
    """When it was first noticed, in seconds since the epoch (wall time: survives restarts)."""


@dataclass
class Cursor:
    high_water: str | None = None
    """Newest ``date`` (verbatim, naive server-local) of the confirmed events."""
    floor: str | None = None
    """Never ask for events before this date (BRIDGE_START=<date>)."""
    seen: dict[int, str] = field(default_factory=dict)
    """Confirmed event ids inside the overlap window, with their dates."""
    max_id: int | None = None
    """The newest id confirmed; ids missing below it are gaps."""
    gaps: dict[int, Gap] = field(default_factory=dict)
    """Open gaps by missing id."""

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": FORMAT_VERSION,
                "high_water": self.high_water,
                "floor": self.floor,
                "seen": [[event_id, date] for event_id, date in self.seen.items()],
                "max_id": self.max_id,
                "gaps": [[i, g.below, g.above, g.opened_at] for i, g in self.gaps.items()],
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> Cursor:
        data = json.loads(text)
        if data.get("version") not in (1, FORMAT_VERSION):
            raise CursorError(f"unknown cursor format {data.get('version')!r}")
        for key in ("high_water", "floor"):
            if data[key] is not None:
                datetime.fromisoformat(data[key])
        seen = {int(i): str(d) for i, d in data["seen"]}
        gaps = {}
        for event_id, below, above, opened_at in data.get("gaps", []):
            datetime.fromisoformat(below)
            datetime.fromisoformat(above)
            gaps[int(event_id)] = Gap(str(below), str(above), float(opened_at))
        max_id = data.get("max_id")
        if max_id is not None and (not isinstance(max_id, int) or isinstance(max_id, bool)):
            raise ValueError(f"max_id {max_id!r} is not an id")
        return cls(data["high_water"], data["floor"], seen, max_id, gaps)


class CursorStore:
    """One JSON file in BRIDGE_STATE_DIR; blocking file I/O runs in a thread."""

    def __init__(self, state_dir: Path, name: str = "cursor.json") -> None:
        self.path = state_dir / name
        self._lock_fd: int | None = None

    async def lock(self) -> None:
        """Hold the directory for this process: two producers on one cursor would both
        publish everything. The lock goes with the process, however it ends."""
        await asyncio.to_thread(self._lock)

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def _lock(self) -> None:
        directory = self.path.parent
        lock_path = directory / ".lock"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _cannot_write(directory, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StateDirError(
                f"BRIDGE_STATE_DIR {directory}: in use by another producer (pid {holder}); "
                "give each producer a state directory of its own"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    async def load(self) -> Cursor | None:
        return await asyncio.to_thread(self.load_now)

    async def save(self, cursor: Cursor) -> None:
        # Serialise on the loop: the cursor may change while the thread writes.
        await asyncio.to_thread(self._write, cursor.to_json())

    def load_now(self) -> Cursor | None:
        """``load`` for a caller outside the event loop (check-config)."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            return Cursor.from_json(text)
        except (ValueError, KeyError, TypeError) as exc:
            raise CursorError(
                f"{self.path}: unreadable cursor ({exc}); move it away to restart"
            ) from None

    def _write(self, text: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".cursor-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def probe_writable(directory: Path) -> None:
    """StateDirError unless a file can be created in ``directory`` (made if missing)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise _cannot_write(directory, exc) from None


def _cannot_write(directory: Path, exc: OSError) -> StateDirError:
    return StateDirError(f"BRIDGE_STATE_DIR {directory}: cannot write there ({exc.strerror})")


class CursorWriter:
    """Saves the latest cursor in the background, one write at a time, coalescing requests.

    A save (fsync and rename) costs milliseconds; waiting for it after every page
    would stall publishing. A crash loses at most the pages confirmed since the
    last write finished: they are published again, never skipped.

    A write that fails (disk full, directory made read-only) does not stop the
    producer: the cursor stays dirty, ``failure`` says why, and the next request or
    flush writes again. The file on disk only ever lags, so a restart republishes.
    """

    def __init__(
        self,
        store: CursorStore,
        snapshot: Callable[[], Cursor],
        on_failure: Callable[[OSError], None] | None = None,
    ) -> None:
        self._store = store
        self._snapshot = snapshot
        self._on_failure = on_failure
        self._dirty = False
        self._task: asyncio.Task[None] | None = None
        self.failure: str | None = None
        """Why the last write failed; None once a write succeeds."""

    def request(self) -> None:
        self._dirty = True
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._write_while_dirty(), name="cursor-writer")

    async def flush(self) -> bool:
        """Write everything requested so far; whether it is on disk now."""
        if self._task is not None:
            await asyncio.shield(self._task)
        if self._dirty:
            await self._write_while_dirty()
        return not self._dirty

    async def _write_while_dirty(self) -> None:
        while self._dirty:
            self._dirty = False
            try:
                await self._store.save(self._snapshot())
            except OSError as exc:
                self._dirty = True  # the next request or flush tries again
                failure = f"{self._store.path}: {exc.strerror or exc}"
                if failure != self.failure:  # one line per kind of failure, not per poll
                    log.warning(
                        "cannot save the cursor (%s); still publishing, writing it again "
                        "every poll; a restart before it succeeds republishes, never skips",
                        failure,
                    )
                self.failure = failure
                if self._on_failure is not None:
                    self._on_failure(exc)
                return
            if self.failure is not None:
                log.info("cursor saved again in %s", self._store.path)
            self.failure = None
