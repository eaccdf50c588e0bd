"""A client with a job store: a restart loses no job, creates no duplicate, and old ids answer."""

from __future__ import annotations

from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

import kling_async as ka
from kling_async.testing import Emulator

from .conftest import SCALE, client_for

pytestmark = pytest.mark.anyio

LONG = 600.0  # emulated seconds: tasks outlive the first client


async def until(condition: object, seconds: float = 10) -> None:
    with anyio.fail_after(seconds):
        while not condition():  # type: ignore[operator]
            await anyio.sleep(0.005)


def long_poll() -> ka.PollPolicy:
    return ka.PollPolicy(initial_estimate=LONG, max_interval=LONG / 10).scaled(SCALE)


async def test_a_restart_follows_running_tasks_and_creates_the_unsent_ones_once() -> None:
    store = ka.MemoryJobStore()
    async with Emulator(time_scale=SCALE, median_duration=LONG, seed=11) as emu:
        async with client_for(emu, store=store, max_active_tasks=2, poll=long_poll()) as first:
            jobs = first.submit_many([ka.Text2VideoRequest(prompt=f"clip {i}") for i in range(5)])
            ids = [job.id for job in jobs]
            await until(lambda: sum(job.task_id is not None for job in jobs) == 2)
            running = {job.id: job.task_id for job in jobs if job.task_id is not None}
        assert not any(job.done for job in jobs)
        records = {record.id: record for record in await store.load()}
        assert set(records) == set(ids)
        assert {i: r.task_id for i, r in records.items() if r.task_id} == running
        unsent = [i for i, r in records.items() if not r.sent]
        assert len(unsent) == 3  # queued behind the two slots: never sent
        lookups = emu.stats.requests_per_route["get_by_external_id"]

        async with client_for(emu, store=store, max_active_tasks=2, poll=long_poll()) as second:
            again = [second.job(i) for i in ids]
            assert all(job is not None for job in again)
            assert [job.id for job in again if job] == ids
            for job_id, task_id in running.items():
                resumed = second.job(job_id)
                assert resumed is not None
                assert resumed.task_id == task_id
                assert second.job(task_id) is resumed
            finals = []
            with anyio.fail_after(60):
                async for job in second.as_completed([j for j in again if j]):
                    finals.append(job)
            assert all(job.status is ka.JobStatus.SUCCEEDED for job in finals)
            assert not any(job.possible_duplicate for job in finals)
            assert second.stats.active == 0
        # Exactly one task per job, and the never-sent ones were not looked up first.
        assert emu.stats.tasks_created == 5
        assert all(count == 1 for count in emu.stats.created_per_external_id.values())
        assert emu.stats.requests_per_route["get_by_external_id"] == lookups
        assert all(r.finished for r in await store.load())


