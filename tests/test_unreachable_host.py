"""A host that refuses every connect: the unreachable verdict, and a host that comes back.

Nothing listens on a port that was bound and closed again, so every connect is refused at
once; the client counts its attempts (``stats.requests``), so "a while" is a number of
attempts, not seconds.
"""

from __future__ import annotations

import socket

import anyio
import pytest

import kling_async as ka
from kling_async.testing import Emulator

from .conftest import SCALE

pytestmark = pytest.mark.anyio

KEY = "sk-comes-back"
QUICK = ka.RetryPolicy(attempts=3, timeout=2.0, initial=0.005, maximum=0.02)


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def client(port: int, **overrides: object) -> ka.KlingClient:
    settings: dict[str, object] = {
        "api_key": KEY,
        "base_url": f"http://127.0.0.1:{port}",
        "retry": QUICK,
        "poll": ka.PollPolicy().scaled(SCALE),
        "max_requests_per_second": None,
    }
    settings.update(overrides)
    return ka.KlingClient(**settings)  # type: ignore[arg-type]


def requests(n: int) -> list[ka.Text2VideoRequest]:
    return [ka.Text2VideoRequest(prompt=f"clip {i}") for i in range(n)]


def assert_unreachable(error: BaseException | None) -> None:
    assert isinstance(error, ka.UnreachableError), error
    assert isinstance(error, ka.TransportError)
    assert error.request_sent is False
    assert error.host == "127.0.0.1"
    assert "127.0.0.1" in str(error)


async def wait_for_attempts(kling: ka.KlingClient, count: int) -> None:
    with anyio.fail_after(20):
        while kling.stats.requests < count:
            await anyio.sleep(0.002)


async def test_every_queued_job_ends_unreachable_and_calls_fail_fast() -> None:
    async with client(closed_port(), unreachable_after=0.5, max_concurrent_submits=2) as kling:
        jobs = kling.submit_many(requests(10))
        await wait_for_attempts(kling, 1)
        with anyio.fail_after(20):  # counted as it starts; its failure is known as it ends
            while kling.stats.connection_error is None:
                await anyio.sleep(0.002)
        error = kling.stats.connection_error  # while it lasts, it says what went wrong
        assert error is not None and "refused" in error.lower()
        assert not any(job.done for job in jobs)
        with anyio.fail_after(20):
            async for job in kling.as_completed(jobs):
                assert_unreachable(job.error)
                assert job.status is ka.JobStatus.ERROR
                assert job.task_id is None
        stats = kling.stats
        assert stats.rejected == 10
        assert stats.active == 0 and stats.queued == 0
        assert stats.connection_error is not None
        assert stats.connection_failing_for >= 0.5

        # The verdict holds: a direct call tries once and says so.
        before = kling.stats.requests
        with pytest.raises(ka.UnreachableError) as info:
            await kling.text2video.get("123456789012345678")
        assert_unreachable(info.value)
        with pytest.raises(ka.UnreachableError) as info:
            await kling.text2video.create(ka.Text2VideoRequest(prompt="p"))
        assert_unreachable(info.value)
        assert kling.stats.requests == before + 2


async def test_without_a_verdict_jobs_keep_trying() -> None:
    async with client(closed_port(), unreachable_after=None) as kling:
        jobs = kling.submit_many(requests(3))
        await wait_for_attempts(kling, 60)  # twenty rounds of attempts for each job
        stats = kling.stats
        assert not any(job.done for job in jobs)
        assert all(j.status in (ka.JobStatus.QUEUED, ka.JobStatus.SUBMITTING) for j in jobs)
        assert stats.rejected == 0
        assert stats.connection_error is not None and "refused" in stats.connection_error


async def test_a_host_that_comes_back_clears_the_connection_error() -> None:
    port = closed_port()
    async with client(port, unreachable_after=None) as kling:
        job = kling.submit(ka.Text2VideoRequest(prompt="patient"))
        await wait_for_attempts(kling, 5)
        assert kling.stats.connection_error is not None
        assert kling.stats.connection_failing_for > 0
        async with Emulator(time_scale=SCALE, port=port, api_keys=[KEY]) as emu:
            with anyio.fail_after(20):
                final = await job.wait()
            stats = kling.stats
        assert final.succeeded
        assert stats.connection_error is None
        assert stats.connection_failing_for == 0.0
        assert emu.stats.tasks_created == 1
        assert emu.stats.requests_per_route["create"] == 1


async def test_a_verdict_ends_followed_jobs_too_but_keeps_their_task_ids() -> None:
    """Jobs that have a task when the host goes away end unreachable with their task_id."""
    emu = Emulator(time_scale=SCALE, median_duration=1e6, api_keys=[KEY])
    await emu.start()
    port = int(emu.url.rsplit(":", 1)[1])
    try:
        kling = client(port, unreachable_after=0.3)
        async with kling:
            jobs = kling.submit_many(requests(3))
            with anyio.fail_after(10):
                while any(job.task_id is None for job in jobs):
                    await anyio.sleep(0.002)
            await emu.aclose()
            with anyio.fail_after(20):
                async for job in kling.as_completed(jobs):
                    assert_unreachable(job.error)
                    assert job.task_id is not None
    finally:
        await emu.aclose()
