"""What 100,000 tracked jobs hold, kept small without a change anyone can see.

Behaviour only: a task decoded from the wire keeps its timestamps as Unix milliseconds and
still reads, compares, hashes, prints and serialises as one built with the datetimes; a job
whose id is its task id is found by that task id with no index entry of its own; the poller
pool's heap holds each entry once however often it is rescheduled, serves a poll moved up
once, and never polls a job no longer followed.
"""

from __future__ import annotations

import json
import pickle
import time
from datetime import UTC, datetime
from typing import Any

import anyio
import anyio.lowlevel
import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

import kling_async as ka
from kling_async.engine.durations import LearnedDurations
from kling_async.engine.jobs import EventHub
from kling_async.engine.pollers import PollerPool
from kling_async.engine.tracker import Tracker
from kling_async.testing import Emulator

from .conftest import client_for

LONG = ka.PollPolicy(min_interval=3600.0, max_interval=7200.0, initial_estimate=7200.0)
MS = 1_774_711_071_284
MOMENT = datetime(2026, 3, 28, 15, 17, 51, 284000, tzinfo=UTC)


def _wire(**fields: Any) -> ka.Task:
    return ka.Task.from_wire(json.dumps({"task_id": "t-1", "task_status": "processing", **fields}))


def _built(**fields: Any) -> ka.Task:
    return ka.Task(
        task_id="t-1", status=ka.TaskStatus.PROCESSING, raw_status="processing", **fields
    )


# --- a task's timestamps -----------------------------------------------------------------------


def test_a_task_from_the_wire_is_the_task_built_with_its_datetimes() -> None:
    wire = _wire(created_at=MS, updated_at=MS + 1000)
    built = _built(created_at=MOMENT, updated_at=datetime.fromtimestamp((MS + 1000) / 1000, UTC))
    assert wire.created_at == MOMENT and wire.created_at.tzinfo is not None
    assert wire == built and hash(wire) == hash(built)
    assert repr(wire) == repr(built)
    assert wire.to_dict() == built.to_dict()
    assert ka.Task.from_dict(wire.to_dict()) == wire
    assert pickle.loads(pickle.dumps(wire)) == wire  # noqa: S301 (our own bytes)
    assert attrs.evolve(wire, status_message="x").created_at == MOMENT
    assert attrs.asdict(wire)["created_at"] == MOMENT
    assert _wire().created_at is None and _wire(created_at="soon").created_at is None


@given(
    st.integers(-62_135_596_800_000, 253_402_300_798_999)
    | st.floats(0, 253_402_300_798_999)
    | st.integers(0, 253_402_300_798_999).map(str)
)
def test_any_wire_instant_reads_as_the_datetime_it_stands_for(millis: int | float | str) -> None:
    task = _wire(created_at=millis, updated_at=millis)
    expected = datetime.fromtimestamp(float(millis) / 1000, UTC)
    assert task.created_at == task.updated_at == expected
    assert task == _built(created_at=expected, updated_at=expected)
    assert ka.Task.from_dict(task.to_dict()) == task


def test_a_timestamp_given_as_something_else_is_kept_as_given() -> None:
    for odd in (5.0, 7, "soon"):
        task = _built(created_at=odd)  # not what the annotation says, but kept as ever
        given: Any = task.created_at
        assert given == odd and type(given) is type(odd)
        assert ka.Task(**attrs.asdict(task, recurse=False)) == task


def test_tasks_of_one_instant_share_its_number() -> None:
    first, second = _wire(created_at=MS, updated_at=MS), _wire(created_at=MS)
    raw = type(first).__dict__["created_at"]._slot  # the slot under the timestamp
    assert (
        raw.__get__(first)
        is raw.__get__(second)
        is type(first).__dict__["updated_at"]._slot.__get__(first)
    )


# --- finding a job by its task id --------------------------------------------------------------


def _tracker() -> tuple[Tracker, PollerPool]:
    tracker = Tracker(EventHub(), ka.AdaptiveLimit(None), LearnedDurations(LONG))
    return tracker, PollerPool(None, LONG, tracker)  # type: ignore[arg-type]  # never run


def test_a_tracked_job_is_found_by_its_task_id_without_an_entry_of_its_own() -> None:
    tracker, _ = _tracker()
    job = tracker.track("t-1")
    assert tracker.find("t-1") is job and tracker.by_task.get("t-1") is job
    assert tracker.by_task._named == {}  # ``jobs`` holds it already
    task = ka.Task(task_id="t-1", status=ka.TaskStatus.PROCESSING)
    assert tracker.observe(task, confirmed=True) is job and job.task is task
    # A job whose id is some task's id, but not its own task's, is no answer for that task.
    queued = tracker.queued(ka.Text2VideoRequest(prompt="p", external_task_id="t-9"))
    assert tracker.by_task.get("t-9") is None and tracker.find("t-9") is queued
    assert tracker.by_task.get("nowhere") is None