async def test_ended_jobs_answer_after_a_restart_as_they_were(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    async with Emulator(time_scale=SCALE, seed=12, failure_rate=0.0) as emu:
        async with client_for(emu, store=path) as first:
            done = first.submit(ka.Text2VideoRequest(prompt="fine", external_task_id="ok-1"))
            await done.wait()
            emu.force_account_error(1102)
            refused = first.submit(ka.Text2VideoRequest(prompt="unpaid", external_task_id="no-1"))
            with pytest.raises(ka.AccountError):
                await refused.wait()
            before = (done.to_dict(), refused.to_dict())
        emu.force_account_error(None)
        async with client_for(emu, store=str(path)) as second:
            ok = second.job("ok-1")
            no = second.job("no-1")
            assert ok is not None and no is not None
            assert ok.done and no.done
            assert ok.result() == done.task
            assert done.task_id is not None and second.job(done.task_id) is ok
            assert no.status is ka.JobStatus.ERROR
            with pytest.raises(ka.KlingError, match="AccountError"):
                no.result()
            after = (ok.to_dict(), no.to_dict())
            assert after[0] == before[0]
            assert after[1]["error"] == before[1]["error"]  # the type and message are kept
            assert second.stats.active == 0
            assert second.stats.following == 0
        assert emu.stats.tasks_created == 1


async def test_the_mark_before_a_create_is_written_before_the_create_goes_out() -> None:
    """The one write the engine waits for: a restart then knows to look before re-sending."""
    seen_at_create: list[bool] = []

    class Watching(ka.MemoryJobStore):
        async def save(self, records: object) -> None:
            await anyio.sleep(0.05)  # a slow store: the submitter must still wait for it
            await super().save(records)  # type: ignore[arg-type]

    store = Watching()
    async with Emulator(time_scale=SCALE, seed=13) as emu:
        async with client_for(emu, store=store) as kling:
            job = kling.submit(ka.Text2VideoRequest(prompt="marked"))
            with anyio.fail_after(10):
                while emu.stats.requests_per_route["create"] == 0:
                    await anyio.lowlevel.checkpoint()
                records = {r.id: r for r in await store.load()}
                seen_at_create.append(records[job.id].sent if job.id in records else False)
            await job.wait()
    assert seen_at_create == [True]


async def test_a_store_object_is_left_open_for_its_owner(tmp_path: Path) -> None:
    async with ka.SQLiteJobStore(tmp_path / "shared.sqlite3") as store:
        async with Emulator(time_scale=SCALE, seed=14) as emu:
            async with client_for(emu, store=store) as kling:
                await kling.submit(ka.Text2VideoRequest(prompt="one")).wait()
            assert len(await store.load()) == 1  # still open after the client closed
            async with client_for(emu, store=store) as kling:
                await kling.submit(ka.Text2VideoRequest(prompt="two")).wait()
            assert len(await store.load()) == 2


async def test_a_bad_store_argument_is_refused_before_any_request() -> None:
    with pytest.raises(ka.ValidationError, match="store"):
        ka.KlingClient(api_key="sk-x", store=42)  # type: ignore[arg-type]
    with pytest.raises(ka.ValidationError, match="store"):
        ka.KlingClient(api_key="sk-x", store="")


async def test_resubmitting_with_resume_is_idempotent_and_retries_only_jobs_without_a_task(
    tmp_path: Path,
) -> None:
    path = tmp_path / "jobs.sqlite3"
    async with Emulator(time_scale=SCALE, seed=15) as emu:
        async with client_for(emu, store=path) as first:
            ok = first.submit(ka.Text2VideoRequest(prompt="fine", external_task_id="r-ok"))
            await ok.wait()
            emu.force_account_error(1102)
            stopped = first.submit(ka.Text2VideoRequest(prompt="later", external_task_id="r-no"))
            with pytest.raises(ka.AccountError):
                await stopped.wait()
        emu.force_account_error(None)
        async with client_for(emu, store=path) as second:
            requests = [
                ka.Text2VideoRequest(prompt="fine", external_task_id="r-ok"),
                ka.Text2VideoRequest(prompt="later", external_task_id="r-no"),
            ]
            with pytest.raises(ka.ValidationError, match="already the id"):
                second.submit_many(requests)  # without resume: an id in use is a mistake
            again = second.submit_many(requests, resume=True)
            assert again[0] is second.job("r-ok")  # ended with its task: given back as it is
            assert again[0].done
            retried = again[1]
            assert retried is second.job("r-no")
            assert not retried.done or retried.status is ka.JobStatus.SUCCEEDED
            final = await retried.wait()
            assert final.succeeded
            assert second.submit(requests[1], resume=True) is retried
    assert emu.stats.created_per_external_id["r-ok"] == 1
    assert emu.stats.created_per_external_id["r-no"] == 1


async def test_resume_under_an_id_of_another_request_is_refused(emu: Emulator) -> None:
    async with client_for(emu) as kling:
        kling.submit(ka.Text2VideoRequest(prompt="first", external_task_id="same-id"))
        with pytest.raises(ka.ValidationError, match="another request"):
            kling.submit(
                ka.Text2VideoRequest(prompt="second", external_task_id="same-id"), resume=True
            )
