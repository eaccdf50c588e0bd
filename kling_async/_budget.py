"""The client's budgets: one for requests (polls and submits share it), one for retries.

:class:`RequestBudget` is a token bucket (``rate`` requests per second, bursts up to
``burst``) in the spirit of aiometer's ``max_per_second``; plus a global pause, which a 1302
("too fast") answer sets so that every coroutine of the client backs off together instead of
each retrying on its own. :class:`RetryBudget` caps retries as a share of the traffic.
"""

from __future__ import annotations

import math
import time

import anyio

from ._retry import RetryPolicy

__all__ = ["RequestBudget", "RetryBudget"]


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


class RetryBudget:
    """Retries as a share of the traffic, for the whole client (Envoy's retry budget,
    botocore's retry quota, Finagle's RetryBudget).

    Per-request attempt limits multiply an outage: with six attempts each, every request
    becomes six against a server that is already failing. Here each first attempt deposits
    ``ratio`` of a token and each good answer a whole one (botocore's refund), the balance
    capped at ``reserve``; each retry takes a whole one, waiting for it a while if there is
    none. While every request fails (an outage: no good answers), retries stay within
    ``reserve + ratio x requests offered``: attempts within 1.2x the requests plus 3 with the
    defaults. While most answers are good, refunds keep retries flowing, so a burst of
    failures (ten creates whose replies were dropped at once) waits a round trip for its
    lookups instead of failing. First attempts are never held back, so traffic is back as
    soon as the server is.
    """

    def __init__(self, *, ratio: float = 0.2, reserve: float = 3.0) -> None:
        self.ratio = ratio
        self.reserve = reserve
        self._balance = reserve
        self._waiting = 0
        self._changed = anyio.Event()
        #: Retries that waited in vain and were not made.
        self.refused = 0

    @classmethod
    def of(cls, policy: RetryPolicy) -> RetryBudget | None:
        """The budget ``policy`` asks for (None when its ``budget_ratio`` is None)."""
        if policy.budget_ratio is None:
            return None
        return cls(ratio=policy.budget_ratio, reserve=policy.budget_reserve)

    @property
    def balance(self) -> float:
        return self._balance

    def _deposit(self, amount: float) -> None:
        self._balance = min(self.reserve, self._balance + amount)
        if self._waiting and self._balance >= 1.0:
            self._changed.set()
            self._changed = anyio.Event()

    def offered(self) -> None:
        """A first attempt is about to go out."""
        self._deposit(self.ratio)

    def answered(self) -> None:
        """A good answer arrived (the server is working): refund one token."""
        self._deposit(1.0)

    async def acquire(self, *, wait: float) -> bool:
        """Take the token a retry costs, waiting up to ``wait`` seconds for one; False (and
        counted in ``refused``) if none came."""
        deadline = time.monotonic() + max(0.0, wait)
        while self._balance < 1.0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.refused += 1
                return False
            self._waiting += 1
            try:
                with anyio.move_on_after(remaining):
                    await self._changed.wait()
            finally:
                self._waiting -= 1
        self._balance -= 1.0
        return True
