"""A look inside a running ``python -m bridge``, for benchmarks that find it stuck.

``bench/memory.py --probe FILE`` puts this directory on the process's PYTHONPATH, so Python
imports this module at start. On SIGUSR1 the process appends to FILE the stack of every
asyncio task and the attributes of every live object whose class is named in
BENCH_PROBE_TYPES (comma-separated, such as ``Feed,Subscriber,Hub``): where each waits, and
on what. Not for production: a signal handler walking every object takes a while.

When Python traces allocations (``PYTHONTRACEMALLOC``, which ``memory.py --tracemalloc``
sets), each probe also writes what is allocated now and the lines whose allocations grew
most since the probe before: a leak shows as the same line growing probe after probe.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import time
import tracemalloc
import types
from typing import TextIO

PROBE_FILE = os.environ.get("BENCH_PROBE_FILE")
TYPES = {name for name in os.environ.get("BENCH_PROBE_TYPES", "").split(",") if name}
GROWTH_LINES = 15
_last_snapshot: tracemalloc.Snapshot | None = None


def _dump(_signum: int, _frame: object) -> None:
    assert PROBE_FILE is not None
    loop = asyncio._get_running_loop()  # the handler runs between the loop's own steps
    with open(PROBE_FILE, "a", encoding="utf-8") as out:
        out.write(f"=== probe at {time.strftime('%H:%M:%S')} pid {os.getpid()}\n")
        if tracemalloc.is_tracing():
            _memory(out)
        if loop is None:
            out.write("no running event loop\n")
            return
        tasks = sorted(asyncio.all_tasks(loop), key=lambda task: task.get_name())
        out.write(f"--- {len(tasks)} tasks\n")
        for task in tasks:
            out.write(f"* {task.get_name()} cancelling={task.cancelling()}\n")
            task.print_stack(limit=12, file=out)
        # A task's stack stops at the first async generator it iterates: each one's own
        # place and what it awaits come here.
        out.write("--- suspended async generators (ours)\n")
        for obj in gc.get_objects():
            if isinstance(obj, types.AsyncGeneratorType) and obj.ag_frame is not None:
                code = obj.ag_frame.f_code
                if "/bridge/" in code.co_filename:
                    where = f"{code.co_filename.rpartition('/bridge/')[2]}:{obj.ag_frame.f_lineno}"
                    out.write(f"  {code.co_qualname} at {where} awaiting {_short(obj.ag_await)}\n")
        for obj in gc.get_objects():
            if type(obj).__name__ in TYPES:
                fields = getattr(obj, "__dict__", None)
                if fields is None:
                    slots = getattr(type(obj), "__slots__", ())
                    fields = {name: getattr(obj, name, None) for name in slots}
                out.write(f"--- {type(obj).__name__} {id(obj):#x}\n")
                for name, value in fields.items():
                    out.write(f"    {name} = {_short(value)}\n")


def _memory(out: TextIO) -> None:
    global _last_snapshot
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)]
    )
    current, peak = tracemalloc.get_traced_memory()
    print(f"--- traced now {current / 1024:,.0f} KiB, peak {peak / 1024:,.0f} KiB", file=out)
    if _last_snapshot is not None:
        print("--- grown most since the probe before (by line)", file=out)
        for stat in snapshot.compare_to(_last_snapshot, "lineno")[:GROWTH_LINES]:
            print(f"  {stat}", file=out)
    _last_snapshot = snapshot


def _short(value: object) -> str:
    if isinstance(value, asyncio.Queue):
        return f"Queue({value.qsize()}/{value.maxsize})"
    if isinstance(value, asyncio.Event):
        return f"Event(set={value.is_set()})"
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


if PROBE_FILE:
    signal.signal(signal.SIGUSR1, _dump)
