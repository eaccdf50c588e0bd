"""Retrying: the client-wide retry budget that every retrying loop draws on.

:class:`RetryBudget` caps retries as a share of the traffic, for the whole client.
"""

from __future__ import annotations

import time

import anyio

from kling_async.protocol.retry import RetryPolicy

__all__ = ["RetryBudget"]


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
