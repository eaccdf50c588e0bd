"""Jobs by id: ``Job.id`` is stable from submission, ``kling.job()`` finds jobs by it or by task id,
``track()`` of a known ended task gives its finished job, and ``to_dict()`` is JSON-ready."""

from __future__ import annotations

import json

import anyio
import pytest

import kling_async as ka
from kling_async.testing import Emulator

from .conftest import client_for

pytestmark = pytest.mark.anyio


async def test_the_id_is_the_external_task_id_from_the_moment_of_submission(emu: Emulator) -> None:
    async with client_for(emu) as kling:
        mine = kling.submit(ka.Text2VideoRequest(prompt="named", external_task_id="clip-7"))
        given = kling.submit(ka.Text2VideoRequest(prompt="unnamed"))
        assert mine.id == "clip-7"
        assert given.id == given.external_task_id
        assert given.id  # a generated one, before any network call
        ids = (mine.id, given.id)
        assert kling.job("clip-7") is mine
        await mine.wait()
        await given.wait()
        assert (mine.id, given.id) == ids  # unchanged by the task's arrival
        assert mine.task_id is not None
        assert kling.job(mine.task_id) is mine
        assert kling.job("no-such-job") is None
        with pytest.raises(ka.ValidationError, match="job_id"):
            kling.job("")


async def test_an_id_already_in_use_is_refused_before_any_request(emu: Emulator) -> None:
    async with client_for(emu) as kling:
        kling.submit(ka.Text2VideoRequest(prompt="a", external_task_id="same"))
        creates = emu.stats.requests_per_route["create"]
        with pytest.raises(ka.ValidationError, match="already the id of a job"):
            kling.submit(ka.Text2VideoRequest(prompt="b", external_task_id="same"))
        with pytest.raises(ka.ValidationError, match="already the id of a job"):
            kling.submit_many(
                [
                    ka.Text2VideoRequest(prompt="c", external_task_id="twice"),
                    ka.Text2VideoRequest(prompt="d", external_task_id="twice"),
                ]
            )
        assert kling.job("twice") is None  # all validated before any was queued
        assert emu.stats.requests_per_route["create"] <= creates + 1


async def test_track_of_a_task_seen_ending_gives_the_finished_job_at_once(emu: Emulator) -> None:
    async with client_for(emu) as kling:
        job = kling.submit(ka.Text2VideoRequest(prompt="done soon"))
        await job.wait()
        assert job.task_id is not None
        polls = kling.stats.polls
        again = kling.track(job.task_id)
        assert again is job
        assert again.done  # no poll needed, no slot taken
        assert kling.stats.polls == polls
        assert kling.stats.active == 0
        task = await kling.text2video.create(ka.Text2VideoRequest(prompt="elsewhere"))
        tracked = kling.track(task.task_id)
        assert tracked.id == task.task_id
        assert kling.job(task.task_id) is tracked
        await tracked.wait()
        assert kling.track(task.task_id) is tracked


async def test_updates_and_events_start_at_queued(emu: Emulator) -> None:
    async with client_for(emu) as kling:
        events = kling.events()
        job = kling.submit(ka.Text2VideoRequest(prompt="watched"))
        updates = job.updates()
        await job.wait()
        mine = [update async for update in updates]
        assert [u.status for u in mine][:2] == [ka.JobStatus.QUEUED, ka.JobStatus.SUBMITTING]
        assert mine[0].task is None
        assert mine[-1].status is ka.JobStatus.SUCCEEDED
        assert all(update.job is job for update in mine)
        seen = []
        with anyio.fail_after(5):
            async for event in events:
                seen.append(event.status)
                if event.status.is_terminal:
                    break
        assert seen == [u.status for u in mine]


