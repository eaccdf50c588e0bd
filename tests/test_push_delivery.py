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
from kling_async.engine.jobs import EventHub, Job
from kling_async.engine.pollers import PollerPool
from kling_async.engine.tracker import Entry, Tracker
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


def _hinted_pool() -> tuple[Tracker, PollerPool, Job, Entry, ka.PollPolicy]:
    policy = ka.PollPolicy(
        min_interval=1.0,
        max_interval=60.0,
        initial_estimate=30.0,
        jitter=0.0,
        safety_interval=300.0,
    )
    tracker = Tracker(EventHub(), ka.AdaptiveLimit(None), LearnedDurations(policy))
    pool = PollerPool(None, policy, tracker)  # type: ignore[arg-type]  # never run: no requests
    job = tracker.track("t-1")
    return tracker, pool, job, tracker.entry(job), policy


def _next_due(pool: PollerPool, entry: Entry) -> float:
    due = pool.scheduled(entry)
    assert due is not None
    return due - time.monotonic()


RUNNING = ka.Task(task_id="t-1", status=ka.TaskStatus.PROCESSING)
ENDED = ka.Task(task_id="t-1", status=ka.TaskStatus.SUCCEEDED)


def test_while_hints_come_the_pollers_keep_only_a_safety_net_poll() -> None:
    tracker, pool, job, entry, policy = _hinted_pool()
    tracker.snapshot(job, RUNNING, time.monotonic())
    assert _next_due(pool, entry) < policy.max_interval  # the learned plan polls sooner
    # A callback that claims no end costs no request: the planned poll becomes the net.
    assert tracker.observe(RUNNING, confirmed=False) is job
    assert _next_due(pool, entry) >= policy.safety_interval * 0.99
    tracker.snapshot(job, RUNNING, time.monotonic())  # the net's poll
    assert _next_due(pool, entry) >= policy.safety_interval * 0.99


def test_a_hint_of_an_end_is_confirmed_at_once_but_at_most_once_per_min_interval() -> None:
    tracker, pool, job, entry, policy = _hinted_pool()
    tracker.snapshot(job, RUNNING, time.monotonic())
    assert tracker.observe(ENDED, confirmed=False) is job
    assert _next_due(pool, entry) <= 0.01  # confirmed by a poll now
    assert job.status is ka.JobStatus.PROCESSING  # the hint itself changed nothing
    entry.unconfirmed = False  # (the poll goes out: what it sees answers the hint)
    tracker.snapshot(job, RUNNING, time.monotonic())  # it was a lie (or early)
    assert _next_due(pool, entry) >= policy.safety_interval * 0.99
    # A flood of the same claim costs one poll per min_interval, not one per callback.
    for _ in range(1000):
        tracker.observe(ENDED, confirmed=False)
    assert 0.5 * policy.min_interval <= _next_due(pool, entry) <= policy.min_interval
    # Out of order: a late "processing" never puts off the confirmation already due.
    tracker.observe(RUNNING, confirmed=False)
    assert _next_due(pool, entry) <= policy.min_interval


def test_a_hint_of_an_end_during_a_poll_is_looked_at_again() -> None:
    tracker, pool, job, entry, policy = _hinted_pool()
    tracker.snapshot(job, RUNNING, time.monotonic())
    entry.unconfirmed = False  # a poll went out...
    tracker.observe(ENDED, confirmed=False)  # ...the task ended and its callback came...
    tracker.snapshot(job, RUNNING, time.monotonic())  # ...then the poll's older answer
    assert _next_due(pool, entry) <= policy.min_interval  # looked at again, not in 300 s


def test_the_safety_interval_is_checked_and_scaled() -> None:
    assert ka.PollPolicy().safety_interval == 300.0
    assert ka.PollPolicy().scaled(0.01).safety_interval == pytest.approx(3.0)
    with pytest.raises(ValueError, match="safety_interval"):
        ka.PollPolicy(safety_interval=0)


def test_a_flood_of_hints_never_puts_off_the_confirmation_already_due() -> None:
    tracker, _pool, job, entry, _policy = _hinted_pool()
    tracker.snapshot(job, RUNNING, time.monotonic())
    tracker.observe(ENDED, confirmed=False)
    due = entry.due  # the confirming poll, due now, not yet served
    token = entry.poll_token
    for _ in range(100):
        time.sleep(0.0001)
        tracker.observe(ENDED, confirmed=False)
    assert (entry.due, entry.poll_token) == (due, token)  # still the first one, still due
