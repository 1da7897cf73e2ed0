"""A look inside a running ``python -m bridge``, for benchmarks that find it stuck.

``bench/memory.py --probe FILE`` puts this directory on the process's PYTHONPATH, so Python
imports this module at start. On SIGUSR1 the process appends to FILE the stack of every
asyncio task and the attributes of every live object whose class is named in
BENCH_PROBE_TYPES (comma-separated, such as ``Feed,Subscriber,Hub``): where each waits, and
on what. Not for production: a signal handler walking every object takes a while.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import time
import types

PROBE_FILE = os.environ.get("BENCH_PROBE_FILE")
TYPES = {name for name in os.environ.get("BENCH_PROBE_TYPES", "").split(",") if name}


def _dump(_signum: int, _frame: object) -> None:
    assert PROBE_FILE is not None
    loop = asyncio._get_running_loop()  # the handler runs between the loop's own steps
    with open(PROBE_FILE, "a", encoding="utf-8") as out:
        out.write(f"=== probe at {time.strftime('%H:%M:%S')} pid {os.getpid()}\n")
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


def _short(value: object) -> str:
    if isinstance(value, asyncio.Queue):
        return f"Queue({value.qsize()}/{value.maxsize})"
    if isinstance(value, asyncio.Event):
        return f"Event(set={value.is_set()})"
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


if PROBE_FILE:
    signal.signal(signal.SIGUSR1, _dump)
