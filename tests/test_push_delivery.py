"""Push delivery, on the SDK's side: a client-wide ``callback_url`` on every create (never in a
job's request, so no store keeps its secret), ``Task.from_wire`` for callback bodies, and the
safety-net schedule while callbacks come."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest
from aiohttp import web

import kling_async as ka
from kling_async.engine.durations import LearnedDurations
from kling_async.engine.jobs import EventHub
from kling_async.engine.pollers import PollerPool
from kling_async.engine.tracker import Tracker
from kling_async.testing import Emulator

from .conftest import SCALE, client_for

pytestmark = pytest.mark.anyio

TOKEN = "cb-secret-7f3a"


class Receiver:
    """A callback endpoint on 127.0.0.1 that hands each body to ``kling.observe`` as a hint."""

    def __init__(self) -> None:
        self.kling: ka.KlingClient | None = None
        self.bodies: list[bytes] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.bodies.append(body)
        if self.kling is not None:
            self.kling.observe(ka.Task.from_wire(body))
        return web.Response(status=204)


@asynccontextmanager
async def receiver() -> AsyncIterator[Receiver]:
    hook = Receiver()
    app = web.Application()
    app.router.add_post(f"/callbacks/{TOKEN}", hook.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        hook.url = f"http://127.0.0.1:{runner.addresses[0][1]}/callbacks/{TOKEN}"
        yield hook
    finally:
        await runner.cleanup()


async def test_every_create_carries_the_client_callback_url_and_no_store_keeps_it() -> None:
    store = ka.MemoryJobStore()
    async with receiver() as hook, Emulator(time_scale=SCALE, seed=41) as emu:
        async with client_for(emu, callback_url=hook.url, store=store) as kling:
            hook.kling = kling
            jobs = kling.submit_many([ka.Text2VideoRequest(prompt=f"c{i}") for i in range(4)])
            with anyio.fail_after(30):
                async for _ in kling.as_completed(jobs):
                    pass
            assert all(job.status is ka.JobStatus.SUCCEEDED for job in jobs)
            with anyio.fail_after(10):
                while len(hook.bodies) < len(jobs):
                    await anyio.sleep(0.01)
        seen = {json.loads(body)["task_id"] for body in hook.bodies}
        assert {job.task_id for job in jobs} <= seen  # the emulator called back for each
        assert all(job.request is not None and job.request.callback_url is None for job in jobs)
        for record in await store.load():
            assert TOKEN not in repr(record)
            assert record.request is not None
            assert TOKEN not in json.dumps(record.request.to_dict())
        assert all(TOKEN not in json.dumps(job.to_dict()) for job in jobs)


async def test_a_request_with_its_own_callback_url_keeps_it() -> None:
    async with receiver() as mine, receiver() as default:
        async with Emulator(time_scale=SCALE, seed=42) as emu:
            async with client_for(emu, callback_url=default.url) as kling:
                job = kling.submit(ka.Text2VideoRequest(prompt="mine", callback_url=mine.url))
                await job.wait()
                with anyio.fail_after(10):
                    while not mine.bodies:
                        await anyio.sleep(0.01)
        assert default.bodies == []


def test_a_bad_client_callback_url_is_refused_without_quoting_it() -> None:
    with pytest.raises(ka.ValidationError, match="callback_url") as info:
        ka.KlingClient(api_key="sk-x", callback_url=f"ftp://hooks.example/{TOKEN}")
    assert TOKEN not in str(info.value)


def test_from_wire_decodes_a_callback_body_in_every_form() -> None:
    body = {
        "task_id": "t-9",
        "task_status": "succeed",
        "task_info": {"external_task_id": "j-9"},
        "task_result": {
            "videos": [{"id": "v", "url": "https://cdn.example/v.mp4", "duration": "5"}]
        },
        "created_at": 1_700_000_000_000,
        "updated_at": 1_700_000_060_000,
    }
    raw = json.dumps(body)
    for form in (body, raw, raw.encode()):
        task = ka.Task.from_wire(form)
        assert (task.task_id, task.status, task.external_task_id) == ("t-9", "succeed", "j-9")
        assert task.videos[0].duration == 5.0
    for garbage in (b"<html>no</html>", "", b"[1, 2]", {"task_status": "succeed"}):
        with pytest.raises(ka.ResponseDecodeError):
            ka.Task.from_wire(garbage)


def test_while_hints_come_the_pollers_keep_only_a_safety_net_poll() -> None:
    policy = ka.PollPolicy(min_interval=1.0, max_interval=60.0, initial_estimate=30.0, jitter=0.0)
    slots = ka.AdaptiveLimit(None)
    tracker = Tracker(EventHub(), slots, LearnedDurations(policy))
    pool = PollerPool(None, policy, tracker)  # type: ignore[arg-type]  # never run: no requests
    job = tracker.track("t-1")
    entry = tracker.entry(job)
    running = ka.Task(task_id="t-1", status=ka.TaskStatus.PROCESSING)

    def next_due() -> float:
        due = [item[0] for item in pool._heap if item[3] is entry and item[2] == entry.poll_token]
        assert len(due) == 1
        return due[0] - time.monotonic()

    tracker.snapshot(job, running, time.monotonic())
    planned = next_due()
    assert planned < policy.max_interval  # the learned plan polls sooner than the net
    assert tracker.observe(running, confirmed=False) is job  # a callback: polled at once
    assert next_due() <= 0.01
    tracker.snapshot(job, running, time.monotonic())  # the confirming poll
    assert next_due() >= policy.max_interval * 0.99  # only the safety net until the next hint
