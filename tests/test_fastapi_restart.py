"""The app restarted mid-run on the same job store: nothing is lost, nothing is made twice.

The first app submits jobs and stops while some are still running (their tasks go on at the
emulator, as they would at Kling). A second app on the same SQLite store, the same port and
the same ``callback_token`` answers for the old jobs, follows the unfinished ones to their end,
and takes the callbacks of tasks created by the first app.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kling_async.testing import Emulator

from .conftest import SCALE
from .fastapi_helpers import (
    SseEvent,
    bound_socket,
    event_number,
    events_only,
    eventually,
    get_json,
    job_view,
    kling_app,
    port_of,
    recorded,
    sse_items,
    wait_for_status,
)

pytestmark = pytest.mark.anyio

LIFECYCLE = ["queued", "submitting", "submitted", "processing", "succeed"]

QUICK = ["quick-1", "quick-2"]
SLOW = ["slow-1", "slow-2"]


async def stream(session: aiohttp.ClientSession, url: str, **headers: str) -> list[SseEvent]:
    async with session.get(url, headers=headers) as response:
        assert response.status == 200
        return events_only([item async for item in sse_items(response)])


async def test_a_restarted_app_answers_for_its_jobs_and_follows_them_to_the_end(
    tmp_path: Path,
) -> None:
    store = tmp_path / "jobs.sqlite3"
    token = secrets.token_urlsafe(32)
    sock = bound_socket()
    port = port_of(sock)
    options: dict[str, Any] = {"store": store, "callback_token": token}
    async with Emulator(time_scale=SCALE, seed=51, median_duration=30, duration_sigma=0.05) as emu:
        async with kling_app(emu, sock=sock, **options) as (base, _), aiohttp.ClientSession() as s:
            async with s.post(
                f"{base}/jobs", json=[{"prompt": j, "external_task_id": j} for j in QUICK]
            ) as r:
                assert r.status == 202
            for job_id in QUICK:
                await wait_for_status(s, base, job_id, {"submitted", "processing", "succeed"})
            emu.set_lifecycle(median_duration=1500)  # 1.5 s: these outlive the first app
            async with s.post(
                f"{base}/jobs", json=[{"prompt": j, "external_task_id": j} for j in SLOW]
            ) as r:
                assert r.status == 202
            for job_id in SLOW:
                await wait_for_status(s, base, job_id, {"submitted", "processing"})
            for job_id in QUICK:
                await wait_for_status(s, base, job_id, {"succeed"})
            before = {job_id: await job_view(s, base, job_id) for job_id in QUICK + SLOW}
            async with s.get(f"{base}/jobs/{SLOW[0]}/events") as response:
                async for item in sse_items(response):
                    if isinstance(item, SseEvent):
                        old_id = item.id  # an id of the first app's
                        break
            _, listing = await get_json(s, f"{base}/jobs")
            old_epoch, _ = event_number(listing["last_event_id"])
        # Stopped, with two tasks still running at the emulator.
        now = emu.now()
        for job_id in SLOW:
            assert before[job_id]["status"] in ("submitted", "processing")
            assert emu.tasks[before[job_id]["task_id"]].status_at(now) != "succeed"

        with recorded("uvicorn.access") as access:
            async with (
                kling_app(emu, sock=bound_socket(port), **options) as (again, _),
                aiohttp.ClientSession() as s,
            ):
                assert again == base
                failed = emu.stats.callbacks_failed  # those sent while no app was up failed
                # The old ids answer, as they were.
                for job_id in QUICK:
                    view = await job_view(s, base, job_id)
                    assert {k: view[k] for k in ("status", "task_id", "request", "task")} == {
                        k: before[job_id][k] for k in ("status", "task_id", "request", "task")
                    }
                    # A finished job's stream: its end, at once, then closed.
                    events = await stream(s, f"{base}/jobs/{job_id}/events")
                    assert [e.json()["status"] for e in events] == ["succeed"]
                # The unfinished ones are followed to their end.
                for job_id in SLOW:
                    events = await stream(s, f"{base}/jobs/{job_id}/events")
                    statuses = [e.json()["status"] for e in events]
                    # Where the store left it: at or past what was read before the stop (the
                    # first app polled on until it stopped).
                    assert LIFECYCLE.index(statuses[0]) >= LIFECYCLE.index(
                        before[job_id]["status"]
                    ), (statuses, before[job_id]["status"])
                    assert statuses[-1] == "succeed", statuses
                    assert events[-1].json()["task_id"] == before[job_id]["task_id"]
                    epochs = {event_number(e.id)[0] for e in events}
                    assert epochs != {old_epoch} and len(epochs) == 1  # this app's ids
                # An id of the first app is recognised as such: the job's states as this
                # app knows them (the end included), never a 204 that would hide the end.
                events = await stream(
                    s, f"{base}/jobs/{SLOW[0]}/events", **{"Last-Event-ID": old_id or ""}
                )
                assert events[-1].json()["status"] == "succeed"
                async with s.get(f"{base}/events", params={"after": old_id or ""}) as response:
                    async for item in sse_items(response):
                        assert isinstance(item, SseEvent)
                        assert item.event == "reset"
                        break
                _, listing = await get_json(s, f"{base}/jobs")
                assert [job["id"] for job in listing["jobs"]] == QUICK + SLOW
                # A client retrying its POST across the restart gets the same jobs back.
                retry = [{"prompt": j, "external_task_id": j} for j in QUICK + SLOW]
                async with s.post(f"{base}/jobs", json=retry) as r:
                    assert r.status == 202
                    jobs = (await r.json())["jobs"]
                assert [job["task_id"] for job in jobs] == [
                    before[job_id]["task_id"] for job_id in QUICK + SLOW
                ]
                assert {job["status"] for job in listing["jobs"]} == {"succeed"}

                # The token outlived the restart: the slow tasks' last callbacks, sent to the
                # URL the first app gave, reached this one and were taken.
                async def callbacks_taken() -> list[str] | None:
                    lines = [r.getMessage() for r in access]
                    taken = [line for line in lines if "/callbacks/***" in line and " 200" in line]
                    return taken if len(taken) >= len(SLOW) else None

                await eventually(callbacks_taken, within=10)
                assert emu.stats.callbacks_failed == failed
        assert not [r for r in access if token in r.getMessage()]
    # One task per job, across both apps.
    assert emu.stats.created_per_external_id == dict.fromkeys(QUICK + SLOW, 1)
    assert emu.stats.tasks_created == len(QUICK + SLOW)


async def test_a_job_queued_when_the_app_stops_is_created_once_after_the_restart(
    tmp_path: Path,
) -> None:
    """Jobs still behind the client's limits when the app stops are submitted by the next
    one (looked up first when a create may have gone out): one task each, all the same."""
    store = tmp_path / "jobs.sqlite3"
    ids = [f"queued-{i}" for i in range(6)]
    async with Emulator(time_scale=SCALE, seed=52, median_duration=300) as emu:
        async with (
            kling_app(emu, store=store, max_active_tasks=2, push=False) as (base, _),
            aiohttp.ClientSession() as s,
        ):
            async with s.post(
                f"{base}/jobs", json=[{"prompt": j, "external_task_id": j} for j in ids]
            ) as r:
                assert r.status == 202
            _, listing = await get_json(s, f"{base}/jobs?status=queued")
            assert len(listing["jobs"]) >= 3  # most wait behind the two slots
        async with (
            kling_app(emu, store=store, max_active_tasks=2, push=False) as (base, _),
            aiohttp.ClientSession() as s,
        ):
            for job_id in ids:
                await wait_for_status(s, base, job_id, {"succeed"}, within=30)
    assert emu.stats.created_per_external_id == dict.fromkeys(ids, 1)