def test_the_job_that_created_a_tracked_task_is_the_one_its_task_id_names() -> None:
    tracker, _ = _tracker()
    tracked = tracker.track("t-5")
    creator = tracker.queued(ka.Text2VideoRequest(prompt="p", external_task_id="j-5"))
    task = ka.Task(task_id="t-5", status=ka.TaskStatus.SUBMITTED)
    tracker.created(creator, task, time.monotonic(), possible_duplicate=False)
    assert tracker.by_task.get("t-5") is creator  # as when it was assigned last
    assert tracker.find("t-5") is tracked  # a job's own id comes first, as ever
    assert tracker.find("j-5") is creator


@pytest.mark.anyio
async def test_kling_job_finds_tracked_and_submitted_jobs_by_task_id(emu: Emulator) -> None:
    async with client_for(emu) as kling:
        task = await kling.text2video.create(ka.Text2VideoRequest(prompt="elsewhere"))
        tracked = kling.track(task.task_id)
        assert kling.job(task.task_id) is tracked
        submitted = kling.submit(ka.Text2VideoRequest(prompt="here"))
        with anyio.fail_after(30):
            while submitted.task_id is None:
                await anyio.sleep(0.005)
        assert kling.job(submitted.task_id) is submitted is kling.job(submitted.id)
        await submitted.wait()
        assert kling.job(submitted.task_id) is submitted


# --- the poller pool's heap --------------------------------------------------------------------


class _Answers:
    """A task resource that answers every poll at once, and remembers them."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def get(self, task_id: str) -> ka.Task:
        self.asked.append(task_id)
        return ka.Task(task_id=task_id, status=ka.TaskStatus.PROCESSING)


def test_rescheduling_a_waiting_poll_adds_nothing_to_the_heap() -> None:
    tracker, pool = _tracker()
    entries = [tracker.entry(tracker.track(f"t-{i}")) for i in range(3)]
    now = time.monotonic()
    for step in range(1, 51):
        for entry in entries:
            pool._schedule(entry, now + step)  # each later than the last: put off
    assert len(pool._heap) == 3
    assert all(pool.scheduled(entry) == now + 50 for entry in entries)
    key = entries[0].heap_key  # the instant it is filed under: its first poll's (the track)
    assert key is not None and key < now + 1
    pool._schedule(entries[0], key - 1)  # moved up past it: one item for that
    assert pool.scheduled(entries[0]) == key - 1 and len(pool._heap) == 4
    pool._schedule(entries[0], now + 2)  # put off again: that item is void, none is added
    assert pool.scheduled(entries[0]) == now + 2 and len(pool._heap) == 4


@pytest.mark.anyio
async def test_a_poll_moved_up_is_served_then_and_not_again_at_the_old_instant() -> None:
    tracker, _ = _tracker()
    answers = _Answers()
    pool = PollerPool(answers, LONG, tracker)  # type: ignore[arg-type]
    job = tracker.track("a")
    entry = tracker.entry(job)
    async with anyio.create_task_group() as group:
        group.start_soon(pool.run, 2)
        with anyio.fail_after(10):
            while answers.asked != ["a"]:
                await anyio.lowlevel.checkpoint()
        assert pool.scheduled(entry) is not None  # the next poll, an hour away
        pool._schedule(entry, time.monotonic() + 0.06)  # in the heap under this key...
        pool._schedule(entry, time.monotonic() + 0.01)  # ...and moved up
        with anyio.fail_after(10):
            while len(answers.asked) < 2:
                await anyio.lowlevel.checkpoint()
        await anyio.sleep(0.1)  # past the old key: the entry comes up and goes back in
        group.cancel_scope.cancel()
    assert answers.asked == ["a", "a"]
    due = pool.scheduled(entry)
    assert due is not None and due > time.monotonic() + 60  # the next one, far away again


@pytest.mark.anyio
async def test_a_job_no_longer_followed_is_not_polled() -> None:
    tracker, _ = _tracker()
    answers = _Answers()
    pool = PollerPool(answers, LONG, tracker)  # type: ignore[arg-type]
    kept, dropped = tracker.track("kept"), tracker.track("dropped")
    tracker.disown(dropped)  # another client owns it now: its poll, due now, is void
    async with anyio.create_task_group() as group:
        group.start_soon(pool.run, 2)
        with anyio.fail_after(10):
            while answers.asked != ["kept"]:
                await anyio.lowlevel.checkpoint()
        for _ in range(20):
            await anyio.lowlevel.checkpoint()
        group.cancel_scope.cancel()
    assert answers.asked == ["kept"] and kept.task is not None and dropped.task is None


def test_a_timestamp_too_large_for_a_float_reads_as_unknown() -> None:
    """Callback bodies come from outside: an instant no float holds is unknown, as any other
    malformed timestamp, never an OverflowError out of the decoder."""
    for value in (10**400, -(10**400), str(10**400)):
        task = ka.Task.from_wire(
            {"task_id": "t-1", "task_status": "submitted", "created_at": value}
        )
        assert task.created_at is None
