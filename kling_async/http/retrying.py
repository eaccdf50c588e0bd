"""Retrying: one primitive for every retrying loop of the IO shell, and the client-wide budget.

:class:`Retrying` is the retries of one call (delays, attempts, an overall deadline, the
retry budget, the unreachable verdict); :class:`RetryBudget` caps retries as a share of the
traffic, for the whole client.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Literal

import anyio

from kling_async._errors import ThrottledError, TransportError, UnreachableError
from kling_async.http.health import Health
from kling_async.protocol.retry import RetryPolicy

__all__ = ["RetryBudget", "Retrying", "StopReason"]

log = logging.getLogger("kling_async")


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


#: Why a :class:`Retrying` stopped: the policy's attempts were used up, the next wait would
#: pass the deadline, the retry budget had no room in time, or the host counts as unreachable.
StopReason = Literal["attempts", "deadline", "budget", "unreachable"]


def _is_connect_failure(failure: BaseException) -> bool:
    return isinstance(failure, TransportError) and not failure.request_sent


class Retrying:
    """The retries of one call: the one primitive every retrying loop of the shell uses (the
    caller's reads, the create and its look-ups, downloads), in the spirit of hynek/stamina.

    A loop makes an attempt, decides for itself whether the failure is one a retry can fix
    (what a 1303 or a look-up means stays with the loop), and then asks
    ``await retrying.wait(failure)``: True once it is time for the next attempt, False at
    once (without sleeping) when there must be none, :attr:`stopped` saying why. The rules are
    here, once:

    * delays from the :class:`RetryPolicy` (exponential, full jitter, 1302's minimum) and the
      server's ``Retry-After`` when it is longer;
    * at most ``policy.attempts`` attempts;
    * an overall ``deadline`` (monotonic; default: ``policy.timeout`` from now) that no wait
      ever passes: a wait that would end after it is not started (``last_try_at_deadline``
      instead cuts it short, so that one last attempt is made at the deadline: a look-up
      window wants its last look);
    * the client's :class:`RetryBudget`: a retry takes a token, waiting for one while its
      delay runs and at most as long as the rest of its schedule would have waited (never past
      the deadline); throttling (the server asking to wait) and connections that could not be
      made (no server was loaded) are not charged;
    * the :class:`Health` verdict: once the host counts as unreachable, a failure to connect
      is not retried (:attr:`unreachable` holds the error to raise), and a connect failure's
      wait is cut to end when the verdict would fall, so that the loop looks again then.

    Why a class with ``wait`` rather than a decorator or an iterator of attempts: every loop
    here has its own decisions between attempts (adopt a task that a look-up found, fetch a
    fresh URL, re-raise a verdict), and those read best as plain code around one ``await``.
    """

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        budget: RetryBudget | None = None,
        health: Health | None = None,
        deadline: float | None = None,
        rng: random.Random | None = None,
        last_try_at_deadline: bool = False,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        self.policy = policy
        self.budget = budget
        self.health = health
        #: The clock the deadline is on, and the sleep: injectable so that the rules can be
        #: tested without waiting (the budget's own waits stay on the real clock).
        self._clock = clock
        self._sleep = sleep
        self.deadline = clock() + policy.timeout if deadline is None else deadline
        self.rng = rng or random.Random()
        self.last_try_at_deadline = last_try_at_deadline
        #: Failed attempts so far (the next wait is before retry number ``failures``).
        self.failures = 0
        #: Why the last :meth:`wait` returned False (None while retries go on).
        self.stopped: StopReason | None = None
        #: The verdict to end the call with when :attr:`stopped` is ``"unreachable"``.
        self.unreachable: UnreachableError | None = None

    @property
    def remaining(self) -> float:
        """Seconds left until the deadline (0 once it passed)."""
        return max(0.0, self.deadline - self._clock())

    def _stop(self, reason: StopReason) -> bool:
        self.stopped = reason
        return False

    def _schedule_left(self, retry_number: int) -> float:
        """The longest the back-off from retry ``retry_number`` to the last would wait, at most
        until the deadline (``RetryPolicy.remaining``, stopping early at the deadline)."""
        left = self.remaining
        total = 0.0
        policy = self.policy
        for number in range(max(1, retry_number), policy.attempts):
            total += min(policy.maximum, policy.initial * 2 ** min(60, number - 1))
            if total >= left:
                return left
        return total

    async def pay(self, failure: BaseException, *, wait: float) -> bool:
        """Take the retry budget's token for a retry of ``failure``, waiting up to ``wait``
        seconds for one; False if none came. Free for throttling and connect failures."""
        if self.budget is None or isinstance(failure, ThrottledError):
            return True
        if _is_connect_failure(failure):
            return True
        if await self.budget.acquire(wait=wait):
            return True
        log.debug("retry budget spent: not retrying (%s)", type(failure).__name__)
        return False

    async def wait(
        self,
        failure: BaseException,
        *,
        retry_after: float | None = None,
        delay: float | None = None,
        budget_wait: float | None = None,
    ) -> bool:
        """Wait before the next attempt after ``failure``; True when it is due, False (at once)
        when no retry is allowed: see :attr:`stopped`.

        ``retry_after`` defaults to the failure's own ``retry_after`` (a 429's header).
        ``delay`` replaces the policy's delay (0: retry at once, only paying the budget).
        ``budget_wait`` is how long to wait for the budget's token (default: the rest of the
        schedule, within the deadline); one given is the caller's own bound and is honoured as
        is (a create's look-up window says how long to keep looking, not how long one look may
        queue for the budget behind a burst of failures).
        """
        self.failures += 1
        number = self.failures
        if _is_connect_failure(failure) and self.health is not None:
            verdict = self.health.unreachable()
            if verdict is not None:
                self.unreachable = verdict
                return self._stop("unreachable")
        if number >= self.policy.attempts:
            return self._stop("attempts")
        if retry_after is None:
            retry_after = getattr(failure, "retry_after", None)
        if delay is None:
            delay = self.policy.delay(
                number,
                rng=self.rng,
                retry_after=retry_after,
                throttled=isinstance(failure, ThrottledError),
            )
        if _is_connect_failure(failure) and self.health is not None:
            verdict_in = self.health.until_verdict()
            if verdict_in is not None:
                delay = min(delay, verdict_in)
        started = self._clock()
        left = self.deadline - started
        if delay > left:
            if not self.last_try_at_deadline or left <= 0:
                return self._stop("deadline")
            delay = left
        if budget_wait is None:
            budget_wait = min(max(delay, self._schedule_left(number)), max(0.0, left))
        if not await self.pay(failure, wait=budget_wait):
            return self._stop("budget")
        await self._sleep(max(0.0, delay - (self._clock() - started)))
        self.stopped = None
        return True
