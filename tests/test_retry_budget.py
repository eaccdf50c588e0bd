"""The client-wide retry budget, and the climb of a learned concurrency limit.

While every request fails, each first attempt deposits ``budget_ratio`` (0.2) of a token and
each retry takes one from a reserve of three, so all the calls of an outage together make at
most 1.2 x N + 3 attempts, counted by the emulator. First attempts are never held back.
"""

from __future__ import annotations

import math

import anyio
import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kling_async as ka
from kling_async.testing import Emulator, FaultKind, Faults

from .conftest import SCALE, client_for

pytestmark = pytest.mark.anyio

FAIL_ALL = {FaultKind.ERROR_5XX_BEFORE_COMMIT: 1.0}
#: Quick back-off, so that a retry refused by the budget gives up within a tenth of a second.
QUICK = ka.RetryPolicy(attempts=6, timeout=5.0, initial=0.005, maximum=0.02)


def outage_bound(n: int) -> float:
    return 1.2 * n + 3


async def gather_gets(kling: ka.KlingClient, task_id: str, n: int) -> list[BaseException]:
    errors: list[BaseException] = []

    async def one() -> None:
        try:
            await kling.text2video.get(task_id)
        except ka.KlingError as exc:
            errors.append(exc)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for _ in range(n):
                tg.start_soon(one)
    return errors


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 30), attempts=st.integers(2, 8))
async def test_gets_in_an_outage_stay_within_the_budget(n: int, attempts: int) -> None:
    retry = attrs.evolve(QUICK, attempts=attempts)
    async with Emulator(time_scale=SCALE) as emu, client_for(emu, retry=retry) as kling:
        task = await kling.text2video.create(ka.Text2VideoRequest(prompt="p"))
        emu.set_faults(Faults(query=FAIL_ALL))
        errors = await gather_gets(kling, task.task_id, n)
        gets = emu.stats.requests_per_route["get"]
        assert len(errors) == n
        assert all(type(e) is ka.ServerError for e in errors), errors
        assert n <= gets <= outage_bound(n)
        # Each call ended by a refusal unless it made all its attempts.
        retries = gets - n
        assert n - retries // (attempts - 1) <= kling.stats.retries_refused <= n

        emu.set_faults(None)  # the server is back: the next call goes out at once
        assert (await kling.text2video.get(task.task_id)).task_id == task.task_id
        assert emu.stats.requests_per_route["get"] == gets + 1


@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 25))
async def test_creates_in_an_outage_stay_within_the_budget_and_say_so(n: int) -> None:
    async with Emulator(time_scale=SCALE, faults=Faults(create=FAIL_ALL, query=FAIL_ALL)) as emu:
        async with client_for(emu, retry=QUICK) as kling:
            outcomes: dict[str, BaseException] = {}

            async def one(i: int) -> None:
                request = ka.Text2VideoRequest(prompt="p", external_task_id=f"budget-{i}")
                try:
                    await kling.text2video.create(request)
                except ka.KlingError as exc:
                    outcomes[f"budget-{i}"] = exc

            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    for i in range(n):
                        tg.start_soon(one, i)
            routes = emu.stats.requests_per_route
            posts, lookups = routes["create"], routes["get_by_external_id"]
            assert routes["get"] == routes["list"] == 0
            assert len(outcomes) == n
            for external_task_id, error in outcomes.items():
                assert isinstance(error, ka.AmbiguousSubmissionError), error
                assert error.external_task_id == external_task_id
            assert n <= posts
            assert posts + lookups <= outage_bound(n)
            assert emu.stats.tasks_created == 0
            assert 1 <= kling.stats.retries_refused <= n  # the budget ended them, once each

            emu.set_faults(None)
            task = await kling.text2video.create(ka.Text2VideoRequest(prompt="back"))
            assert emu.stats.requests_per_route["create"] == posts + 1
            assert emu.stats.tasks_created == 1
            assert task.task_id in emu.tasks


@pytest.mark.parametrize("n", [1, 12])
async def test_without_a_budget_each_call_makes_all_its_attempts(n: int) -> None:
    retry = attrs.evolve(QUICK, attempts=3, budget_ratio=None)
    async with Emulator(time_scale=SCALE) as emu, client_for(emu, retry=retry) as kling:
        task = await kling.text2video.create(ka.Text2VideoRequest(prompt="p"))
        emu.set_faults(Faults(query=FAIL_ALL))
        errors = await gather_gets(kling, task.task_id, n)
        assert len(errors) == n and all(isinstance(e, ka.ServerError) for e in errors)
        assert emu.stats.requests_per_route["get"] == n * 3
        assert kling.stats.retries_refused == 0


async def test_the_budget_is_what_holds_an_outage_down() -> None:
    """The same outage with and without the budget: the bound is the budget's doing."""
    counts = {}
    for ratio in (0.2, None):
        retry = attrs.evolve(QUICK, attempts=6, budget_ratio=ratio)
        async with Emulator(time_scale=SCALE) as emu, client_for(emu, retry=retry) as kling:
            task = await kling.text2video.create(ka.Text2VideoRequest(prompt="p"))
            emu.set_faults(Faults(query=FAIL_ALL))
            await gather_gets(kling, task.task_id, 20)
            counts[ratio] = emu.stats.requests_per_route["get"]
    assert counts[0.2] <= outage_bound(20)
    assert counts[None] == 20 * 6


async def test_a_learned_limit_climbs_to_a_raised_account_limit() -> None:
    """The client learns a limit of 2 from 1303s; the account is raised to 10: the client's
    limit climbs to it (a slot per finished task) and the account really runs 10 at once."""
    async with Emulator(time_scale=SCALE, seed=4, concurrency_limit=2, median_duration=20.0) as emu:
        async with client_for(emu) as kling:
            jobs = kling.submit_many(ka.Text2VideoRequest(prompt=f"clip {i}") for i in range(400))
            with anyio.fail_after(30):
                while not (kling.stats.active_limit == 2 and kling.stats.submitted >= 10):
                    await anyio.sleep(0.005)
            assert emu.stats.peak_active == 2

            # The limit's own lessons: 1303s less the slot probes' (sent on purpose while
            # jobs wait, see test_slot_probes.py).
            def lessons() -> int:
                return emu.stats.sent_1303 - kling.stats.slot_probes_refused

            before = lessons()
            emu.set_concurrency_limit(10)
            with anyio.fail_after(30):
                while kling.stats.active_limit < 10 or emu.stats.peak_active < 10:
                    await anyio.sleep(0.005)
            climb = lessons() - before
            with anyio.fail_after(60):
                async for _ in kling.as_completed(jobs):
                    pass
            stats = kling.stats
            after = lessons()
        assert climb <= 8
        assert after - before <= 8 + math.ceil(math.log2(400))
        assert stats.concurrency_limited == emu.stats.sent_1303
        assert emu.stats.peak_active == 10
        assert all(job.status is ka.JobStatus.SUCCEEDED for job in jobs)
        assert emu.stats.tasks_created == 400
