"""kling.observe(): a snapshot seen outside the pollers is a hint unless the caller confirmed it.

A callback body, or anything else from outside, never changes a job by itself: it only brings
the job's next authenticated poll forward to now. A snapshot the caller fetched with the
account's credentials (``confirmed=True``) moves the job as a poll would, and never backwards.
"""

from __future__ import annotations

import anyio
import attrs
import pytest
from aiohttp import web

import kling_async as ka
from kling_async.testing import Emulator

from .conftest import SCALE, client_for

pytestmark = pytest.mark.anyio

HOUR = 3600.0


def long_client(emu: Emulator) -> ka.KlingClient:
    """Tasks of an hour, polled on an hour's schedule: no poll of its own comes soon."""
    return client_for(
        emu, poll=ka.PollPolicy(initial_estimate=HOUR, max_interval=HOUR).scaled(SCALE)
    )


async def started(kling: ka.KlingClient, prompt: str = "a slow clip") -> ka.Job:
    job = kling.submit(ka.Text2VideoRequest(prompt=prompt))
    with anyio.fail_after(10):
        while job.task is None:
            await anyio.sleep(0.005)
    return job


async def gets(emu: Emulator) -> int:
    return emu.stats.requests_per_route["get"]


async def test_an_unconfirmed_forged_success_changes_nothing_and_triggers_one_real_poll() -> None:
    hits: list[str] = []

    async def record(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(body=b"\x00\x00\x00\x18ftypmp42", content_type="video/mp4")

    app = web.Application()
    app.router.add_get("/{tail:.*}", record)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with Emulator(time_scale=SCALE, median_duration=HOUR, seed=3) as emu:
            async with long_client(emu) as kling:
                job = await started(kling)
                real = job.task
                assert real is not None
                before = await gets(emu)
                forged = attrs.evolve(
                    real,
                    status=ka.TaskStatus.SUCCEEDED,
                    videos=(
                        ka.Video(id="v", url=f"http://127.0.0.1:{port}/stolen.mp4", duration=5.0),
                    ),
                )
                assert kling.observe(forged) is job  # unconfirmed by default
                # Nothing changed by the hint itself...
                assert job.status is not ka.JobStatus.SUCCEEDED
                assert job.task is real
                # ...but the job's task was polled at once, with the credentials.
                with anyio.fail_after(5):
                    while await gets(emu) == before:
                        await anyio.sleep(0.005)
                assert job.status in (ka.JobStatus.SUBMITTED, ka.JobStatus.PROCESSING)
                assert "stolen" not in str(job.to_dict())
        assert hits == []  # nothing ever went to the forged URL
    finally:
        await runner.cleanup()


async def test_a_confirmed_snapshot_moves_the_job_forward_like_a_poll() -> None:
    async with Emulator(time_scale=SCALE, median_duration=HOUR, seed=4) as emu:
        async with long_client(emu) as kling:
            job = await started(kling)
            real = job.task
            assert real is not None
            seen = job.updates()
            assert kling.stats.active == 1
            # What the caller fetched itself with the credentials (here: made to say so).
            done = attrs.evolve(
                real,
                status=ka.TaskStatus.SUCCEEDED,
                videos=(ka.Video(id="v1", url=f"{emu.files_url}/v1.mp4", duration=5.0),),
            )
            assert kling.observe(done, confirmed=True) is job
            assert job.done
            assert job.task == done
            assert job.result() == done
            statuses = [event.status async for event in seen]
            assert statuses[-1] is ka.JobStatus.SUCCEEDED
            assert statuses.count(ka.JobStatus.SUCCEEDED) == 1
            # Its end is the tracker's one end: the slot is back and the task unfollowed.
            assert kling.stats.active == 0
            assert kling.stats.following == 0


async def test_states_only_move_forward() -> None:
    async with Emulator(time_scale=SCALE, median_duration=HOUR, seed=5) as emu:
        async with long_client(emu) as kling:
            job = await started(kling)
            real = job.task
            assert real is not None
            ahead = attrs.evolve(real, status=ka.TaskStatus.PROCESSING)
            kling.observe(ahead, confirmed=True)
            assert job.status is ka.JobStatus.PROCESSING
            behind = attrs.evolve(real, status=ka.TaskStatus.SUBMITTED)
            kling.observe(behind, confirmed=True)
            assert job.status is ka.JobStatus.PROCESSING
            assert job.task == ahead


async def test_a_snapshot_of_an_unknown_task_concerns_no_job(emu: Emulator) -> None:
    async with client_for(emu) as kling:
        stranger = ka.Task(task_id="not-ours", status=ka.TaskStatus.SUCCEEDED)
        assert kling.observe(stranger) is None
        assert kling.observe(stranger, confirmed=True) is None
        with pytest.raises(ka.ValidationError, match="task"):
            kling.observe({"task_id": "x"})  # type: ignore[arg-type]
        with pytest.raises(ka.ValidationError, match="confirmed"):
            kling.observe(stranger, confirmed="yes")  # type: ignore[arg-type]


async def test_an_ended_job_ignores_later_snapshots(emu: Emulator) -> None:
    async with client_for(emu) as kling:
        job = kling.submit(ka.Text2VideoRequest(prompt="quick"))
        final = await job.wait()
        late = attrs.evolve(final, status=ka.TaskStatus.PROCESSING)
        assert kling.observe(late, confirmed=True) is None
        assert job.task is final
        assert job.status is ka.JobStatus.SUCCEEDED
