"""One request budget for the whole client: polls and submits share it.

A token bucket (``rate`` requests per second, bursts up to ``burst``) in the spirit of
aiometer's ``max_per_second``; plus a global pause, which a 1302 ("too fast") answer sets so
that every coroutine of the client backs off together instead of each retrying on its own.
"""

from __future__ import annotations

import math
import time

import anyio

__all__ = ["RequestBudget"]


class RequestBudget:
    """``await budget.acquire()`` before each request; waits as long as the budget requires.

    Reservations are handed out in call order: each caller books the next free instant and
    sleeps until it, so waiters never race and the rate holds exactly over any window.
    """

    def __init__(self, rate: float | None, *, burst: int | None = None) -> None:
        if rate is not None and not (isinstance(rate, int | float) and rate > 0):
            raise ValueError(f"max_requests_per_second={rate!r} is invalid: must be > 0 or None")
        self.rate = rate
        self.burst = max(1, burst if burst is not None else math.ceil(rate or 1))
        self._next = 0.0  # the earliest instant the next request may start
        self._paused_until = 0.0
        self.requests = 0

    def pause(self, seconds: float) -> None:
        """Hold every request for ``seconds`` from now (extends, never shortens, a pause)."""
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    async def acquire(self) -> None:
        # A pause may be extended while we sleep, so look again after each one.
        while (paused := self._paused_until - time.monotonic()) > 0:  # noqa: ASYNC110
            await anyio.sleep(paused)
        self.requests += 1
        if self.rate is None:
            return
        now = time.monotonic()
        interval = 1.0 / self.rate
        # A bucket of `burst` tokens: an idle budget may start up to `burst` requests at once.
        slot = max(self._next, now - (self.burst - 1) * interval)
        self._next = slot + interval
        if slot > now:
            await anyio.sleep(slot - now)
