"""Where a measured process spends its time and memory: py-spy samples and /proc figures."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path


def proc_status_kib(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS) and friends of a live process, in KiB, from /proc."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key.startswith("Vm") and rest.strip().endswith("kB"):
            values[key] = int(rest.split()[0])
    return values


# -- profiling ---------------------------------------------------------------------------


PY_SPY_RATE_HZ = 250


@contextlib.asynccontextmanager
async def py_spy(path: Path | None, rate_hz: int = PY_SPY_RATE_HZ) -> AsyncIterator[None]:
    """Sample this process with py-spy (on-CPU only) while the block runs; raw stacks to ``path``.

    py-spy attaches by pid, so only the block is profiled, not building or pre-loading
    the backlog. ``path=None`` does nothing.
    """
    if path is None:
        yield
        return
    process = await asyncio.create_subprocess_exec(
        "py-spy",
        "record",
        "--pid",
        str(os.getpid()),
        "--rate",
        str(rate_hz),
        "--format",
        "raw",
        "--output",
        str(path),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    await asyncio.sleep(0.5)  # attached before the work starts
    try:
        yield
    finally:
        process.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            await asyncio.wait_for(process.wait(), 30.0)
        except TimeoutError:
            process.kill()
            await process.wait()


def py_spy_summary(
    path: Path, deliveries: int, top: int = 40, rate_hz: int = PY_SPY_RATE_HZ
) -> str:
    """Total (inclusive) and self share of the main thread's samples per function, also
    as CPU microseconds per delivery (samples / rate / deliveries).

    Other threads (asyncio's child watcher, the default executor) only wait, but py-spy
    does not always see a thread blocked in ``waitpid`` as idle, so they are left out.
    """
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = other_threads = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        samples = int(count)
        frames = [_frame_name(f) for f in stack.split(";")]
        if not frames[0].startswith("<module>"):
            other_threads += samples
            continue
        total += samples
        for name in set(frames):
            inclusive[name] += samples
        own[frames[-1]] += samples
    per_us = 1e6 / rate_hz / max(deliveries, 1)
    lines = [
        f"{path.name}: {total} on-CPU samples of the event-loop thread at {rate_hz} Hz "
        f"({other_threads} of other threads left out), {total * per_us:.0f} us per delivery",
        "   total   self  total us/delivery  function",
    ]
    for name, samples in inclusive.most_common(top):
        share, self_share = 100 * samples / total, 100 * own[name] / total
        lines.append(f"  {share:5.1f}% {self_share:5.1f}%  {samples * per_us:7.1f}  {name}")
    lines.append("  top self time:   self  self us/delivery")
    for name, samples in own.most_common(top // 2):
        lines.append(f"  {'':6s} {100 * samples / total:5.1f}%  {samples * per_us:7.1f}  {name}")
    return "\n".join(lines)


def _frame_name(frame: str) -> str:
    """``func (path/to/file.py:12)`` -> ``func (file.py)``: one entry per function."""
    func, _, where = frame.partition(" (")
    return f"{func} ({where.rsplit('/', 1)[-1].split(':', 1)[0]})" if where else func
