"""The lifecycle's edges: one task followed by one job, a job id tracked again, a job given up
on tracked again, the mark before a resumed create, failing seams, slots at close, a store
that cannot load. Each was a defect found in review (the test failed before the fix).
Everything runs against the emulator over loopback, with real objects only.
"""

from __future__ import annotations

from collections.abc import Iterable

import anyio
import attrs
import pytest

import kling_async as ka
from kling_async.protocol.schedule import ClassKey, DurationModel
from kling_async.testing import Emulator

from .conftest import SCALE, client_for

pytestmark = pytest.mark.anyio

HOUR = 3600.0
LONG = 600.0  # emulated seconds (0.6 s real): long enough to outlive what the test does


def hour_poll() -> ka.PollPolicy:
    """Tasks of an hour, polled on an hour's schedule: no poll of its own comes soon."""
    return ka.PollPolicy(initial_estimate=HOUR, max_interval=HOUR).scaled(SCALE)


async def started(kling: ka.KlingClient, prompt: str = "a slow clip") -> ka.Job:
    """A submitted job whose task exists and has been seen."""
    job = kling.submit(ka.Text2VideoRequest(prompt=prompt))
    with anyio.fail_after(10):
        while job.task is None:
            await anyio.sleep(0.005)
    return job


# --- 1. a task followed by two jobs: one of them never ends and keeps its slot -------------


async def test_a_task_tracked_before_its_own_job_learns_it_is_not_followed_twice() -> None:
    """A task tracked before its own job learned its task id (a resumed lookup, a create or a
    finder still in flight, a callback handler's ``track``) has one follower and one slot:
    the job that created it follows it and the tracked job mirrors it, ending with it. (Both
    used to be registered; the tracked one was never polled again and kept its slot.)"""
    async with Emulator(time_scale=SCALE, seed=31, failure_rate=0.0, median_duration=LONG) as emu:
        async with client_for(emu) as kling:
            request = ka.Text2VideoRequest(prompt="made earlier", external_task_id="shared-1")
            task = await kling.text2video.create(request)  # e.g. by a run that then crashed
            tracked = kling.track(task.task_id)
            job = kling.submit(request, resume=True)  # looked up by its id: finds the task
            with anyio.fail_after(30):
                final = await job.wait()
            assert final.task_id == task.task_id
            # The task has ended: no job of it may still hold a slot or wait forever.
            assert kling.stats.following == 0
            assert kling.stats.active == 0
            assert tracked.done


# --- 2. track(<a job id>) replaces the job in the index and takes its lease again ----------


class RecordingLimit(ka.AdaptiveLimit):
    """The default limiter, keeping every hold of a lease that is already held."""

    def __init__(self) -> None:
        super().__init__(None)
        self.taken_twice: list[str] = []

    def hold(self, job_id: str) -> None:
        if job_id in self._holders:
            self.taken_twice.append(job_id)
        super().hold(job_id)


async def test_track_of_a_job_id_neither_replaces_the_job_nor_takes_its_lease_again() -> None:
    """``track(job.id)`` (the id the docs say to persist) gives that job back: it does not
    make a second job of the same id nor take its slot again. (It used to do both.)"""
    slots = RecordingLimit()
    async with Emulator(time_scale=SCALE, median_duration=HOUR, seed=32) as emu:
        async with client_for(emu, slot_limiter=slots, poll=hour_poll()) as kling:
            job = await started(kling)
            kling.track(job.id)
            assert slots.taken_twice == []
            assert kling.job(job.id) is job


# --- 3. a job that ended without seeing its task end can never be followed again -----------


async def test_a_task_whose_job_ended_in_error_can_be_tracked_again() -> None:
    """A job given up on with its task id kept (an unreachable host, polls failing) can be
    tracked again: a new job of the same id follows the task. (``track`` used to hand back
    the errored job, so the task could never be followed again.)"""
    store = ka.MemoryJobStore()
    async with Emulator(time_scale=SCALE, seed=33, failure_rate=0.0) as emu:
        async with client_for(emu) as first:
            task = await first.text2video.create(ka.Text2VideoRequest(prompt="lost touch"))
        # What the first run's store held for a tracked job given up on an unreachable host.
        await store.save(
            [
                ka.JobRecord(
                    id=task.task_id,
                    task_id=task.task_id,
                    status=ka.JobStatus.ERROR,
                    task=task,
                    sent=True,
                    error="the API host could not be reached",
                    error_type="UnreachableError",
                )
            ]
        )
        async with client_for(emu, store=store) as second:
            job = second.track(task.task_id)
            with anyio.fail_after(30):
                final = await job.wait()
            assert final.succeeded


# --- 4. submit(resume=True) never waits for the mark before its create --------------------


