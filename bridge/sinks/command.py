"""The command sink: run a local program per event, the event's JSON on its stdin.

For sites where the CI lives on the same host: ``command = ["/usr/local/bin/ci-hook"]``.
The program gets ``PATCHWORK_EVENT_ID``, ``PATCHWORK_ROUTING_KEY`` and
``PATCHWORK_ATTEMPT`` in its environment, which is the bridge's own minus every
``BRIDGE_*`` variable (those hold the bridge's credentials). Its stdout is
discarded; the end of its stderr is quoted in the outcome's detail.

Exit 0 is delivered. Exit 75 (EX_TEMPFAIL, sysexits.h) asks for a retry, and so
does every other non-zero exit: a handler that crashes is usually a bug the
operator will fix, and the retry schedule ends in the dead-letter queue anyway.
A program that cannot be started at all is given up on. A program that runs
past ``timeout`` is killed with its whole process group, and reaped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

from bridge.logs import one_line
from bridge.sinks.base import Delivered, Delivery, GiveUp, Outcome, RetryLater, SinkSpec

EX_TEMPFAIL = 75
STDERR_TAIL_BYTES = 4096
STDERR_GRACE_S = 1.0
"""After the program exits, how long its stderr may stay open (a background child holding it)."""


class CommandSink:
    """Runs ``subscription.command``, at most ``concurrency`` copies at a time."""

    enforces_timeout = False
    """The consumer's deadline bounds a run; ``close`` kills what is still running."""

    def __init__(self, subscription: SinkSpec) -> None:
        if not subscription.command:
            raise ValueError("a command sink needs a command")
        self._argv = list(subscription.command)
        # Only the program is quoted in details: arguments may carry tokens.
        self._program = os.path.basename(self._argv[0])
        self._timeout_s = subscription.timeout
        self._slots = asyncio.Semaphore(subscription.concurrency)
        self._running: set[asyncio.subprocess.Process] = set()

    async def deliver(self, delivery: Delivery) -> Outcome:
        async with self._slots:
            return await self._run(delivery)

    async def _run(self, delivery: Delivery) -> Outcome:
        try:
            process = await asyncio.create_subprocess_exec(
                *self._argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env=_child_env(delivery),
                # Its own process group, so a timeout kills the children it started too.
                start_new_session=True,
            )
        except (FileNotFoundError, PermissionError, NotADirectoryError) as exc:
            return GiveUp("sink_error", f"cannot run {self._argv[0]}: {exc.strerror}")
        except OSError as exc:  # EAGAIN, EMFILE: the host is short of processes or files
            return RetryLater("sink_error", f"cannot start {self._program}: {exc.strerror}")

        self._running.add(process)
        tail = bytearray()
        assert process.stderr is not None and process.stdin is not None
        reader = asyncio.create_task(_keep_tail(process.stderr, tail))
        try:
            async with asyncio.timeout(self._timeout_s):
                await _feed(process.stdin, delivery.body)
                returncode = await process.wait()
            await asyncio.wait({reader}, timeout=STDERR_GRACE_S)
        except TimeoutError:
            return RetryLater("timeout", f"{self._program}: killed after {self._timeout_s}s")
        finally:
            reader.cancel()
            await _kill_and_reap(process)
            self._running.discard(process)
        return self._outcome(returncode, bytes(tail))

    def _outcome(self, returncode: int, stderr_tail: bytes) -> Outcome:
        if returncode == 0:
            return Delivered()
        if returncode < 0:
            said = f"{self._program}: killed by {_signal_name(-returncode)}"
        elif returncode == EX_TEMPFAIL:
            said = f"{self._program}: exit {returncode} (EX_TEMPFAIL)"
        else:
            said = f"{self._program}: exit {returncode}"
        quoted = " ".join(stderr_tail.decode("utf-8", errors="replace").split())
        if quoted:
            said += f": {quoted}"
        return RetryLater("sink_error", one_line(said))

    async def close(self) -> None:
        """Kill programs still running (their deliveries are being cancelled) and reap them."""
        for process in list(self._running):
            await _kill_and_reap(process)


def _child_env(delivery: Delivery) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("BRIDGE_")}
    env["PATCHWORK_EVENT_ID"] = delivery.message_id
    env["PATCHWORK_ROUTING_KEY"] = delivery.routing_key
    env["PATCHWORK_ATTEMPT"] = str(delivery.attempt)
    return env


async def _feed(stdin: asyncio.StreamWriter, body: bytes) -> None:
    """Write the event and close stdin; a program that exits without reading it is fine."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        stdin.write(body)
        await stdin.drain()
        stdin.close()
        await stdin.wait_closed()


async def _keep_tail(stream: asyncio.StreamReader, tail: bytearray) -> None:
    """Read to the end, keeping the last STDERR_TAIL_BYTES, so the program never blocks on it."""
    while chunk := await stream.read(65536):
        tail += chunk
        del tail[:-STDERR_TAIL_BYTES]


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


async def _kill_and_reap(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
