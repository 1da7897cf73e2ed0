"""A lane's rate limit: its attempts spaced so that a receiver gets at most ``rate`` a second.

Several webhook processes share a subscription's queue without talking to each other:
each takes its part, ``rate`` divided by the consumers RabbitMQ reports on the main
queue (looked at every marker check, a few seconds). That holds while every consumer
of the queue is a webhook process of this deployment with the same ``rate``; for the
few seconds after a process joins or leaves, the receiver may get up to twice (or half)
its rate.
"""

from __future__ import annotations

import asyncio


class Pace:
    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.share = 1
        """Consumers of the lane's queue, this process's among them."""
        self._last = float("-inf")
        self._lock = asyncio.Lock()

    async def turn(self) -> None:
        """Wait until ``share / rate`` seconds after the last attempt began. One at a time,
        and measured from when the last one really went: after a stall of the event loop
        the attempts resume spaced, they do not catch up in a burst."""
        loop = asyncio.get_running_loop()
        async with self._lock:
            wait_s = self._last + self.share / self.rate - loop.time()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            self._last = loop.time()
