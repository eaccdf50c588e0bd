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
import itertools
import logging
import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import aiohttp.web
import anyio
import attrs
import hypothesis
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
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
#: statuses, the end; a status Kling added after this SDK counts as later than processing).
#: Written out here rather than read from the engine, so the test judges it.
RANK = {
    JobStatus.QUEUED: 0,
    JobStatus.SUBMITTING: 1,
    JobStatus.SUBMITTED: 2,
    JobStatus.PROCESSING: 3,
    JobStatus.UNKNOWN: 4,
    JobStatus.SUCCEEDED: 5,
    JobStatus.FAILED: 5,
    JobStatus.ERROR: 5,
}


def check_forward(job_id: str, statuses: list[JobStatus]) -> None:
    """``statuses`` (one job's events, in order) only move forward: each one ranks above the
    one before, except the documented step back of a create that is retried (submitting ->
    queued); a terminal status comes at most once, and last."""
    for before, after in itertools.pairwise(statuses):
        retried = (before, after) == (JobStatus.SUBMITTING, JobStatus.QUEUED)
        assert retried or RANK[after] > RANK[before], (
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
    MIRROR = "mirror"  # tracked before its creator knew the task: mirrors the job following it
    ENDED = "ended"


#: What the submitter may do next with a job, by where it stands (repeats weigh a choice).
SUBMITTER_STEPS = {
    Phase.QUEUED: ["take a slot"] * 3 + ["reject"],
    Phase.SLOTTED: ["submitting"] * 3 + ["account stopped"],
    Phase.IN_FLIGHT: ["created", "landed", "refused 1303", "queued again", "reject"],
    Phase.LANDED: ["found", "lost"],
}
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
    #: The id its create's task will have (known to the test before the job learns it).
    future_task: str | None = None
    #: For a mirror: the job that follows its task.
    mirror_of: Seen | None = None


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
        task_id = seen.job.task_id or seen.future_task or self.next_id("task")
        # An end as the server's full task object carries it: a video, or a reason.
        if status is ka.TaskStatus.SUCCEEDED:
            extra.setdefault(
                "videos", (ka.Video(id=f"v-{task_id}", url="https://v.example/c.mp4"),)
            )
        elif status is ka.TaskStatus.FAILED:
            extra.setdefault("status_message", "Video generation failed")
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
            self.ended(seen)

    def ended(self, seen: Seen) -> None:
        """The model's view of a job that ends: its mirrors end with it."""
        seen.phase = Phase.ENDED
        for other in self.in_phase(Phase.MIRROR):
            if other.mirror_of is seen:
                other.phase = Phase.ENDED

    def adopt(self, seen: Seen, task: ka.Task) -> None:
        """The model's view of ``Tracker.created``: a job tracked meanwhile that follows the
        same task becomes its mirror (its slot given back)."""
        for other in self.in_phase(Phase.FOLLOWED):
            if other.job.task_id == task.task_id:
                other.phase, other.mirror_of = Phase.MIRROR, seen
        seen.phase = Phase.FOLLOWED
        if task.is_terminal:
            self.ended(seen)

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

    def slot_free(self) -> bool:
        """Would the limiter let one more create through now (so taking it does not wait)?"""
        return self.slots.active < self.slots.limit and self.slots.not_before <= time.monotonic()

    @rule(
        data=st.data(),
        new=st.integers(0, 3).map(lambda n: n == 0),
        status=ANY_STATUS,
        possible_duplicate=st.booleans(),
        error=ERRORS,
    )
    def submitter_step(
        self,
        data: st.DataObject,
        new: bool,
        status: ka.TaskStatus,
        possible_duplicate: bool,
        error: Exception,
    ) -> None:
        """A new job is queued, or one on its way to a task takes its next step, as the
        submitter takes it (its choices below, by where the job stands)."""
        if new or not self.in_phase(*SUBMITTER_STEPS):
            request = ka.Text2VideoRequest(prompt="a cat", external_task_id=self.next_id("job"))
            self.add(self.tracker.queued(request), Phase.QUEUED, tracked=False)
            return
        # Where first, then which job there: the jobs deep in a create get their turn too.
        phase = data.draw(st.sampled_from([p for p in SUBMITTER_STEPS if self.in_phase(p)]))
        seen = data.draw(st.sampled_from(self.in_phase(phase)))
        choices = SUBMITTER_STEPS[seen.phase]
        if seen.phase is Phase.QUEUED and not self.slot_free():
            choices = ["wait", "reject"]
        step = data.draw(st.sampled_from(choices), label="step")
        take = {
            "wait": self._wait,
            "take a slot": self._take_a_slot,
            "reject": self._reject,
            "submitting": self._submitting,
            "account stopped": self._account_stopped,
            "created": self._created,
            "landed": self._landed,
            "refused 1303": self._refused_1303,
            "queued again": self._queued_again,
            "found": self._found,
            "lost": self._lost,
        }
        take[step](seen, status, possible_duplicate, error)

    def _wait(self, seen: Seen, *_: Any) -> None:
        """No slot is free: the job stays queued."""

    def _take_a_slot(self, seen: Seen, *_: Any) -> None:
        """Taken only when one is free, so taking it does not wait."""
        self.run(_at_once(self.tracker.take_slot(seen.job)))
        seen.phase = Phase.SLOTTED

    def _reject(self, seen: Seen, _status: Any, _dup: Any, error: Exception) -> None:
        """A queued job ends without a create (the account stopped, the host unreachable),
        or a create's answer ends it (a lasting ambiguity, an error)."""
        if seen.phase is Phase.IN_FLIGHT:
            self.tracker.answered(seen.job, "failed")
        self.tracker.fail(seen.job, error)
        self.ended(seen)
        assert seen.job.error is error

    def _submitting(self, seen: Seen, *_: Any) -> None:
        self.run(self.tracker.submitting(seen.job))
        seen.phase = Phase.IN_FLIGHT
        seen.future_task = seen.future_task or self.next_id("task")

    def _account_stopped(self, seen: Seen, *_: Any) -> None:
        """The account was stopped while this job took its slot: slot back, job ends."""
        self.tracker.answered(seen.job, "failed")
        self.tracker.fail(seen.job, ka.AccountError("stopped", code=1102, http_status=429))
        self.ended(seen)

    def first_snapshot(self, seen: Seen, status: ka.TaskStatus) -> ka.Task:
        """The task a create's answer (or its finder) shows: ``status``, or, where a job
        tracked meanwhile follows that task, a running status (a terminal one there is
        test_a_mirror_ends_when_its_first_snapshot_is_the_end covers that case)."""
        task = self.task_for(seen, status)
        if status.is_terminal and any(
            s.job.task_id == task.task_id for s in self.in_phase(Phase.FOLLOWED)
        ):
            task = attrs.evolve(task, status=ka.TaskStatus.PROCESSING)
        return task

    def _created(self, seen: Seen, status: ka.TaskStatus, dup: bool, _error: Any) -> None:
        """The create's task is seen (its first snapshot may already be the end)."""
        job = seen.job
        self.tracker.answered(job, "created")
        task = self.first_snapshot(seen, status)
        self.tracker.created(job, task, time.monotonic(), possible_duplicate=dup)
        self.adopt(seen, task)
        assert (job.task_id, job.task) == (task.task_id, task)
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

    def _queued_again(self, seen: Seen, *_: Any) -> None:
        """An ambiguity to look up later, a throttle, a create that provably never left."""
        self.tracker.answered(seen.job, "failed")
        self.tracker.requeued(seen.job)
        seen.phase = Phase.QUEUED
        assert seen.job.status is JobStatus.QUEUED

    def _found(self, seen: Seen, status: ka.TaskStatus, *_: Any) -> None:
        """The finder of a landed create found its task: adopted."""
        task = self.first_snapshot(seen, status)
        self.tracker.created(seen.job, task, time.monotonic(), possible_duplicate=False)
        self.adopt(seen, task)

    def _lost(self, seen: Seen, *_: Any) -> None:
        """The finder gave up: the job ends, ambiguous."""
        self.tracker.fail(seen.job, ka.AmbiguousSubmissionError(seen.job.id))
        self.ended(seen)

    # -- the client's calls --

    @rule(data=st.data(), what=st.sampled_from(["new", "task id", "job id", "before its job"]))
    def track(self, data: st.DataObject, what: str) -> None:
        """``kling.track(x)``: a new task holds a slot and is followed. An id the client knows
        (a task id, or a job's own id, which is what the docs say to persist) gives its job
        back as it is; unless that job ended with an error and kept its task id (given up
        on): then a new job of that id follows the task again. Or the task of a create not
        answered yet (learned elsewhere, a callback): tracked before its job knows it, it
        becomes that job's mirror once the create is answered."""
        known_ids = {
            "task id": [s.job.task_id for s in self.seen if s.job.task_id is not None],
            "job id": [s.job.id for s in self.seen],
            "before its job": [
                s.future_task
                for s in self.in_phase(Phase.IN_FLIGHT, Phase.LANDED)
                if s.future_task is not None
            ],
        }.get(what)
        x = data.draw(st.sampled_from(known_ids)) if known_ids else self.next_id("task")
        known = self.tracker.find(x)
        if known is not None and known.task_id in self.tracker.following and known.done:
            return  # its task is followed again already: test_one_task_is_followed_once covers it
        before = (self.slots.active, known.status if known else None)
        job = self.tracker.track(x)
        if known is not None and not (known.status is JobStatus.ERROR and known.task_id):
            assert job is known
            assert (self.slots.active, job.status) == before
            return
        assert all(s.job is not job for s in self.seen)
        assert job.id == (known.id if known else x)
        assert job.task_id == (known.task_id if known else x)
        self.add(job, Phase.FOLLOWED, tracked=True)

    # -- what the pollers saw --

    @rule(
        data=st.data(),
        status=ANY_STATUS,
        what=st.sampled_from(["poll"] * 3 + ["sweep", "failed"]),
        error=ERRORS,
    )
    def pollers_saw(
        self, data: st.DataObject, status: ka.TaskStatus, what: str, error: Exception
    ) -> None:
        """A poll's snapshot of one task, of any status (a stale one too: a lower status
        after a higher; or for a job that ended already: a poll and a sweep can both see the
        end); or a list sweep's page, one snapshot of a random status for each of several
        tasks at one instant; or the pollers give a job up."""
        if not (with_task := self.with_task()):
            return
        if what == "sweep":
            page = data.draw(st.lists(st.sampled_from(with_task), unique=True, min_size=1))
            statuses = data.draw(st.lists(ANY_STATUS, min_size=len(page), max_size=len(page)))
            observed_at = time.monotonic()
            for seen, each in zip(page, statuses, strict=True):
                self.snapshot_seen(seen, each, observed_at)
            return
        seen = data.draw(st.sampled_from(with_task))
        if (
            what == "failed" and seen.phase is not Phase.MIRROR
        ):  # mirrors: a test of their own below
            self.poll_failed(seen, error)
        else:
            self.snapshot_seen(seen, status, time.monotonic())

    def snapshot_seen(self, seen: Seen, status: ka.TaskStatus, observed_at: float) -> None:
        """``Tracker.snapshot``: it moves a followed job forward or changes nothing."""
        job = seen.job
        before = (job.status, job.task)
        task = self.task_for(seen, status)
        self.tracker.snapshot(job, task, observed_at)
        if seen.phase is not Phase.FOLLOWED:
            assert (job.status, job.task) == before
            return
        if RANK[JobStatus.of(status)] < RANK[before[0]]:
            assert (job.status, job.task) == before  # stale: ignored
        else:
            assert job.status is JobStatus.of(status)
            assert job.task is task
        self.after_snapshot(seen, status)

    def poll_failed(self, seen: Seen, error: Exception) -> None:
        """The pollers give a job up (``fail``): a followed one ends with the error, keeping
        its task; one that ended already stays as it ended."""
        job = seen.job
        before = (job.status, job.error, job.task)
        self.tracker.fail(job, error)
        if seen.phase is Phase.FOLLOWED:
            assert (job.status, job.error, job.task) == (JobStatus.ERROR, error, before[2])
            self.ended(seen)
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
        some = data.draw(st.sampled_from(with_task))
        # It concerns whichever job follows that task now (one that ended may share it with
        # the job that follows it again, or with the job it mirrored).
        concerned = next(
            (s for s in self.in_phase(Phase.FOLLOWED) if s.job.task_id == some.job.task_id),
            None,
        )
        seen = concerned or some
        forged = () if confirmed else (ka.Video(id="v", url="http://forged.test/x.mp4"),)
        task = self.task_for(seen, status, videos=forged)
        sharing = [s for s in self.seen if s.job.task_id == task.task_id]

        def state() -> list[tuple[object, ...]]:
            return [
                (s.job.status, s.job.task, s.job.error, len(s.updates), s.phase) for s in sharing
            ]

        before, active, was = state(), self.slots.active, seen.job.status
        schedule = self.tracker.entry(seen.job).poll_token
        answer = self.tracker.observe(task, confirmed=confirmed)
        assert answer is (concerned.job if concerned else None)
        if not confirmed or concerned is None:
            self.settle()
            assert (state(), self.slots.active) == (before, active)
            if concerned is not None and not confirmed:
                # A hint that claims an end brings a confirming poll within min_interval;
                # any other leaves a poll scheduled (at the latest, the safety net).
                entry = self.tracker.entry(seen.job)
                assert entry.poll_token >= schedule
                if status.is_terminal or status is ka.TaskStatus.UNKNOWN:
                    assert entry.unconfirmed
                    assert entry.due <= time.monotonic() + self.pool.policy.min_interval
            else:
                assert self.tracker.entry(seen.job).poll_token == schedule
            return
        job = concerned.job
        if RANK[JobStatus.of(status)] >= RANK[was]:
            assert job.task is task
        self.after_snapshot(concerned, status)

    # -- invariants --

    @invariant()
    def slots_are_owned_once(self) -> None:
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
        followed = {s.job for s in self.in_phase(Phase.FOLLOWED)}
        assert set(self.tracker.following.values()) == followed
        for task_id, job in self.tracker.following.items():
            assert job.task_id == task_id

    @invariant()
    def tasks_agree_with_statuses(self) -> None:
        """A job's latest snapshot says what its status says (an error keeps the last task
        it had, whatever it said; a tracked job announces nothing before its first one)."""
        for seen in self.seen:
            job = seen.job
            if job.task is not None and job.status is not JobStatus.ERROR and seen.updates:
                assert JobStatus.of(job.task.status) is job.status, (
                    f"job {job.id} ({seen.phase.value}) is {job.status.value}, "
                    f"its task {job.task.status.value}"
                )

    @invariant()
    def events_move_forward(self) -> None:
        self.settle()
        for seen in self.seen:
            check_forward(seen.job.id, seen.updates)
            hub = self.hub_seen.get(seen.job, [])
            check_forward(seen.job.id, hub)
            if not self.closed:
                # Nothing dropped: both streams caught up with the job, and agree. A tracked
                # job says nothing until its first snapshot (it never was queued here).
                assert hub == seen.updates
                if seen.updates:
                    assert seen.updates[-1] is seen.job.status
                else:
                    assert seen.tracked

    # -- the end --

    def teardown(self) -> None:
        # Called in a ``finally``: if a step failed, its error is the report, not ours.
        failed = sys.exc_info()[1] is not None
        try:
            if hasattr(self, "slots") and not failed:
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
            assert self.run(_collect(job)) == seen.updates[-1:]

    def drive_to_the_end(self) -> None:
        """End every unfinished job the way the engine would; then nothing may be held."""
        tracker = self.tracker
        for seen in self.seen:
            job = seen.job
            if seen.phase is Phase.QUEUED:
                tracker.fail(job, ka.UnreachableError("kling.test", 30.0, "refused"))
            elif seen.phase in (Phase.SLOTTED, Phase.IN_FLIGHT):
                tracker.answered(job, "failed")
                tracker.fail(job, ka.TransportError("connection reset", request_sent=True))
            elif seen.phase is Phase.LANDED:
                tracker.fail(job, ka.AmbiguousSubmissionError(job.id))
            elif seen.phase is Phase.FOLLOWED:
                tracker.snapshot(job, self.task_for(seen, ka.TaskStatus.SUCCEEDED), 0.0)
            if seen.phase is not Phase.MIRROR:  # mirrors end with the job they mirror
                self.ended(seen)
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


TrackerMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
test_tracker_lifecycle = TrackerMachine.TestCase


# --- what the tracker machine found -------------------------------------------------------------
# Its smallest examples, kept as plain tests: the first two were fixed while it was written.


def bare_tracker() -> tuple[Tracker, AdaptiveLimit]:
    policy = ka.PollPolicy()
    slots = AdaptiveLimit(None)
    tracker = Tracker(EventHub(), slots, LearnedDurations(policy))
    PollerPool(as_resource(NeverCalled()), policy, tracker)
    return tracker, slots


def test_tracking_the_id_of_a_submitted_job_gives_that_job_and_never_doubles_its_slot() -> None:
    """Found: ``track`` looked the string up among task ids only, so tracking a job's own id
    (what the docs say to persist) made a second job of that id, and the limiter, keyed by
    job id, counted their two slots as one and released it twice."""
    tracker, slots = bare_tracker()
    with error_records() as errors:
        job = tracker.queued(ka.Text2VideoRequest(prompt="p", external_task_id="123"))
        asyncio.run(tracker.take_slot(job))
        assert tracker.track("123") is job
        assert slots.active == 1
        tracker.answered(job, "failed")
        tracker.fail(job, ka.TransportError("reset", request_sent=True))
        assert slots.active == 0
    assert not errors.records, [r.getMessage() for r in errors.records]


def test_a_stale_processing_never_follows_a_newer_status() -> None:
    """Found: UNKNOWN ranked with PROCESSING, so a late "processing" after a newer status
    moved the job back, and back again: ``updates()`` repeated statuses."""
    tracker, _ = bare_tracker()
    job = tracker.track("t-1")
    seen: list[JobStatus] = []
    for status in ("processing", "unknown", "processing", "unknown"):
        tracker.snapshot(job, ka.Task(task_id="t-1", status=ka.TaskStatus(status)), 0.0)
        if not seen or job.status is not seen[-1]:
            seen.append(job.status)
    assert seen == [JobStatus.PROCESSING, JobStatus.UNKNOWN]


def test_a_late_poll_failure_does_not_end_a_mirror_apart_from_its_job() -> None:
    tracker, slots = bare_tracker()
    job = tracker.queued(ka.Text2VideoRequest(prompt="p", external_task_id="j-1"))
    asyncio.run(tracker.take_slot(job))
    asyncio.run(tracker.submitting(job))
    tracker.answered(job, "landed")
    mirror = tracker.track("t-1")  # learned elsewhere before the finder found it
    task = ka.Task(task_id="t-1", status=ka.TaskStatus.PROCESSING, external_task_id="j-1")
    tracker.created(job, task, time.monotonic(), possible_duplicate=False)
    assert slots.active == 1  # one task, one slot
    # The mirror's poll, sent before the take-over, comes back failed.
    tracker.fail(mirror, ka.ServerError("storm", code=5000, http_status=500))
    tracker.snapshot(job, attrs.evolve(task, status=ka.TaskStatus.SUCCEEDED), time.monotonic())
    assert job.status is JobStatus.SUCCEEDED
    assert mirror.status is JobStatus.SUCCEEDED, mirror.error


def test_a_mirror_ends_when_its_first_snapshot_is_the_end() -> None:
    tracker, slots = bare_tracker()
    job = tracker.queued(ka.Text2VideoRequest(prompt="p", external_task_id="j-1"))
    asyncio.run(tracker.take_slot(job))
    asyncio.run(tracker.submitting(job))
    mirror = tracker.track("t-1")  # learned elsewhere (a callback) before the create's answer
    tracker.answered(job, "created")
    video = ka.Video(id="v-1", url="https://v.example/c.mp4")
    done = ka.Task(
        task_id="t-1", status=ka.TaskStatus.SUCCEEDED, external_task_id="j-1", videos=(video,)
    )
    tracker.created(job, done, time.monotonic(), possible_duplicate=False)
    assert job.status is JobStatus.SUCCEEDED
    assert slots.active == 0
    assert mirror.done, (
        f"the mirror is left {mirror.status.value}, holding nothing, followed by none"
    )


def test_one_task_is_followed_once() -> None:
    tracker, slots = bare_tracker()
    job = tracker.queued(ka.Text2VideoRequest(prompt="p", external_task_id="j-1"))
    asyncio.run(tracker.take_slot(job))
    asyncio.run(tracker.submitting(job))
    tracker.track("t-1")  # its task, learned elsewhere before the create's answer: a mirror
    tracker.answered(job, "created")
    task = ka.Task(task_id="t-1", status=ka.TaskStatus.PROCESSING, external_task_id="j-1")
    tracker.created(job, task, time.monotonic(), possible_duplicate=False)
    tracker.fail(job, ka.UnreachableError("kling.test", 30.0, "refused"))  # both end
    again = tracker.track("t-1")
    also = tracker.track("j-1")
    assert slots.active == 1, f"{slots.active} slots for one task"
    done = attrs.evolve(task, status=ka.TaskStatus.SUCCEEDED)
    tracker.snapshot(tracker.following["t-1"], done, time.monotonic())
    assert again.done and also.done
    assert slots.active == 0


# --- the client machine -----------------------------------------------------------------------

#: Real seconds per emulated second, for the emulator and (scaled by it) the poll policy.
CLIENT_SCALE = 0.002
#: The emulator's account slots, and what the client is told (or learns).
ACCOUNT_SLOTS = 2

Action = tuple[str, int]

ACTIONS: st.SearchStrategy[Action] = st.one_of(
    st.tuples(st.just("submit"), st.integers(1, 3)),  # submit_many of n jobs
    st.tuples(st.just("track"), st.just(0)),  # create a task directly, then track it
    st.tuples(st.just("track known"), st.integers(0, 20)),  # track a known job again
    st.tuples(st.just("observe"), st.integers(0, 20)),  # a confirmed snapshot (a GET)
    st.tuples(st.just("forge"), st.integers(0, 20)),  # an unconfirmed forged "succeed"
    st.tuples(st.just("wait"), st.integers(1, 60)),  # emulated seconds
)

#: The faults that apply to API requests (creates and queries), at low rates; a stall lasts
#: little real time.
API_FAULTS = sorted((k for k in FaultKind if k is not FaultKind.DROP_MID_DOWNLOAD), key=str)
RATE = st.sampled_from([0.05, 0.1, 0.15])
RATES = st.dictionaries(st.sampled_from(API_FAULTS), RATE, max_size=2)
FAULTS: st.SearchStrategy[Faults | None] = st.none() | st.builds(
    lambda create, query: Faults(create=create, query=query, stall_seconds=0.4),
    st.dictionaries(st.sampled_from(API_FAULTS), RATE, min_size=1, max_size=2),
    RATES,
)


class Forger:
    """A server on loopback that forged snapshots point at; it counts every request it gets,
    and none may come."""

    def __init__(self) -> None:
        self.hits = 0
        self._runner: aiohttp.web.AppRunner | None = None
        self.url = ""

    async def _any(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        self.hits += 1
        return aiohttp.web.Response(body=b"not a video")

    async def __aenter__(self) -> Forger:
        app = aiohttp.web.Application()
        app.router.add_route("*", "/{tail:.*}", self._any)
        self._runner = aiohttp.web.AppRunner(app)
        await self._runner.setup()
        site = aiohttp.web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


@attrs.define
class Watch:
    """What one job's ``updates()`` showed."""

    job: ka.Job
    statuses: list[JobStatus] = attrs.Factory(list)
    tasks: list[ka.Task | None] = attrs.Factory(list)
    ended: bool = False


async def follow_updates(watch: Watch) -> None:
    async for event in watch.job.updates():
        watch.statuses.append(event.status)
        watch.tasks.append(event.task)
    watch.ended = True


async def run_client_scenario(
    actions: list[Action], faults: Faults | None, known_limit: bool, close: bool, seed: int
) -> dict[str, int]:
    """Run ``actions`` against a fresh emulator, then wait for every job or close; check it
    all, and say what happened (for hypothesis' statistics)."""
    emulator = Emulator(
        time_scale=CLIENT_SCALE,
        seed=seed,
        median_duration=20.0,
        concurrency_limit=ACCOUNT_SLOTS,
        faults=faults,
    )
    retry = ka.RetryPolicy(
        attempts=6, timeout=2.0, initial=0.01, maximum=0.05, throttle_minimum=0.01
    )
    async with Forger() as forger, emulator as emu, anyio.create_task_group() as watchers:
        kling = ka.KlingClient(
            api_key=emu.api_key,
            base_url=emu.url,
            poll=ka.PollPolicy().scaled(CLIENT_SCALE),
            retry=retry,
            settle_window=0.1,
            timeout=0.2,
            max_requests_per_second=None,
            max_active_tasks=ACCOUNT_SLOTS if known_limit else None,
        )
        watches: dict[ka.Job, Watch] = {}
        tracked: list[ka.Job] = []
        hub: dict[ka.Job, list[JobStatus]] = {}
        hub_done = anyio.Event()
        problems: list[str] = []

        def check(where: str) -> None:
            stats = kling.stats
            if stats.active < 0:
                problems.append(f"{where}: active {stats.active}")
            running_tracked = sum(not job.done for job in tracked)
            if known_limit and stats.active - running_tracked > ACCOUNT_SLOTS:
                problems.append(
                    f"{where}: {stats.active} slots held, {running_tracked} by tracked tasks, "
                    f"over the account's {ACCOUNT_SLOTS}"
                )
            if emu.stats.peak_active > ACCOUNT_SLOTS:
                problems.append(f"{where}: the emulator ran {emu.stats.peak_active} tasks")

        async def monitor() -> None:
            while True:
                check("monitor")
                await anyio.sleep(CLIENT_SCALE)

        async def collect_hub(events: Any) -> None:
            async for event in events:
                hub.setdefault(event.job, []).append(event.status)
            hub_done.set()

        def watch(job: ka.Job) -> None:
            if job not in watches:
                watches[job] = Watch(job)
                watchers.start_soon(follow_updates, watches[job])

        def pick(index: int) -> ka.Job | None:
            with_task = [job for job in watches if job.task_id is not None]
            return with_task[index % len(with_task)] if with_task else None

        forged: list[ka.Task] = []
        async with kling:
            watchers.start_soon(collect_hub, kling.events())
            watchers.start_soon(monitor)
            for number, (kind, n) in enumerate(actions):
                if kind == "submit":
                    requests = [
                        ka.Text2VideoRequest(prompt=f"clip {i}", external_task_id=f"s{number}-{i}")
                        for i in range(n)
                    ]
                    for job in kling.submit_many(requests):
                        watch(job)
                elif kind == "track":
                    request = ka.Text2VideoRequest(prompt="direct", external_task_id=f"d{number}")
                    try:
                        task = await kling.text2video.create(request)
                    except ka.KlingError:
                        continue  # 1303 (the account is full), or an ambiguity under faults
                    job = kling.track(task.task_id)
                    tracked.append(job)
                    watch(job)
                elif kind == "track known":
                    if (known := pick(n)) is not None:
                        assert known.task_id is not None
                        # By its task id or (odd n) by its own id: the same job, as it is.
                        again = kling.track(known.id if n % 2 else known.task_id)
                        assert again is known or known.status is JobStatus.ERROR
                elif kind == "observe":
                    if (seen := pick(n)) is not None:
                        assert seen.task_id is not None
                        try:
                            task = await kling.text2video.get(seen.task_id)
                        except ka.KlingError:
                            continue
                        was_done = seen.done
                        answer = kling.observe(task, confirmed=True)
                        assert answer is (None if was_done else seen)
                elif kind == "forge":
                    if (target := pick(n)) is not None:
                        assert target.task_id is not None
                        fake = ka.Task(
                            task_id=target.task_id,
                            status=ka.TaskStatus.SUCCEEDED,
                            external_task_id=target.external_task_id,
                            videos=(ka.Video(id="forged", url=f"{forger.url}/clip.mp4"),),
                        )
                        forged.append(fake)
                        before = (target.status, target.task)
                        kling.observe(fake, confirmed=False)
                        assert (target.status, target.task) == before  # a hint, nothing more
                else:
                    await anyio.sleep(n * CLIENT_SCALE)
                check(f"after {kind}")
            jobs = list(watches)
            if not close:
                with anyio.fail_after(60):  # a hang guard, not a timing assertion
                    async for _ in kling.as_completed(jobs):
                        check("a job ended")
                stats = kling.stats
                assert stats.active == 0, stats
                assert stats.following == 0, stats
            unfinished = [job for job in jobs if not job.done]
        # The client closed (mid-flight when `close`): every iterator ends by itself.
        with anyio.fail_after(10):
            await hub_done.wait()
            for w in watches.values():
                while not w.ended:
                    await anyio.sleep(0.001)
        watchers.cancel_scope.cancel()

    assert not problems, problems
    assert forger.hits == 0
    for job in unfinished:
        assert close
        with pytest.raises(ka.ClientClosedError):
            await job.wait()
    created = emu.stats.created_per_external_id
    for job in jobs:
        w = watches[job]
        check_forward(job.id, w.statuses)
        check_forward(job.id, hub.get(job, []))
        assert all(t is None or t not in forged for t in w.tasks), f"job {job.id} took a forgery"
        if job.done:
            assert w.statuses[-1] is job.status
            assert hub[job][-1] is job.status
            assert [s.is_terminal for s in hub[job]].count(True) == 1
        else:
            assert not any(s.is_terminal for s in w.statuses)
        if job.task is not None:
            assert all(not v.url.startswith(forger.url) for v in job.task.videos)
        if job.external_task_id is not None and not job.possible_duplicate:
            assert created.get(job.external_task_id, 0) <= 1, (job, created)
    return {
        "jobs": len(jobs),
        "unfinished at close": len(unfinished),
        "faults": sum(emu.stats.faults_injected.values()),
        "1303s": emu.stats.sent_1303,
        "tracked": len(tracked),
        "forged": len(forged),
    }


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    actions=st.builds(
        lambda first, rest: [first, *rest],
        st.tuples(st.just("submit"), st.integers(1, 3)),
        st.lists(ACTIONS, max_size=10),
    ),
    faults=FAULTS,
    known_limit=st.booleans(),
    close=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_client_lifecycle_against_the_emulator(
    actions: list[Action], faults: Faults | None, known_limit: bool, close: bool, seed: int
) -> None:
    """Random submits, tracks of tasks created directly, confirmed and forged observations and
    waits in scaled time, then every job waited for or the client closed mid-flight."""
    with error_records() as errors:
        summary = anyio.run(run_client_scenario, actions, faults, known_limit, close, seed)
    assert not errors.records, [r.getMessage() for r in errors.records]
    for name, count in summary.items():
        hypothesis.event(f"{name}: {'some' if count else 'none'}")
