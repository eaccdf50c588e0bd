"""The shell's one retry primitive, ``http.retrying.Retrying``, on its own.

Its clock and sleep are injected (a fake clock that a sleep advances), so the rules are checked
exactly and without waiting: no wait passes the deadline, the attempts are bounded, a longer
Retry-After wins, a refused budget stops the retries, and so does the unreachable verdict.
The loops that use it (reads, creates and their look-ups, downloads) are covered end to end by
test_retry_budget, test_exactly_once, test_unreachable_host and test_download_safety.
"""

from __future__ import annotations

import random

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kling_async as ka
from kling_async.http.health import Health
from kling_async.http.retrying import RetryBudget, Retrying

SENT = ka.TransportError("dropped", request_sent=True, host="h")
NOT_SENT = ka.TransportError("refused", request_sent=False, host="h", reason="connection refused")


class FakeClock:
    """Monotonic seconds that only sleeping moves; records every sleep."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds
        await anyio.lowlevel.checkpoint()


def retrying_for(
    policy: ka.RetryPolicy, clock: FakeClock, *, span: float | None = None, **kwargs: object
) -> Retrying:
    deadline = None if span is None else clock.now + span
    return Retrying(
        policy,
        deadline=deadline,
        clock=clock,
        sleep=clock.sleep,
        rng=random.Random(1),
        **kwargs,  # type: ignore[arg-type]
    )


def throttled(retry_after: float | None) -> ka.RateLimitError:
    error = ka.RateLimitError("too fast", code=1302, http_status=429)
    error.retry_after = retry_after
    return error


def run(coroutine_function: object) -> None:
    anyio.run(coroutine_function, backend="asyncio")  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(
    attempts=st.integers(1, 30),
    initial=st.floats(0.001, 5.0),
    maximum=st.floats(0.001, 60.0),
    span=st.floats(0.0, 120.0),
    retry_afters=st.lists(st.none() | st.floats(0.0, 90.0), min_size=1, max_size=30),
    last_try=st.booleans(),
)
def test_no_wait_passes_the_deadline_and_attempts_are_bounded(
    attempts: int,
    initial: float,
    maximum: float,
    span: float,
    retry_afters: list[float | None],
    last_try: bool,
) -> None:
    policy = ka.RetryPolicy(attempts=attempts, timeout=600.0, initial=initial, maximum=maximum)

    async def main() -> None:
        clock = FakeClock()
        retrying = retrying_for(policy, clock, span=span, last_try_at_deadline=last_try)
        deadline = retrying.deadline
        tries = 1
        for index in range(100):
            retry_after = retry_afters[index % len(retry_afters)]
            if not await retrying.wait(throttled(retry_after)):
                break
            tries += 1
            assert clock.now <= deadline
            if retry_after is not None and not last_try:
                assert clock.sleeps[-1] >= retry_after  # a longer Retry-After wins
        else:
            pytest.fail("the retries never stopped")
        assert tries <= attempts
        assert retrying.stopped in ("attempts", "deadline")
        if retrying.stopped == "attempts":
            assert tries == attempts

    run(main)


def test_a_wait_that_would_pass_the_deadline_is_not_started() -> None:
    async def main() -> None:
        clock = FakeClock()
        policy = ka.RetryPolicy(attempts=10, initial=1.0, maximum=1.0)
        retrying = retrying_for(policy, clock, span=10.0)
        assert not await retrying.wait(throttled(30.0))  # Retry-After beyond the deadline
        assert retrying.stopped == "deadline"
        assert clock.sleeps == []

    run(main)


def test_last_try_at_deadline_cuts_the_wait_to_end_at_it() -> None:
    async def main() -> None:
        clock = FakeClock()
        policy = ka.RetryPolicy(attempts=10, initial=1.0, maximum=1.0)
        retrying = retrying_for(policy, clock, span=10.0, last_try_at_deadline=True)
        assert await retrying.wait(throttled(30.0))
        assert clock.now == retrying.deadline  # one last attempt, at the deadline
        assert not await retrying.wait(throttled(None))
        assert retrying.stopped == "deadline"

    run(main)


def test_retry_after_is_honoured_over_a_shorter_delay() -> None:
    async def main() -> None:
        clock = FakeClock()
        policy = ka.RetryPolicy(attempts=5, initial=0.01, maximum=0.02, throttle_minimum=0.0)
        retrying = retrying_for(policy, clock)
        assert await retrying.wait(throttled(7.5))
        assert await retrying.wait(SENT, retry_after=3.0)
        assert await retrying.wait(SENT)
        assert clock.sleeps[0] == 7.5
        assert clock.sleeps[1] == 3.0
        assert clock.sleeps[2] <= 0.02

    run(main)


def test_a_refused_budget_stops_the_retries_and_throttling_is_free() -> None:
    async def main() -> None:
        clock = FakeClock()
        policy = ka.RetryPolicy(attempts=10, initial=0.001, maximum=0.001, throttle_minimum=0.0)
        budget = RetryBudget(ratio=0.0, reserve=1.0)
        retrying = retrying_for(policy, clock, budget=budget)
        assert await retrying.wait(SENT)  # the reserve's one token
        assert budget.balance == 0.0
        assert await retrying.wait(throttled(None))  # the server asked to wait: not charged
        assert await retrying.wait(NOT_SENT)  # no server was loaded: not charged
        with anyio.fail_after(5):
            assert not await retrying.wait(SENT, budget_wait=0.0)
        assert retrying.stopped == "budget"
        assert budget.refused == 1

    run(main)


def test_a_budget_refund_lets_a_waiting_retry_through() -> None:
    async def main() -> None:
        clock = FakeClock()
        policy = ka.RetryPolicy(attempts=10, initial=0.001, maximum=0.001)
        budget = RetryBudget(ratio=0.0, reserve=1.0)
        budget._balance = 0.0
        retrying = retrying_for(policy, clock, budget=budget)
        results: list[bool] = []

        async def retry() -> None:
            results.append(await retrying.wait(SENT, budget_wait=30.0))

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(retry)
                await anyio.wait_all_tasks_blocked()
                budget.answered()  # a good answer somewhere: a token comes back
        assert results == [True]
        assert budget.refused == 0

    run(main)


def test_no_retry_of_a_connect_failure_once_the_host_is_unreachable() -> None:
    async def main() -> None:
        clock = FakeClock()
        health = Health("api.example", unreachable_after=0.0)
        health.failed(NOT_SENT)
        retrying = retrying_for(ka.RetryPolicy(), clock, health=health)
        assert not await retrying.wait(NOT_SENT)
        assert retrying.stopped == "unreachable"
        assert isinstance(retrying.unreachable, ka.UnreachableError)
        assert "api.example" in str(retrying.unreachable)
        assert clock.sleeps == []
        # A request that was sent says nothing about reachability: it is retried.
        assert await Retrying(
            ka.RetryPolicy(initial=0.001, maximum=0.001), health=health, sleep=clock.sleep
        ).wait(SENT)

    run(main)


def test_a_connect_failure_looks_again_when_the_verdict_would_fall() -> None:
    async def main() -> None:
        clock = FakeClock()
        health = Health("api.example", unreachable_after=2.0)
        health.failed(NOT_SENT)
        policy = ka.RetryPolicy(attempts=10, timeout=600.0, initial=50.0, maximum=50.0)
        retrying = retrying_for(policy, clock, health=health)
        assert await retrying.wait(NOT_SENT)
        assert clock.sleeps[0] <= 2.0  # not the 25-50 s back-off: the verdict is due first

    run(main)


def test_the_attempt_count_includes_the_first() -> None:
    async def main() -> None:
        clock = FakeClock()
        retrying = retrying_for(ka.RetryPolicy(attempts=3, initial=0.01, maximum=0.01), clock)
        assert await retrying.wait(SENT)
        assert await retrying.wait(SENT)
        assert not await retrying.wait(SENT)  # three attempts made: no fourth
        assert retrying.stopped == "attempts"
        assert len(clock.sleeps) == 2

    run(main)
