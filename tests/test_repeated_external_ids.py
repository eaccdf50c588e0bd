"""Re-sent creates when a new task shows in lookups only after the settle window.

The emulator hides each new task from lookups by external id for ``LAG`` (its duplicate check
sees it at once), and the client settles for less than that, so a create whose reply was
dropped after commit is sent again. What that second POST gets depends on the backend:
refused as a repeat (the first one landed: adopt it, never send again), answered with the
first task, or accepted as a second task (the job must say ``possible_duplicate``).
"""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import attrs
import pytest

import kling_async as ka
from kling_async.testing import Emulator, FaultKind, Faults

from .conftest import FAST_RETRY, SCALE, client_for

pytestmark = pytest.mark.anyio

#: Emulated seconds a new task stays invisible to lookups (0.6 s real), against a settle
#: window of 0.03 s: every look within the window of a dropped create misses.
LAG = 600.0
SETTLE = 0.03
N = 12
DROP = FaultKind.DROP_AFTER_COMMIT


def rows(n: int = N) -> list[ka.Text2VideoRequest]:
    return [ka.Text2VideoRequest(prompt=f"clip {i}", external_task_id=f"dup-{i}") for i in range(n)]


def emulator(policy: str, rate: float, seed: int = 3) -> Emulator:
    return Emulator(
        time_scale=SCALE,
        seed=seed,
        visibility_lag=LAG,
        duplicate_external_id=policy,  # type: ignore[arg-type]
        faults=Faults(create={DROP: rate}),
    )


async def run_jobs(emu: Emulator, **overrides: object) -> list[ka.Job]:
    async with client_for(emu, settle_window=SETTLE, **overrides) as kling:
        jobs = kling.submit_many(rows())
        with anyio.fail_after(60):
            async for _ in kling.as_completed(jobs):
                pass
    return jobs


async def create_all(emu: Emulator, **overrides: object) -> list[ka.Task]:
    results: list[ka.Task] = []

    async def one(request: ka.Text2VideoRequest) -> None:
        results.append(await kling.text2video.create(request))

    async with client_for(emu, settle_window=SETTLE, **overrides) as kling:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for request in rows():
                    tg.start_soon(one, request)
    return results


def assert_one_task_each(emu: Emulator, external_ids: Sequence[str | None]) -> None:
    assert emu.stats.created_per_external_id == dict.fromkeys(external_ids, 1)


def assert_refused_repeats_were_never_sent_again(emu: Emulator) -> None:
    """Under "reject" with only after-commit drops, a POST either creates a task (whose reply
    may be dropped) or is refused as a repeat. A dropped create is sent once more and refused;
    a refusal proves the task exists, so nothing is sent after it: POSTs == tasks + drops."""
    drops = emu.stats.faults_injected[DROP.name]
    assert drops >= 1
    assert emu.stats.requests_per_route["create"] == emu.stats.tasks_created + drops


@pytest.mark.parametrize("rate", [1.0, 0.5])
async def test_reject_adopts_the_first_task_and_never_sends_again(rate: float) -> None:
    async with emulator("reject", rate) as emu:
        jobs = await run_jobs(emu)
    assert [job.error for job in jobs] == [None] * N
    assert all(job.status is ka.JobStatus.SUCCEEDED for job in jobs)
    assert_one_task_each(emu, [job.external_task_id for job in jobs])
    assert {job.task_id for job in jobs} == set(emu.tasks)
    assert_refused_repeats_were_never_sent_again(emu)
    assert not any(job.possible_duplicate for job in jobs)


async def test_allow_flags_every_job_that_may_have_two_tasks() -> None:
    async with emulator("allow", 0.5) as emu:
        jobs = await run_jobs(emu)
    created = emu.stats.created_per_external_id
    assert [job.error for job in jobs] == [None] * N
    assert all(job.status is ka.JobStatus.SUCCEEDED for job in jobs)
    assert max(created.values()) >= 2  # the backend really took a repeat
    assert min(created.values()) == 1
    for job in jobs:
        assert job.task_id is not None
        assert emu.tasks[job.task_id].external_task_id == job.external_task_id
        # Under "allow" every POST creates a task, so a job with one task was sent once.
        assert job.possible_duplicate is (created[job.external_task_id or ""] >= 2), job


async def test_return_first_leaves_one_task_each() -> None:
    async with emulator("return_first", 0.5) as emu:
        jobs = await run_jobs(emu)
    assert [job.error for job in jobs] == [None] * N
    assert all(job.status is ka.JobStatus.SUCCEEDED for job in jobs)
    assert_one_task_each(emu, [job.external_task_id for job in jobs])
    assert {job.task_id for job in jobs} == set(emu.tasks)
    assert emu.stats.requests_per_route["create"] > N  # some creates were sent again


@pytest.mark.parametrize("rate", [1.0, 0.5])
async def test_direct_create_looks_a_refused_repeat_up_in_place(rate: float) -> None:
    async with emulator("reject", rate) as emu:
        tasks = await create_all(emu)
    assert len(tasks) == N
    assert_one_task_each(emu, [task.external_task_id for task in tasks])
    assert {task.task_id for task in tasks} == set(emu.tasks)
    assert_refused_repeats_were_never_sent_again(emu)


async def test_direct_create_under_return_first_leaves_one_task_each() -> None:
    """A re-sent create answered with the first task can be dropped again: half of all
    answers failing is an outage to the retry budget, which would end some creates ambiguous
    (tests/test_exactly_once.py covers that). Here the budget is off: this is about repeats."""
    async with emulator("return_first", 0.5) as emu:
        tasks = await create_all(emu, retry=attrs.evolve(FAST_RETRY, budget_ratio=None))
    assert len(tasks) == N
    assert_one_task_each(emu, [task.external_task_id for task in tasks])
    assert {task.task_id for task in tasks} == set(emu.tasks)


async def test_a_profile_that_refuses_repeats_never_flags() -> None:
    """Under "return_first" a re-sent create looks like a fresh success, so a client that
    does not know better flags it; one whose profile says repeats are refused does not."""
    async with emulator("return_first", 0.5) as emu:
        unsure = await run_jobs(emu)
    assert any(job.possible_duplicate for job in unsure)  # the premise: flags do happen

    refusing = attrs.evolve(ka.COMETAPI, repeated_external_id="reject")
    async with emulator("return_first", 0.5) as emu:
        sure = await run_jobs(emu, profile=refusing)
    assert emu.stats.requests_per_route["create"] > N  # creates were sent again all the same
    assert all(job.status is ka.JobStatus.SUCCEEDED for job in sure)
    assert not any(job.possible_duplicate for job in sure)
    assert_one_task_each(emu, [job.external_task_id for job in sure])