async def test_a_job_ending_without_a_task_says_why_in_its_events() -> None:
    async with Emulator(time_scale=0.001) as emu:
        emu.force_account_error(1102)
        async with client_for(emu) as kling:
            job = kling.submit(ka.Text2VideoRequest(prompt="unpaid"))
            updates = job.updates()
            with pytest.raises(ka.AccountError):
                await job.wait()
            last = [u async for u in updates][-1]
            assert last.status is ka.JobStatus.ERROR
            assert last.task is None
            assert isinstance(last.error, ka.AccountError)


async def test_to_dict_is_json_ready_through_the_converter(emu: Emulator) -> None:
    async with client_for(emu) as kling:
        job = kling.submit(ka.Text2VideoRequest(prompt="as json", external_task_id="j-1"))
        early = job.to_dict()
        assert early["id"] == "j-1"
        assert early["status"] == "queued"
        assert early["task"] is None
        assert early["request"]["prompt"] == "as json"
        task = await job.wait()
        data = json.loads(json.dumps(job.to_dict()))
        assert data["status"] == "succeed"
        assert data["task_id"] == task.task_id
        assert data["task"] == task.to_dict()
        assert ka.Task.from_dict(data["task"]) == task
        assert data["error"] is None
        assert data["ended_at"] is not None
        assert data["created_at"] <= data["updated_at"]


async def test_track_of_a_fetched_snapshot_starts_from_it(emu: Emulator) -> None:
    async with client_for(emu) as kling:
        created = await kling.text2video.create(ka.Text2VideoRequest(prompt="fetched"))
        running = kling.track(created)
        assert running.task == created
        assert kling.stats.active == 1
        final = await running.wait()
        assert final.succeeded
        assert kling.stats.active == 0
        other = await kling.text2video.create(ka.Text2VideoRequest(prompt="ended"))
        ended = await kling.text2video.wait(other.task_id, timeout=30)
        polls = kling.stats.polls
        finished = kling.track(ended)
        assert finished.done
        assert finished.result() == ended
        assert kling.stats.polls == polls
        assert kling.stats.active == 0


async def test_an_events_iterator_dropped_unread_stops_listening(emu: Emulator) -> None:
    import gc

    async with client_for(emu) as kling:
        hub = kling._hub
        unread = kling.events()
        assert len(hub._subscribers) == 1
        del unread
        gc.collect()
        assert hub._subscribers == []  # its buffer no longer grows with every event
        kept = kling.events()
        await kling.submit(ka.Text2VideoRequest(prompt="seen")).wait()
        first = await anext(aiter(kept))
        assert first.status is ka.JobStatus.QUEUED


async def test_track_of_a_task_seen_ending_through_wait_is_finished_at_once(emu: Emulator) -> None:
    async with client_for(emu) as kling:
        task = await kling.text2video.create(ka.Text2VideoRequest(prompt="waited for"))
        final = await kling.text2video.wait(task.task_id, timeout=30)
        gets = emu.stats.requests_per_route["get"]
        job = kling.track(task.task_id)
        assert job.done
        assert job.result() == final
        assert kling.stats.active == 0
        assert emu.stats.requests_per_route["get"] == gets  # no request needed
        assert kling.track(task.task_id) is job


async def test_jobs_lists_every_job_oldest_first_and_filters_by_status(emu: Emulator) -> None:
    async with client_for(emu) as kling:
        assert kling.jobs() == []
        first = kling.submit(ka.Text2VideoRequest(prompt="first", external_task_id="j-1"))
        second = kling.submit(ka.Text2VideoRequest(prompt="second", external_task_id="j-2"))
        assert kling.jobs() == [first, second]
        await first.wait()
        await second.wait()
        tracked = kling.track(first.task_id or "")  # the same job, not a new one
        assert tracked is first
        assert kling.jobs(ka.JobStatus.SUCCEEDED) == [first, second]
        assert kling.jobs([ka.JobStatus.QUEUED, ka.JobStatus.ERROR]) == []
        with pytest.raises(ka.ValidationError, match="status"):
            kling.jobs(["succeed"])  # type: ignore[list-item]