async def test_a_resumed_submission_is_in_the_store_before_its_create_goes_out() -> None:
    """``submit(..., resume=True)`` waits for the store's mark before its first create, like any
    other job, so a crash right after the create still leaves the job in the store. (The
    mark used to be skipped for resumed jobs.)"""
    creates_when_marked: list[int] = []

    async with Emulator(time_scale=SCALE, seed=34) as emu:

        class Watching(ka.MemoryJobStore):
            async def save(self, records: Iterable[ka.JobRecord]) -> None:
                batch = list(records)
                if not creates_when_marked and any(r.id == "again-1" and r.sent for r in batch):
                    with anyio.move_on_after(2):
                        while emu.stats.requests_per_route["create"] == 0:
                            await anyio.sleep(0.005)
                    creates_when_marked.append(emu.stats.requests_per_route["create"])
                await super().save(batch)

        async with client_for(emu, store=Watching()) as kling:
            job = kling.submit(
                ka.Text2VideoRequest(prompt="again", external_task_id="again-1"), resume=True
            )
            with anyio.fail_after(30):
                await job.wait()
    assert creates_when_marked == [0]


# --- 5. an error of the duration statistics keeps a finished job from ending ---------------


class FailingDurations:
    """Duration statistics whose shared backend is down: every observation raises."""

    def __init__(self, policy: ka.PollPolicy) -> None:
        self._policy = policy
        self._models: dict[ClassKey, DurationModel] = {}

    def model(self, key: ClassKey) -> DurationModel:
        if key not in self._models:
            self._models[key] = self._policy.duration_model()
        return self._models[key]

    def observe(self, key: ClassKey, seconds: float) -> None:
        raise ConnectionError("statistics backend unreachable")


async def test_a_failing_statistics_seam_does_not_keep_a_finished_job_from_ending() -> None:
    """A duration-statistics seam that raises (a shared backend down) is logged and the job
    still ends and gives its slot back. (It used to keep the job from ending.)"""
    poll = hour_poll()
    async with Emulator(time_scale=SCALE, median_duration=HOUR, seed=35) as emu:
        async with client_for(emu, poll=poll, duration_stats=FailingDurations(poll)) as kling:
            job = await started(kling)
            real = job.task
            assert real is not None
            done = attrs.evolve(
                real,
                status=ka.TaskStatus.SUCCEEDED,
                videos=(ka.Video(id="v1", url=f"{emu.files_url}/v1.mp4", duration=5.0),),
            )
            try:
                kling.observe(done, confirmed=True)
            finally:
                assert job.done
                assert kling.stats.active == 0


# --- 6. a slot limiter shared by clients keeps the slots of a client that closed ----------


async def test_a_shared_slot_limiter_gets_every_slot_back_when_its_client_closes() -> None:
    """A closed client gives back the slots its unfinished jobs held, so a limiter shared by
    successive clients is not left full; the next client that follows the task takes its
    own. (They used to be kept for ever.)"""
    slots = ka.AdaptiveLimit(1)
    async with Emulator(time_scale=SCALE, median_duration=HOUR, seed=36) as emu:
        async with client_for(emu, slot_limiter=slots, poll=hour_poll()) as first:
            job = await started(first)
        assert job.task_id is not None
        assert slots.active == 0, "the closed client still holds its job's slot"
        async with client_for(emu, slot_limiter=slots, poll=hour_poll()) as second:
            second.track(job.task_id)
            assert slots.active == 1


# --- 7. an error loading the store comes out of `async with` wrapped in a group ----------


async def test_a_store_that_cannot_load_raises_its_own_error_from_async_with(
    emu: Emulator,
) -> None:
    """A store that cannot load raises its own error out of ``async with``, not one wrapped in
    an exception group (the store is now loaded before the task group starts)."""

    class Unreadable(ka.MemoryJobStore):
        async def load(self) -> list[ka.JobRecord]:
            raise OSError("the disk is gone")

    with pytest.raises(OSError, match="the disk is gone"):
        async with client_for(emu, store=Unreadable()):
            pass


@pytest.mark.parametrize("failure_rate", [0.0, 1.0])
async def test_an_end_in_a_create_answer_is_confirmed_by_a_poll(failure_rate: float) -> None:
    """Fails before the fix: a task that ended before its create was answered (the emulator's
    tasks of a microsecond) made the job end on the answer's short form, a success with no
    video to download (or a failure with no reason). The end is confirmed by a poll first."""
    async with Emulator(
        time_scale=SCALE, seed=41, median_duration=1e-6, failure_rate=failure_rate
    ) as emu:
        async with client_for(emu) as kling:
            job = kling.submit(ka.Text2VideoRequest(prompt="over at once"))
            with anyio.fail_after(10):
                task = await job.wait() if failure_rate == 0 else None
                while not job.done:
                    await anyio.sleep(0.005)
            if failure_rate == 0:
                assert task is not None and task.video is not None
                assert job.status is ka.JobStatus.SUCCEEDED
            else:
                assert job.status is ka.JobStatus.FAILED
                assert job.task is not None and job.task.status_message
            assert emu.stats.requests_per_route["get"] >= 1
