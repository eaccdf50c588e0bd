"""One lifecycle owner (issue 8, item 2): random interleavings never leak or double a slot.

Two state machines drive the engine's one owner of a job's life, :class:`Tracker`:

- :class:`TrackerMachine`, many fast examples with no network: a real tracker, a real
  :class:`AdaptiveLimit`, :class:`LearnedDurations`, :class:`EventHub` and a
  :class:`PollerPool` whose resource must never be called. Its rules make the calls the
  submitter, the pollers and the client make (create outcomes, tracks, polls and sweeps,
  outside observations, poll failures, rejections, the client closing), in any order the
  engine allows, and after every step it checks the slots, the followed set and every job's
  event stream against a small model of where each job stands.
- :func:`test_client_lifecycle_against_the_emulator`, fewer examples: a whole client against
  the emulator (scaled clock, a small concurrency limit, seeded faults at low rates), with
  actions drawn as a list and run in order in one event loop, judged by the emulator's
  ground truth.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import aiohttp.web
import anyio
import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import kling_async as ka
from kling_async.engine.durations import LearnedDurations
from kling_async.engine.jobs import EventHub, Job, JobEvent, JobStatus
from kling_async.engine.limits import AdaptiveLimit
from kling_async.engine.pollers import PollerPool
from kling_async.engine.tracker import Tracker
from kling_async.http.resources import TaskResource
from kling_async.testing import Emulator, FaultKind, Faults

# --- what "forward" means ---------------------------------------------------------------------

#: How far along each status is, as the design states it (queued, submitting, the task's
#: statuses, the end). Written out here rather than read from the engine, so the test judges it.
RANK = {
    JobStatus.QUEUED: 0,
    JobStatus.SUBMITTING: 1,
    JobStatus.SUBMITTED: 2,
    JobStatus.PROCESSING: 3,
    JobStatus.UNKNOWN: 3,
    JobStatus.SUCCEEDED: 4,
    JobStatus.FAILED: 4,
    JobStatus.ERROR: 4,
}


#: Statuses of one rank the engine cannot order: a status Kling added after this SDK may come
#: before or after ``processing``. A change between them is allowed here both ways (but see
#: test_a_stale_processing_never_follows_a_newer_status, which pins the step back).
SIDEWAYS = {JobStatus.PROCESSING, JobStatus.UNKNOWN}


def check_forward(job_id: str, statuses: list[JobStatus], *, sideways: bool = True) -> None:
    """``statuses`` (one job's events, in order) only move forward: each one ranks above the
    one before, except the documented step back of a create that is retried (submitting ->
    queued) and, with ``sideways``, a change between ``processing`` and ``unknown``; a
    terminal status comes at most once, and last."""
    for before, after in zip(statuses, statuses[1:], strict=False):
        retried = (before, after) == (JobStatus.SUBMITTING, JobStatus.QUEUED)
        aside = sideways and {before, after} == SIDEWAYS
        assert retried or aside or RANK[after] > RANK[before], (
            f"job {job_id}: {before.value} -> {after.value} is not forward in {statuses}"
        )
    terminal = [s for s in statuses if s.is_terminal]
    assert len(terminal) <= 1, f"job {job_id}: more than one terminal event in {statuses}"
    assert not terminal or statuses[-1].is_terminal, f"job {job_id}: events after the end"


class ErrorRecords(logging.Handler):
    """Keeps the ERROR records of the ``kling_async`` logger (the limiter logs a slot taken
    or released twice at ERROR)."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def error_records() -> Iterator[ErrorRecords]:
    logger = logging.getLogger("kling_async")
    handler = ErrorRecords()
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


# --- the tracker machine ----------------------------------------------------------------------


class NeverCalled:
    """The poller pool's resource: the pool's ``run`` never starts, so nothing may touch it."""

    def __getattr__(self, name: str) -> NoReturn:
        raise AssertionError(f"the tracker-level machine made a request ({name})")


def as_resource(value: object) -> TaskResource:
    return value  # type: ignore[return-value]


class Phase(enum.Enum):
    """Where the model says a job stands, in the submitter's terms."""

    QUEUED = "queued"  # in the submitter's queue, no slot
    SLOTTED = "slotted"  # took a slot, its create not yet under way
    IN_FLIGHT = "in flight"  # submitting: the create is out
    LANDED = "landed"  # created, not visible yet: a finder looks for it, holding the slot
    FOLLOWED = "followed"  # has a task the pollers follow
    ENDED = "ended"


SUBMITTER_PHASES = (Phase.QUEUED, Phase.SLOTTED, Phase.IN_FLIGHT, Phase.LANDED)
HOLDS_SLOT = {Phase.SLOTTED, Phase.IN_FLIGHT, Phase.LANDED, Phase.FOLLOWED}

ANY_STATUS = st.sampled_from(list(ka.TaskStatus))
ERRORS = st.sampled_from(
    [
        ka.TaskNotFoundError("task not found", code=1203, http_status=404),
        ka.ServerError("server error", code=5000, http_status=500),
        ka.AuthenticationError("bad key", code=1000, http_status=401),
        ka.TransportError("connection reset", request_sent=True),
        ka.AmbiguousSubmissionError("job-x"),
    ]
)


@attrs.define(eq=False)
class Seen:
    """One job, as the test knows it: the model's phase, what its iterators showed."""

    job: Job
    phase: Phase
    tracked: bool
    updates: list[JobStatus] = attrs.Factory(list)
    #: The updates() consumer finished (its iterator ended).
    finished: bool = False


class TrackerMachine(RuleBasedStateMachine):
    """See the module docstring. Rules are synchronous calls, as the submitter and the pollers
    make them; the few tracker methods that are ``async`` (taking a slot, ``submitting``)
    and the iterator consumers run on one event loop per example (``asyncio.Runner``)."""

    def __init__(self) -> None:
        super().__init__()
        self._runner = asyncio.Runner()
        self._runner.__enter__()
        self._errors_cm = error_records()
        self.errors = self._errors_cm.__enter__()
        self.seen: list[Seen] = []
        self.hub_seen: dict[Job, list[JobStatus]] = {}
        self.hub_finished = False
        self.closed = False
        self.counter = 0
        self._consumers: list[asyncio.Task[None]] = []

    # -- plumbing --

    def run(self, coro: Any) -> Any:
        return self._runner.run(coro)

    def settle(self) -> None:
        """Let the iterator consumers take what was pushed to them (a few turns of the loop:
        a woken consumer drains its buffer in one go)."""
        self.run(_turns(5))

    def start(self, coro: Any) -> None:
        self._consumers.append(self._runner.get_loop().create_task(coro))

    def next_id(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}-{self.counter}"

    async def _consume_updates(self, seen: Seen) -> None:
        async for event in seen.job.updates():
            seen.updates.append(event.status)
        seen.finished = True

    async def _consume_hub(self, events: Any) -> None:
        async for event in events:
            assert isinstance(event, JobEvent)
            self.hub_seen.setdefault(event.job, []).append(event.status)
        self.hub_finished = True

    def add(self, job: Job, phase: Phase, *, tracked: bool) -> Seen:
        seen = Seen(job, phase, tracked)
        self.seen.append(seen)
        self.start(self._consume_updates(seen))
        return seen

    def task_for(self, seen: Seen, status: ka.TaskStatus, **extra: Any) -> ka.Task:
        task_id = seen.job.task_id or self.next_id("task")
        return ka.Task(
            task_id=task_id,
            status=status,
            external_task_id=None if seen.tracked else seen.job.id,
            **extra,
        )

    def in_phase(self, *phases: Phase) -> list[Seen]:
        return [s for s in self.seen if s.phase in phases]

    def with_task(self) -> list[Seen]:
        return [s for s in self.seen if s.job.task_id is not None]

    def after_snapshot(self, seen: Seen, status: ka.TaskStatus) -> None:
        """The model's view of a followed job after a confirmed snapshot of ``status``."""
        if status.is_terminal:
            seen.phase = Phase.ENDED

    # -- setup --

    @initialize(ceiling=st.none() | st.integers(1, 4), closes=st.booleans())
    def setup(self, ceiling: int | None, closes: bool) -> None:
        """A ceiling for the slots (None: unknown); whether the client closes at the end of
        the run (mid-flight, whatever each job is doing), or every job is driven to its end."""
        self.closes = closes
        policy = ka.PollPolicy().scaled(0.001)
        tiny = ka.RetryPolicy(initial=1e-6, maximum=1e-6)
        self.hub = EventHub()
        self.slots = AdaptiveLimit(ceiling, retry=tiny, probe_period=math.inf)
        self.tracker = Tracker(self.hub, self.slots, LearnedDurations(policy))
        self.pool = PollerPool(as_resource(NeverCalled()), policy, self.tracker)
        self.start(self._consume_hub(self.hub.events()))

    # -- the submitter's calls --

    @rule()
    def queue_job(self) -> None:
        request = ka.Text2VideoRequest(prompt="a cat", external_task_id=self.next_id("job"))
        self.add(self.tracker.queued(request), Phase.QUEUED, tracked=False)

    def slot_free(self) -> bool:
        """Would the limiter let one more create through now (so taking it does not wait)?"""
        return self.slots.active < self.slots.limit and self.slots.not_before <= time.monotonic()

    STEP = {
        "data": st.data(),
        "status": ANY_STATUS,
        "possible_duplicate": st.booleans(),
        "error": ERRORS,
    }

    @rule(**STEP)
    def submitter_step(
        self,
        data: st.DataObject,
        status: ka.TaskStatus,
        possible_duplicate: bool,
        error: Exception,
    ) -> None:
        """A queued job takes a slot (if one is free) or is rejected; a job holding one
        starts its create (``submitting``) or meets an account stopped meanwhile."""
        self.step(data, (Phase.QUEUED, Phase.SLOTTED), status, possible_duplicate, error)

    @rule(**STEP)
    def create_answered(
        self,
        data: st.DataObject,
        status: ka.TaskStatus,
        possible_duplicate: bool,
        error: Exception,
    ) -> None:
        """A create is answered (created, landed unseen, 1303, an outcome that queues it again,
        an error that ends it), or the finder of a landed create finds its task or gives up."""
        self.step(data, (Phase.IN_FLIGHT, Phase.LANDED), status, possible_duplicate, error)

    def step(
        self,
        data: st.DataObject,
        phases: tuple[Phase, ...],
        status: ka.TaskStatus,
        possible_duplicate: bool,
        error: Exception,
    ) -> None:
        """The next step of one job on its way to a task, as the submitter takes it."""
        if not (candidates := self.in_phase(*phases)):
            return
        seen = data.draw(st.sampled_from(candidates))
        if seen.phase is Phase.QUEUED:
            choices = ["take a slot", "reject"] if self.slot_free() else ["reject"]
        elif seen.phase is Phase.SLOTTED:
            choices = ["submitting", "account stopped"]
        elif seen.phase is Phase.IN_FLIGHT:
            choices = ["created", "landed", "refused 1303", "requeue", "reject"]
        else:
            choices = ["found", "lost"]
        step = data.draw(st.sampled_from(choices), label="step")
        getattr(self, "_" + step.replace(" ", "_"))(seen, status, possible_duplicate, error)

    def _take_a_slot(self, seen: Seen, *_: Any) -> None:
        self.run(_at_once(self.tracker.take_slot(seen.job)))
        seen.phase = Phase.SLOTTED

    def _reject(self, seen: Seen, _status: Any, _dup: Any, error: Exception) -> None:
        """A queued job ends without a create (the account stopped, the host unreachable),
        or a create's answer ends it (a lasting ambiguity, an error)."""
        if seen.phase is Phase.IN_FLIGHT:
            self.tracker.answered(seen.job, "failed")
        self.tracker.reject(seen.job, error)
        seen.phase = Phase.ENDED
        assert seen.job.error is error

    def _submitting(self, seen: Seen, *_: Any) -> None:
        self.run(self.tracker.submitting(seen.job))
        seen.phase = Phase.IN_FLIGHT

    def _account_stopped(self, seen: Seen, *_: Any) -> None:
        """The account was stopped while this job waited for its slot: slot back, job ends."""
        self.tracker.answered(seen.job, "failed")
        self.tracker.reject(seen.job, ka.AccountError("stopped", code=1102, http_status=429))
        seen.phase = Phase.ENDED

    def _created(self, seen: Seen, status: ka.TaskStatus, dup: bool, _error: Any) -> None:
        """The create's task is seen (its first snapshot may already be the end)."""
        job = seen.job
        self.tracker.answered(job, "created")
        task = self.task_for(seen, status)
        self.tracker.created(job, task, time.monotonic(), possible_duplicate=dup)
        seen.phase = Phase.ENDED if status.is_terminal else Phase.FOLLOWED
        assert job.task_id == task.task_id
        assert job.task is task
        assert job.possible_duplicate is dup

    def _landed(self, seen: Seen, *_: Any) -> None:
        """Created but not visible yet: a finder looks for it, the slot stays held."""
        self.tracker.answered(seen.job, "landed")
        seen.phase = Phase.LANDED

    def _refused_1303(self, seen: Seen, *_: Any) -> None:
        self.tracker.answered(seen.job, "refused")
        self.tracker.requeued(seen.job)
        seen.phase = Phase.QUEUED
        assert seen.job.status is JobStatus.QUEUED

    def _requeue(self, seen: Seen, *_: Any) -> None:
        """An ambiguity to look up later, a throttle, a create that provably never left."""
        self.tracker.answered(seen.job, "failed")
        self.tracker.requeued(seen.job)
        seen.phase = Phase.QUEUED
        assert seen.job.status is JobStatus.QUEUED

    def _found(self, seen: Seen, status: ka.TaskStatus, *_: Any) -> None:
        task = self.task_for(seen, status)
        self.tracker.created(seen.job, task, time.monotonic(), possible_duplicate=False)
        seen.phase = Phase.ENDED if status.is_terminal else Phase.FOLLOWED

    def _lost(self, seen: Seen, *_: Any) -> None:
        self.tracker.reject(seen.job, ka.AmbiguousSubmissionError(seen.job.id))
        seen.phase = Phase.ENDED

    # -- the client's calls --

    @rule(data=st.data(), known=st.booleans())
    def track(self, data: st.DataObject, known: bool) -> None:
        """``kling.track(task_id)``: a new task holds a slot and is followed; a known one gives
        its job back as it is, whether it runs or ended."""
        with_task = self.with_task()
        if known and with_task:
            seen = data.draw(st.sampled_from(with_task))
            assert seen.job.task_id is not None
            before = (self.slots.active, seen.job.status)
            assert self.tracker.track(seen.job.task_id) is seen.job
            assert (self.slots.active, seen.job.status) == before
            return
        job = self.tracker.track(self.next_id("task"))
        self.add(job, Phase.FOLLOWED, tracked=True)

    # -- what the pollers saw --

    @rule(data=st.data(), status=ANY_STATUS)
    def poll_or_sweep_answered(self, data: st.DataObject, status: ka.TaskStatus) -> None:
        """A snapshot from a poll or a list sweep, of any status (a stale one too: a lower
        status after a higher), and for a job that ended already (a poll and a sweep can both
        see the end): it moves a followed job forward or changes nothing."""
        if not (candidates := self.with_task()):
            return
        seen = data.draw(st.sampled_from(candidates))
        job = seen.job
        before = (job.status, job.task)
        task = self.task_for(seen, status)
        self.tracker.snapshot(job, task, time.monotonic())
        if seen.phase is not Phase.FOLLOWED:
            assert (job.status, job.task) == before
            return
        if RANK[JobStatus.of(status)] < RANK[before[0]]:
            assert (job.status, job.task) == before  # stale: ignored
        else:
            assert job.status is JobStatus.of(status)
            assert job.task is task
        self.after_snapshot(seen, status)

    @rule(data=st.data(), error=ERRORS)
    def poll_failed(self, data: st.DataObject, error: Exception) -> None:
        """The pollers give a job up (``fail``): a followed one ends with the error, keeping
        its task; one that ended already stays as it ended."""
        if not (candidates := self.with_task()):
            return
        seen = data.draw(st.sampled_from(candidates))
        job = seen.job
        before = (job.status, job.error, job.task)
        self.tracker.fail(job, error)
        if seen.phase is Phase.FOLLOWED:
            assert (job.status, job.error, job.task) == (JobStatus.ERROR, error, before[2])
            seen.phase = Phase.ENDED
        else:
            assert (job.status, job.error, job.task) == before

    # -- what the outside saw --

    @rule(data=st.data(), status=ANY_STATUS, confirmed=st.booleans(), stranger=st.booleans())
    def observed(
        self, data: st.DataObject, status: ka.TaskStatus, confirmed: bool, stranger: bool
    ) -> None:
        """``kling.observe(task, confirmed=...)``. Unconfirmed (a callback body: here a forged
        ``succeed`` with someone else's URL, or any other status) it changes nothing but the
        job's next poll; confirmed it moves a followed job like a poll. A task no followed job
        has (ended, unknown) is not this client's concern: None."""
        with_task = self.with_task()
        if stranger or not with_task:
            task = ka.Task(task_id=self.next_id("stranger"), status=status)
            assert self.tracker.observe(task, confirmed=confirmed) is None
            return
        seen = data.draw(st.sampled_from(with_task))
        job = seen.job
        forged = () if confirmed else (ka.Video(id="v", url="http://forged.test/x.mp4"),)
        task = self.task_for(seen, status, videos=forged)
        before = (job.status, job.task, job.error, self.slots.active, len(seen.updates))
        answer = self.tracker.observe(task, confirmed=confirmed)
        assert answer is (job if seen.phase is Phase.FOLLOWED else None)
        if not confirmed or seen.phase is not Phase.FOLLOWED:
            self.settle()
            after = (job.status, job.task, job.error, self.slots.active, len(seen.updates))
            assert after == before
            return
        if RANK[JobStatus.of(status)] >= RANK[before[0]]:
            assert job.task is task
        self.after_snapshot(seen, status)

    # -- invariants --

    @invariant()
    def slots_are_owned_once(self) -> None:
        if not hasattr(self, "slots"):
            return
        holders = [s for s in self.seen if self.tracker.entry(s.job).holds_slot]
        assert self.slots.active >= 0
        assert self.slots.active == len(holders), (
            f"{self.slots.active} slots held, {len(holders)} jobs hold one"
        )
        for seen in self.seen:
            holds = self.tracker.entry(seen.job).holds_slot
            assert seen.job.done == (seen.phase is Phase.ENDED), (
                f"job {seen.job.id} is {seen.job.status.value}, the model says {seen.phase.value}"
            )
            assert holds == (seen.phase in HOLDS_SLOT), (
                f"job {seen.job.id} ({seen.phase.value}) holds_slot={holds}"
            )
        assert not self.errors.records, [r.getMessage() for r in self.errors.records]

    @invariant()
    def followed_are_the_running_tasks(self) -> None:
        if not hasattr(self, "slots"):
            return
        followed = {s.job for s in self.in_phase(Phase.FOLLOWED)}
        assert set(self.tracker.following.values()) == followed
        for task_id, job in self.tracker.following.items():
            assert job.task_id == task_id

    @invariant()
    def events_move_forward(self) -> None:
        if not hasattr(self, "slots"):
            return
        self.settle()
        for seen in self.seen:
            check_forward(seen.job.id, seen.updates)
            hub = self.hub_seen.get(seen.job, [])
            check_forward(seen.job.id, hub)
            if not self.closed:
                # Nothing dropped: both streams caught up with the job, and agree.
                assert seen.updates[-1] is seen.job.status
                expected = seen.updates[1:] if seen.tracked else seen.updates
                assert hub == expected

    # -- the end --

    def teardown(self) -> None:
        try:
            if hasattr(self, "slots"):
                if self.closes:
                    self.client_closes()
                self.drive_to_the_end()
        finally:
            for consumer in self._consumers:
                consumer.cancel()
            self._runner.__exit__(None, None, None)
            self._errors_cm.__exit__(None, None, None)

    def client_closes(self) -> None:
        """``aclose()`` mid-flight: the hub closes; what was unfinished stays so, every
        iterator ends, ``wait()`` says the client closed and ``updates()`` gives the state it
        was left in, then ends."""
        at_close = {s.job: s.job.status for s in self.seen}
        self.hub.close()
        self.closed = True
        self.settle()
        assert self.hub_finished, "events() did not end on close"
        for seen in self.seen:
            job = seen.job
            assert seen.finished, f"job {job.id}: updates() did not end on close"
            assert job.status is at_close[job]
            if not job.done:
                with pytest.raises(ka.ClientClosedError):
                    self.run(job.wait())
            assert self.run(_collect(job)) == [job.status]

    def drive_to_the_end(self) -> None:
        """End every unfinished job the way the engine would; then nothing may be held."""
        tracker = self.tracker
        for seen in self.seen:
            job = seen.job
            if seen.phase is Phase.QUEUED:
                tracker.reject(job, ka.UnreachableError("kling.test", 30.0, "refused"))
            elif seen.phase in (Phase.SLOTTED, Phase.IN_FLIGHT):
                tracker.answered(job, "failed")
                tracker.reject(job, ka.TransportError("connection reset", request_sent=True))
            elif seen.phase is Phase.LANDED:
                tracker.reject(job, ka.AmbiguousSubmissionError(job.id))
            elif seen.phase is Phase.FOLLOWED:
                tracker.snapshot(job, self.task_for(seen, ka.TaskStatus.SUCCEEDED), 0.0)
            seen.phase = Phase.ENDED
        self.settle()
        assert all(s.job.done for s in self.seen)
        assert self.slots.active == 0
        assert not tracker.following
        assert not self.errors.records, [r.getMessage() for r in self.errors.records]
        if not self.closed:
            self.hub.close()
            self.settle()
            assert self.hub_finished
            for seen in self.seen:
                assert seen.finished, f"job {seen.job.id}: updates() did not end at its end"
                # The terminal event: once, last, on both streams.
                assert [s.is_terminal for s in seen.updates].count(True) == 1
                assert seen.updates[-1].is_terminal
                hub = self.hub_seen[seen.job]
                assert [s.is_terminal for s in hub].count(True) == 1
                assert hub[-1].is_terminal


async def _turns(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def _at_once(coro: Any) -> None:
    """Run ``coro``, which must not wait (the limiter had a free slot)."""
    with anyio.fail_after(5):
        await coro


async def _collect(job: Job) -> list[JobStatus]:
    return [event.status async for event in job.updates()]


TrackerMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None
)
test_tracker_lifecycle = TrackerMachine.TestCase
