"""The example app under ``uvicorn --workers 3`` sharing one account through a real Redis.

Three worker processes accept on one socket, so each new connection may land on any of them:
a job posted to one is listed, streamed and served by the others, and the emulator's
callbacks (which land on any worker) reach the job's owner, which confirms them. The test
proves several workers answered (``GET /backend`` names the worker's pid).
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator

import aiohttp
import anyio
import pytest

from kling_async.testing import Emulator

from .cli_helpers import ROOT, child_env
from .fastapi_helpers import bound_socket, port_of, sse_items
from .redis_helpers import RedisServer, redis_server

pytestmark = pytest.mark.anyio

SCALE = 0.01  # a clip of about 100 emulated seconds takes about 1 s
WORKERS = 3


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


async def fresh_get(url: str) -> tuple[int, dict[str, object]]:
    """One GET on a new connection (so the kernel may hand it to any worker)."""
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session,
        session.get(url) as response,
    ):
        return response.status, await response.json()


async def backend_pids(base: str, tries: int) -> set[int]:
    pids: set[int] = set()
    for _ in range(tries):
        status, body = await fresh_get(f"{base}/backend")
        assert status == 200
        pid = body["worker"]
        assert isinstance(pid, int)
        pids.add(pid)
    return pids


async def stream_to_end(base: str, job_id: str) -> list[str]:
    """The statuses one job's event stream shows, from whichever worker answers, to its end."""
    statuses: list[str] = []
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session,
        session.get(f"{base}/kling/jobs/{job_id}/events") as response,
    ):
        assert response.status == 200
        async for item in sse_items(response):
            data = getattr(item, "data", None)
            if not data:
                continue
            status = json.loads(data)["status"]
            statuses.append(status)
            if status in ("succeed", "failed", "error"):
                break
    return statuses


@pytest.fixture
async def app_workers(redis: RedisServer) -> AsyncIterator[tuple[str, Emulator]]:
    async with Emulator(time_scale=SCALE, seed=11, median_duration=100.0) as emu:
        sock = bound_socket()
        port = port_of(sock)
        sock.close()  # uvicorn binds it itself (its workers share the one socket)
        base = f"http://127.0.0.1:{port}"
        env = child_env(
            KLING_API_KEY=emu.api_key,
            KLING_BASE_URL=emu.url,
            KLING_REDIS_URL=redis.url,
            KLING_CALLBACK_TOKEN=secrets.token_urlsafe(32),
            KLING_TIME_SCALE=str(SCALE),
            PUBLIC_URL=base,
            PORT=str(port),
        )
        process = subprocess.Popen(  # noqa: S603, ASYNC220 (our own example; it runs apart)
            [
                sys.executable,
                "-m",
                "uvicorn",
                "app:app",
                "--app-dir",
                str(ROOT / "examples" / "fastapi_app"),
                "--workers",
                str(WORKERS),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--timeout-graceful-shutdown",
                "1",
                "--log-level",
                "warning",
            ],
            env=env,
            cwd=ROOT,
        )
        try:
            with anyio.fail_after(60):
                while True:
                    assert process.poll() is None, "uvicorn exited at start"
                    try:
                        if len(await backend_pids(base, 1)) == 1:
                            break
                    except aiohttp.ClientError:
                        await anyio.sleep(0.2)
            yield base, emu
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


async def test_jobs_progress_and_callbacks_work_whichever_worker_answers(
    app_workers: tuple[str, Emulator],
) -> None:
    base, emu = app_workers
    # Every worker is up (each answers for itself) before the jobs go in.
    with anyio.fail_after(60):
        while len(pids := await backend_pids(base, 12)) < 2:
            await anyio.sleep(0.2)
    assert len(pids) >= 2

    prompts = [{"prompt": f"a lighthouse, take {i}"} for i in range(6)]
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session,
        session.post(f"{base}/kling/jobs", json=prompts) as response,
    ):
        assert response.status == 202
        jobs = (await response.json())["jobs"]
    ids = [job["id"] for job in jobs]
    assert len(ids) == 6

    # Each job's stream, opened on a new connection (any worker), runs to the job's end.
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            results: dict[str, list[str]] = {}

            async def follow(job_id: str) -> None:
                results[job_id] = await stream_to_end(base, job_id)

            for job_id in ids:
                tg.start_soon(follow, job_id)
    for job_id in ids:
        assert results[job_id][-1] == "succeed", (job_id, results[job_id])

    # Any worker answers for any job, with the one task each job made.
    for _ in range(3):
        for job_id in ids:
            status, body = await fresh_get(f"{base}/kling/jobs/{job_id}")
            assert status == 200
            assert body["status"] == "succeed"
            assert body["task_id"] is not None
    assert emu.stats.created_per_external_id == dict.fromkeys(ids, 1)
    # The callbacks were sent to the workers and every one was taken (a 2xx answer):
    # whichever worker got one handed it to the job's owner.
    assert emu.stats.requests_per_route["callback_sent"] >= len(ids)
    assert emu.stats.callbacks_failed == 0
