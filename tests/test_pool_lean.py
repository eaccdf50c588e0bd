"""The leaner pool and jobs: the dispatcher, answers reused while unchanged, job memory, GC.

Behaviour only (no timing assertions): every due poll is served, never more than ``pollers``
at once, superseded schedules are skipped, cancellation leaves no task behind; an answer that
did not change gives the same ``Task`` object back (single polls and list pages alike), one
that changed a new one; a job's records stay small; the collector's freezes are undone when
the client closes.
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import kling_async as ka
from kling_async.engine.collector import Collector
from kling_async.engine.durations import LearnedDurations
from kling_async.engine.entry import Entry
from kling_async.engine.jobs import EventHub
from kling_async.engine.pollers import PollerPool
from kling_async.engine.tracker import Tracker
from kling_async.protocol.converter import answer_fingerprint
from kling_async.testing import Emulator

from .conftest import SCALE, client_for

pytestmark = pytest.mark.anyio

LONG = ka.PollPolicy(min_interval=3600.0, max_interval=7200.0, initial_estimate=7200.0)


# --- the answer's fingerprint (pure) ---------------------------------------------------------


def _body(request_id: str, status: str = "processing", *, spaced: bool = True) -> bytes:
    envelope = {
        "code": 0,
        "message": "SUCCEED",
        "request_id": request_id,
        "data": {"task_id": "t-1", "task_status": status, "created_at": 1_700_000_000_000},
    }
    separators = (", ", ": ") if spaced else (",", ":")
    return json.dumps(envelope, separators=separators).encode()


def test_a_fingerprint_leaves_out_the_request_id_and_nothing_else() -> None:
    for spaced in (True, False):
        first = answer_fingerprint(_body("req-1", spaced=spaced))
        assert first is not None
        assert answer_fingerprint(_body("req-2-longer", spaced=spaced)) == first
        assert answer_fingerprint(_body("req-1", "succeed", spaced=spaced)) != first
    # No request id, or one that is not a string: the whole body counts.
    assert answer_fingerprint(b'{"code": 0, "data": {}}') == hash(b'{"code": 0, "data": {}}')
    assert answer_fingerprint(b'{"request_id": 7, "code": 0}') != answer_fingerprint(
        b'{"request_id": 8, "code": 0}'
    )
    # A string value that happens to read "request_id" is no key: nothing is left out.
    assert answer_fingerprint(b'{"message": "request_id", "code": 0}') != answer_fingerprint(
        b'{"message": "request_id", "code": 1}'
    )
    # An id with escapes in it is not worth the risk: no fingerprint (decoded as always).
    assert answer_fingerprint(b'{"request_id": "a\\"b", "code": 0}') is None


# --- answers reused while unchanged ----------------------------------------------------------


async def test_an_unchanged_answer_gives_the_same_task_and_a_changed_one_a_new_task() -> None:
    async with Emulator(time_scale=SCALE, seed=3, median_duration=30.0) as emu:
        async with client_for(emu) as kling:
            created = await kling.text2video.create(ka.Text2VideoRequest(prompt="same"))
            first, known = await kling.text2video.poll(created.task_id)
            assert known is not None
            while True:
                again, fingerprint = await kling.text2video.poll(created.task_id, known, first)
                if fingerprint != known:
                    break  # the task moved on: a new answer, a new task
                assert again is first  # not parsed, not structured: the same object
                await anyio.sleep(0.002)
            assert again is not first
            assert again.task_id == created.task_id
            # Its id is the caller's string, held once.
            task_id = "".join(created.task_id)  # an equal string, another object
            mine, _ = await kling.text2video.poll(task_id)
            assert mine.task_id is task_id
            # Another task's fingerprint never stands for this one.
            other, _ = await kling.text2video.poll(created.task_id, 12345, first)
            assert other is not first


async def test_polls_of_a_running_task_keep_its_snapshot_object() -> None:
    async with Emulator(time_scale=SCALE, seed=4, median_duration=36_000.0) as emu:
        async with client_for(emu, list_sweep=False, poll=ka.PollPolicy().scaled(SCALE)) as kling:
            task = await kling.text2video.create(ka.Text2VideoRequest(prompt="long"))
            job = kling.track(task.task_id)
            with anyio.fail_after(30):
                while job.task is None:
                    await anyio.sleep(0.005)
                first, polls = job.task, kling.stats.polls
                while kling.stats.polls < polls + 3:
                    await anyio.sleep(0.005)
            assert job.task is first  # three answers later: nothing new, nothing rebuilt
            assert job.status is ka.JobStatus.SUBMITTED or job.status is ka.JobStatus.PROCESSING


async def test_an_unchanged_list_page_gives_the_same_tasks() -> None:
    async with Emulator(time_scale=SCALE, seed=5, median_duration=36_000.0) as emu:
        async with client_for(
            emu,
            access_key=emu.access_key,
            secret_key=emu.secret_key,
            list_sweep=True,
        ) as kling:
            created = [
                await kling.text2video.create(ka.Text2VideoRequest(prompt=f"p{i}"))
                for i in range(25)
            ]
            jobs = [kling.track(task.task_id) for task in created]
            with anyio.fail_after(30):
                while any(job.task is None for job in jobs):
                    await anyio.sleep(0.005)
                await _sweeps(kling, 1)
                # Once every task runs, pages stop changing: from then on a sweep gives
                # each job the same snapshot object again.
                while any(job.status is not ka.JobStatus.PROCESSING for job in jobs):
                    await _sweeps(kling, 1)
                await _sweeps(kling, 1)
                seen = [job.task for job in jobs]
                await _sweeps(kling, 2)
            assert all(job.task is task for job, task in zip(jobs, seen, strict=True))
            assert all(job.task is not None and job.task.task_id is job.task_id for job in jobs)


async def _sweeps(kling: ka.KlingClient, n: int) -> None:
    target = kling.stats.sweeps + n
    while kling.stats.sweeps < target:
        await anyio.sleep(0.005)


# --- the pool ----------------------------------------------------------------------------------


async def test_the_pool_polls_every_due_task_never_more_than_pollers_at_once() -> None:
    before = asyncio.all_tasks()
    async with Emulator(time_scale=SCALE, seed=8, median_duration=60.0) as emu:
        async with client_for(emu, list_sweep=False, pollers=3) as kling:
            resource = kling.text2video
            real = resource.poll
            in_flight = peak = 0

            async def counted(*args: Any, **kwargs: Any) -> tuple[ka.Task, int | None]:
                nonlocal in_flight, peak
                in_flight += 1
                peak = max(peak, in_flight)
                try:
                    return await real(*args, **kwargs)
                finally:
                    in_flight -= 1

            resource.poll = counted  # type: ignore[method-assign]
            jobs = kling.submit_many([ka.Text2VideoRequest(prompt=f"clip {i}") for i in range(40)])
            with anyio.fail_after(60):
                async for _ in kling.as_completed(jobs):
                    pass
            assert all(job.status is ka.JobStatus.SUCCEEDED for job in jobs)
            assert 1 <= peak <= 3
            assert kling.stats.polls >= len(jobs)
    # Closed: no poller, timer or waiter of the pool is left behind.
    await anyio.lowlevel.checkpoint()
    assert asyncio.all_tasks() <= before


class _Gate:
    """A task resource whose polls wait at a gate, so a test decides when they answer."""

    def __init__(self) -> None:
        self.gate = anyio.Event()
        self.asked: list[str] = []
        self.in_flight = 0
        self.peak = 0

    async def get(self, task_id: str) -> ka.Task:
        self.asked.append(task_id)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await self.gate.wait()
        finally:
            self.in_flight -= 1
        return ka.Task(task_id=task_id, status=ka.TaskStatus.PROCESSING)


async def _until(condition: Any) -> None:
    with anyio.fail_after(10):
        while not condition():
            await anyio.lowlevel.checkpoint()


async def test_a_busy_pool_holds_due_polls_back_and_skips_superseded_ones() -> None:
    tracker = Tracker(EventHub(), ka.AdaptiveLimit(None), LearnedDurations(LONG))
    answers = _Gate()
    pool = PollerPool(answers, LONG, tracker)  # type: ignore[arg-type]
    jobs = [tracker.track(f"t-{i}") for i in range(6)]  # each due now
    # A schedule made again supersedes the first: t-5 is polled once, not twice.
    pool.poll_now(tracker.entry(jobs[5]))
    async with anyio.create_task_group() as group:
        group.start_soon(pool.run, 2)
        await _until(lambda: answers.in_flight == 2)
        for _ in range(20):
            await anyio.lowlevel.checkpoint()
        assert answers.in_flight == answers.peak == 2  # the other four wait in the heap
        answers.gate.set()
        await _until(lambda: pool.polls == 6 and answers.in_flight == 0)
        for _ in range(20):
            await anyio.lowlevel.checkpoint()
        group.cancel_scope.cancel()
    assert sorted(answers.asked) == sorted(job.id for job in jobs)  # each once
    assert answers.peak == 2
    assert all(job.status is ka.JobStatus.PROCESSING for job in jobs)
    assert pool._timer is None and not pool._idle  # cancelled: nothing armed, none waiting


async def test_a_schedule_made_while_pollers_wait_is_served() -> None:
    tracker = Tracker(EventHub(), ka.AdaptiveLimit(None), LearnedDurations(LONG))
    answers = _Gate()
    answers.gate.set()
    pool = PollerPool(answers, LONG, tracker)  # type: ignore[arg-type]
    async with anyio.create_task_group() as group:
        group.start_soon(pool.run, 3)
        for _ in range(10):
            await anyio.lowlevel.checkpoint()  # every poller waits, nothing armed
        assert len(pool._idle) == 3 and pool._timer is None
        later = tracker.track("later")
        pool._schedule(tracker.entry(later), time.monotonic() + 0.05)  # a timer for it
        now = tracker.track("now")  # due now: handed over at once
        await _until(lambda: answers.asked == ["now"])
        await _until(lambda: answers.asked == ["now", "later"] and later.task is not None)
        group.cancel_scope.cancel()
    assert now.task is not None


# --- job memory ------------------------------------------------------------------------------


def _side_record(entry: Entry) -> object:
    return entry._seldom


def test_a_tracked_job_keeps_its_records_small() -> None:
    tracker = Tracker(EventHub(), ka.AdaptiveLimit(None), LearnedDurations(LONG))
    PollerPool(None, LONG, tracker)  # type: ignore[arg-type]  # never run
    job = tracker.track("t-1")
    entry = tracker.entry(job)
    assert not hasattr(job, "__dict__") and not hasattr(entry, "__dict__")
    task = ka.Task(task_id=job.task_id or "", status=ka.TaskStatus.PROCESSING)
    tracker.snapshot(job, task, time.monotonic())
    tracker.snapshot(job, task, time.monotonic())
    # Nothing hint- or failure-related happened: no side record was made for it.
    assert _side_record(entry) is None
    assert entry.not_found == entry.failures == 0 and entry.hinted_at is None
    entry.failures = 2
    assert _side_record(entry) is not None and entry.failures == 2
    entry.clear_failures()
    assert entry.failures == 0
    # The state updates() starts with is made when asked for, not kept.
    last = job._last
    assert last is not None and last.task is task and last.status is ka.JobStatus.PROCESSING
    assert job.updated_at >= job.created_at and job.ended_at is None


def test_a_known_raw_status_is_held_once() -> None:
    first = ka.Task.from_wire(json.dumps({"task_id": "a", "task_status": "processing"}))
    second = ka.Task.from_wire(json.dumps({"task_id": "b", "task_status": "processing"}))
    assert first.raw_status is second.raw_status
    odd = ka.Task.from_wire(json.dumps({"task_id": "c", "task_status": "thinking"}))
    assert odd.raw_status == "thinking" and odd.status is ka.TaskStatus.UNKNOWN


# --- the collector ---------------------------------------------------------------------------


async def test_many_jobs_are_frozen_out_of_the_collector_until_the_client_closes(
    emu: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Collector, "FREEZE_EVERY", 50)
    assert gc.get_freeze_count() == 0
    try:
        async with client_for(emu) as kling:
            jobs = [kling.track(f"unknown-{i}") for i in range(60)]
            await anyio.lowlevel.checkpoint()
            assert gc.get_freeze_count() > 0
            assert len(jobs) == 60
        assert gc.get_freeze_count() == 0  # the last client that froze unfroze on closing
    finally:
        gc.unfreeze()
        Collector._freezers = 0
