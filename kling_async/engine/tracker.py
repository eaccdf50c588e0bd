"""The tracker: the one owner of every job's lifecycle and of the slot each job holds.

A job is queued, takes a slot, is sent, becomes a task, is followed, is observed, ends; a task
that ends gives its slot back. Those steps are spread over the submitter (creates), the
pollers (polls and sweeps) and the outside world (callbacks, :meth:`KlingClient.observe`), and
each used to change jobs and slots on its own: nine release sites, one missed and a slot leaks,
one doubled and the account is overshot. Here every step is a method of :class:`Tracker`, and
the submitter and pollers only report what they saw:

- the slot is taken by :meth:`take_slot` (for each create round) or :meth:`track`, and given
  back either with the create's answer (:meth:`answered`: a 1303 or a failure made no task) or
  at the job's end (:meth:`_give_back`); both go through the job's own record
  (``holds_slot``), so each slot taken is given back exactly once;
- a job's status only moves forward (queued -> submitting -> the task's statuses -> the end;
  a create that must be retried goes back to queued, the only step back), so a late poll
  answer never undoes what a sweep or a callback confirmed;
- the end happens once (:meth:`_end`): the slot, the followed set, the duration statistics,
  the job store and the log line all learn of it there.

The per-job record (:class:`Entry`: the schedule's bookkeeping, the slot, the create's
state) is private to the engine; :class:`~kling_async.engine.jobs.Job` keeps the public face.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs

from kling_async._errors import KlingError, RestoredError, ValidationError
from kling_async.engine.collector import Collector
from kling_async.engine.durations import DurationStats
from kling_async.engine.entry import Entry
from kling_async.engine.jobs import (
    EventHub,
    Job,
    JobStatus,
    error_message,
    error_type,
    shared_monotonic,
)
from kling_async.engine.limits import CreateOutcome, SlotLimiter
from kling_async.engine.store import JobRecord, StoreWriter
from kling_async.protocol.models import Task, TaskStatus, Text2VideoRequest
from kling_async.protocol.schedule import ClassKey

if TYPE_CHECKING:
    from kling_async.engine.pollers import PollerPool

__all__ = ["Disowned", "Entry", "Tracker"]

log = logging.getLogger("kling_async")

#: How far along each status is; a snapshot never moves a job to a lower rank. A status Kling
#: added after this SDK (UNKNOWN) counts as later than processing: once seen, a late
#: "processing" is stale, so a job never flaps between the two.
_RANK = {
    JobStatus.QUEUED: 0,
    JobStatus.SUBMITTING: 1,
    JobStatus.SUBMITTED: 2,
    JobStatus.PROCESSING: 3,
    JobStatus.UNKNOWN: 4,
    JobStatus.SUCCEEDED: 5,
    JobStatus.FAILED: 5,
    JobStatus.ERROR: 5,
}


class Disowned(Exception):
    """The job belongs to another client of the shared account: nothing of it is sent here."""


class _ByTask:
    """task_id -> job, for look-ups by task id. A job whose id is its task id (every job
    ``track`` made) is found in ``jobs``, which holds it already: it gets no entry of its own
    here, which at 100,000 tracked jobs saves a dict entry (about 40 bytes) apiece. A job
    named here for a task wins over one found that way, as a later assignment would."""

    __slots__ = ("_jobs", "_named")

    def __init__(self, jobs: dict[str, Job]) -> None:
        self._jobs = jobs
        self._named: dict[str, Job] = {}

    def __setitem__(self, task_id: str, job: Job) -> None:
        if job.id == task_id:
            self._named.pop(task_id, None)  # ``jobs`` has it (registered first)
        else:
            self._named[task_id] = job

    def get(self, task_id: str) -> Job | None:
        job = self._named.get(task_id)
        if job is None:
            job = self._jobs.get(task_id)
            if job is not None and job.task_id != task_id:
                return None
        return job


class Tracker:
    """Owns jobs, their slots and their ends; see the module docstring."""

    def __init__(
        self,
        hub: EventHub,
        slots: SlotLimiter,
        durations: DurationStats,
        *,
        store: StoreWriter | None = None,
    ) -> None:
        self._hub = hub
        self.slots = slots
        self.durations = durations
        self.store = store
        self.pollers: PollerPool | None = None
        #: Every job of this client, by id and by task id (ended ones too: they still answer).
        self.jobs: dict[str, Job] = {}
        self.by_task = _ByTask(self.jobs)
        #: task_id -> job, for the jobs being followed (polled) now.
        self.following: dict[str, Job] = {}
        #: task_id -> other jobs of the same task (one tracked before the job that created it
        #: learned its task id): they mirror the followed job, holding no slot of their own.
        self._mirrors: dict[str, list[Job]] = {}
        self._mirrored: set[Job] = set()
        #: The client's own callback URL (push delivery), and when a hint last came for any
        #: task: while hints come, a task created with that URL is polled only as a safety net.
        self.callback_url: str | None = None
        self.last_hint: float | None = None
        #: Where a hint for a replica goes (its owner, through the shared account).
        self.forward: Callable[[Task], None] | None = None
        #: Keeps the garbage collector's full passes short while many jobs are alive.
        self.collector = Collector()

    # --- finding jobs ----------------------------------------------------------------------

    def find(self, job_or_task_id: str) -> Job | None:
        return self.jobs.get(job_or_task_id) or self.by_task.get(job_or_task_id)

    @staticmethod
    def entry(job: Job) -> Entry:
        entry = job._engine
        assert isinstance(entry, Entry)
        return entry

    def _register(self, job: Job, entry: Entry) -> None:
        job._engine = entry
        self.jobs[job.id] = job
        self.collector.grew()
        if job.task_id is not None:
            self.by_task[job.task_id] = job

    # --- new jobs --------------------------------------------------------------------------

    def queued(
        self, request: Text2VideoRequest, *, sent: bool = False, replace: Job | None = None
    ) -> Job:
        """A new job for a prepared request (it has its ``external_task_id``). ``replace`` is
        an ended job of that id that never had a task: the new attempt takes its place."""
        job_id = request.external_task_id
        assert job_id is not None
        existing = self.jobs.get(job_id) or self.by_task.get(job_id)
        if existing is not None and not (
            existing is replace and existing.done and existing.task_id is None
        ):
            raise ValidationError(
                "external_task_id", job_id, "is already the id of a job of this client"
            )
        job = Job(self._hub, job_id, request=request, external_task_id=job_id)
        self._register(job, Entry(job, _class_of(request), sent=sent))
        self._changed(job, JobStatus.QUEUED, None)
        return job

    def track(self, task_id: str, *, job: Job | None = None) -> Job:
        """Follow a task created elsewhere (or loaded from a store): it holds a slot until
        it ends, and is polled at once.

        A string that is a job's id or task id gives that job back as it is, unless it ended
        with an error and kept its task id (given up on: an unreachable host, polls failing):
        then a new job of the same id follows the task again.
        """
        if job is None:
            known = self.find(task_id)
            if known is not None and not (
                known.status is JobStatus.ERROR and known.task_id is not None
            ):
                return known
            if known is not None:
                assert known.task_id is not None
                task_id = known.task_id
                follower = self.following.get(task_id)
                if follower is not None:
                    return follower  # the task is followed already: one task, one follower
                job = Job(
                    self._hub,
                    known.id,
                    request=known.request,
                    task_id=task_id,
                    external_task_id=known.external_task_id,
                    announce=False,
                )
                job.task = known.task
                job.possible_duplicate = known.possible_duplicate
                self._register(job, Entry(job, self.entry(known).class_key, sent=True))
            else:
                job = Job(self._hub, task_id, task_id=task_id, announce=False)
                self._register(job, Entry(job, sent=True))
        else:
            job.task_id = task_id
            self.by_task[task_id] = job
        self._hold_and_follow(job, poll_now=True)
        return job

    def _hold_and_follow(self, job: Job, *, poll_now: bool) -> None:
        entry = self.entry(job)
        entry.started_at = shared_monotonic()  # a burst of tracks shares one float
        self.slots.hold(job.id)
        entry.holds_slot = True
        self._follow(job, poll_now=poll_now)
        self._touch(job)

    def track_snapshot(self, task: Task) -> Job:
        """Follow a task from a snapshot the caller fetched: an ended one gives a finished
        job at once (no slot, no poll), a running one is followed from it (its next poll
        where the schedule puts it, since the caller has just looked)."""
        known = self.find(task.task_id)
        if known is not None and not (known.status is JobStatus.ERROR and known.task_id):
            if not known.done and self.following.get(task.task_id) is known:
                self.snapshot(known, task, time.monotonic())
            return known
        job = Job(self._hub, task.task_id, task_id=task.task_id, announce=False)
        job.external_task_id = task.external_task_id
        self._register(job, Entry(job, sent=True))
        if task.is_terminal:
            job.task = task
            self._end(job, JobStatus.of(task.status), task)
            return job
        self._hold_and_follow(job, poll_now=False)
        self._snapshot(job, task, time.monotonic())
        return job

    def restore(self, record: JobRecord) -> Job:
        """A job from the job store, registered as it was saved (nothing is announced): an
        ended one answers ``kling.job(id)`` as before; the caller follows or submits the
        others again (an unfinished job without a task goes back to ``queued``)."""
        request = record.request
        if request is not None and request.external_task_id != record.id:
            request = attrs.evolve(request, external_task_id=record.id)
        job = Job(
            self._hub,
            record.id,
            request=request,
            task_id=record.task_id,
            external_task_id=(
                record.id
                if request is not None
                else (record.task.external_task_id if record.task is not None else None)
            ),
            announce=False,
        )
        job.possible_duplicate = record.possible_duplicate
        job.task = record.task
        if record.finished and record.error is not None:
            job.error = RestoredError(record.error_type, record.error)
        status = record.status
        if not record.finished and record.task_id is None:
            status = JobStatus.QUEUED
        job._restore(status, record.created_at, record.updated_at)
        key = _class_of(request) if request is not None else ("", "", "")
        self._register(job, Entry(job, key, sent=record.sent))
        return job

    # --- a shared account: other clients' jobs ---------------------------------------------

    def replicate(self, record: JobRecord) -> Job | None:
        """Another client's job as it is now: registered as a replica, or moved forward
        (its events announced here too, so ``events()`` and the FastAPI router on this
        client see every job of the account). A job this client owns is left alone."""
        job = self.jobs.get(record.id)
        if job is None:
            job = Job(
                self._hub,
                record.id,
                request=record.request,
                task_id=record.task_id,
                external_task_id=record.id if record.request is not None else None,
                announce=False,
            )
            key = _class_of(record.request) if record.request is not None else ("", "", "")
            self._register(job, Entry(job, key, sent=record.sent, replica=True))
            job._made = record.created_at or job._made
        elif not self.entry(job).replica:
            return None
        entry = self.entry(job)
        entry.sent = record.sent
        if record.task_id is not None and job.task_id != record.task_id:
            job.task_id = record.task_id
            self.by_task[record.task_id] = job
        job.possible_duplicate = record.possible_duplicate
        status = record.status
        if job.done or (_RANK[status] < _RANK[job.status] and job._last is not None):
            return job  # older than what we know
        if record.finished and record.error is not None:
            job.error = RestoredError(record.error_type, record.error)
        fresher = record.task is not None and record.task != job.task
        if record.task is not None:
            job.task = record.task
        if job._last is None or status is not job.status:
            job._change(status, record.task or job.task, at=record.updated_at or None)
        elif fresher:
            job._updated = record.updated_at or job._updated
        return job

    def adopt(self, record: JobRecord) -> Job:
        """A job this client owns from now on (its owner died): a replica of it becomes
        this client's own, as the record says; the caller follows or submits it again."""
        job = self.jobs.get(record.id)
        if job is None or not self.entry(job).replica:
            return job if job is not None else self.restore(record)
        self.replicate(record)
        entry = self.entry(job)
        entry.replica = False
        entry.sent = record.sent
        if not job.done and job.task_id is None:
            job._status = JobStatus.QUEUED
        return job

    def disown(self, job: Job) -> None:
        """Another client owns this job now: stop following it, without giving back its
        slot (the new owner holds the job's lease), and keep it as a replica."""
        entry = self.entry(job)
        if entry.replica:
            return
        entry.replica = True
        entry.holds_slot = False
        entry.poll_token += 1  # its scheduled poll is void
        if job.task_id is not None and self.following.get(job.task_id) is job:
            del self.following[job.task_id]

    # --- the submitter's reports -----------------------------------------------------------

    async def take_slot(self, job: Job) -> None:
        await self.slots.acquire(job.id)
        entry = self.entry(job)
        if not entry.replica:  # a shared account may say another client owns it meanwhile
            entry.holds_slot = True

    async def submitting(self, job: Job) -> None:
        """The job's create is about to go out: the job store records that first (the one
        write the engine waits for), so a restart knows to look before sending again."""
        entry = self.entry(job)
        self._changed(job, JobStatus.SUBMITTING, job.task)
        entry.sent = True
        if not entry.marked:
            if self.store is not None:
                await self.store.durable(job)
            if entry.replica:
                # A shared store said another client owns the job: it is that one's to send.
                raise Disowned(job.id)
            entry.marked = True

    def answered(self, job: Job, outcome: CreateOutcome) -> None:
        """A create that held the job's slot was answered (see ``CreateOutcome``)."""
        entry = self.entry(job)
        if not entry.holds_slot:
            return
        if outcome in ("refused", "failed"):
            entry.holds_slot = False
        self.slots.answered(job.id, outcome)

    def requeued(self, job: Job) -> None:
        """The job goes back to wait for its next create (after a 1303, a storm, ...)."""
        if not job.done and job.status is not JobStatus.QUEUED:
            self._changed(job, JobStatus.QUEUED, job.task)

    def created(
        self,
        job: Job,
        task: Task,
        sent_at: float,
        *,
        possible_duplicate: bool,
        earlier_run: bool = False,
    ) -> None:
        """The job's task exists and was seen: follow it from its submission time.

        ``earlier_run``: the task may be an earlier run's (a resumed create found by lookup),
        sent with whatever callback URL that run had, or none: it is polled on its schedule,
        not left to the safety net as a task whose callbacks come here."""
        if job.done:
            self._give_back(job, self.entry(job))  # nothing will end it again
            return
        entry = self.entry(job)
        job.possible_duplicate = possible_duplicate
        job.task_id = task.task_id
        other = self.following.get(task.task_id)
        if other is not None and other is not job:
            # The task was tracked before this job learned it was its own. One task holds
            # one slot and has one follower: this job (which measured its start) follows it,
            # and the tracked job mirrors it, its slot given back.
            del self.following[task.task_id]
            self.entry(other).poll_token += 1  # its scheduled poll is void
            self._give_back(other, self.entry(other))
            self._mirrors.setdefault(task.task_id, []).append(other)
            self._mirrored.add(other)
        self.by_task[task.task_id] = job
        entry.started_at = sent_at
        entry.measured = True
        request = job.request
        entry.pushed = (
            self.callback_url is not None
            and not earlier_run
            and request is not None
            and request.callback_url in (None, self.callback_url)
        )
        if _incomplete_end(task):
            # A create's answer is a short form (no task_result, no failure message): an end
            # it reports is confirmed at once by a poll, which brings the videos or the reason.
            self._follow(job, poll_now=True)
            return
        self._snapshot(job, task, time.monotonic())
        if not job.done:
            self._follow(job)

    # --- what the pollers and the outside saw ----------------------------------------------

    def snapshot(self, job: Job, task: Task, observed_at: float) -> None:
        """A confirmed snapshot of a followed job's task (a poll or a sweep)."""
        if job.task_id is None or self.following.get(job.task_id) is not job:
            return  # not followed (any more): a sweep and a poll can both see the end
        self._snapshot(job, task, observed_at)
        if not job.done:
            entry = self.entry(job)
            entry.polled_at = observed_at  # (a sweep's page shares one)
            entry.end_hint_age = None  # the end it claimed was not (yet) true
            assert self.pollers is not None
            self.pollers.schedule_next(entry)

    def observe(self, task: Task, *, confirmed: bool) -> Job | None:
        """A snapshot of a task seen elsewhere. Confirmed (the caller fetched it with the
        account's credentials) it moves the job forward like a poll. Unconfirmed (a callback,
        anything from outside) it changes nothing by itself: one that claims an end brings the
        job's next authenticated poll forward to now (at most once per ``min_interval``, so a
        flood of forged hints costs little); any other only tells the pollers that callbacks
        come, so they keep a safety-net poll. Returns the job it concerns, or None if no
        followed job has that task."""
        job = self.by_task.get(task.task_id)
        if job is None and self.forward is not None and not confirmed:
            # Shared account: a callback may come before the change that tells this client
            # of the task (or for a task of a client that has not said so yet): its owner,
            # whoever that is, confirms it.
            self.forward(task)
            return None
        if job is not None and not job.done and self.entry(job).replica:
            if self.forward is not None:
                self.forward(task)  # its owner confirms it, with its own schedule
            return job
        if job is None or job.done or self.following.get(task.task_id) is not job:
            return None
        if confirmed:
            self.snapshot(job, task, time.monotonic())
        else:
            assert self.pollers is not None
            entry = self.entry(job)
            entry.hinted_at = self.last_hint = time.monotonic()
            ending = task.status.is_terminal or task.status is TaskStatus.UNKNOWN
            if ending and entry.end_hint_age is None:
                entry.end_hint_age = entry.hinted_at - entry.started_at
            self.pollers.hinted(entry, ending=ending)
        return job

    def unnoticed_ends(self, running_at: float) -> float:
        """How many tasks holding slots are expected to have ended unseen: for each, the
        chance, by its class's duration model, that it ended since it was last known to run
        (its last poll, or ``running_at``). A task whose callbacks come is heard of at once,
        so it counts for nothing (a slot probe is moot under push delivery)."""
        now = time.monotonic()
        fits: dict[ClassKey, tuple[float, float]] = {}
        total = 0.0
        for job in self.following.values():
            entry = self.entry(job)
            if not entry.holds_slot or entry.replica or self.pushes(entry):
                continue
            fit = fits.get(entry.class_key)
            if fit is None:
                median, sigma = self.durations.model(entry.class_key).fit()
                fit = fits[entry.class_key] = (math.log(median), sigma * math.sqrt(2.0))
            polled = entry.polled_at
            seen = max(entry.started_at if polled is None else polled, running_at)
            age = now - entry.started_at
            total += _ended_since(fit, max(seen - entry.started_at, 1e-9), max(age, 1e-9))
        return total

    def pushes(self, entry: Entry) -> bool:
        """Whether callbacks are coming for this entry's task: one came for it lately, or it
        was created with the client's callback URL while callbacks come for others."""
        now = time.monotonic()
        window = 2 * self.pollers.policy.safety_interval if self.pollers is not None else 0.0
        if entry.hinted_at is not None and now - entry.hinted_at < window:
            return True
        return entry.pushed and self.last_hint is not None and now - self.last_hint < window

    def fail(self, job: Job, error: BaseException) -> None:
        """The job ends with ``error`` (its task, if any, kept on ``.task``). A mirror ends
        only with the job it mirrors (a late failure of its own old poll changes nothing)."""
        if job.done or job in self._mirrored or self.entry(job).replica:
            return
        job.error = error
        self._end(job, JobStatus.ERROR, job.task)

    # --- the one place states change -------------------------------------------------------

    def _snapshot(self, job: Job, task: Task, observed_at: float) -> None:
        if job.done:
            return
        status = JobStatus.of(task.status)
        if _RANK[status] < _RANK[job.status]:
            return  # older than what we know: states only move forward
        job.task = task
        if task.external_task_id and not job.external_task_id:
            job.external_task_id = task.external_task_id
        if task.status in (TaskStatus.SUCCEEDED, TaskStatus.FAILED):
            entry = self.entry(job)
            if entry.measured:
                # It ended between the previous look and this one: take the midpoint, or
                # when a callback claimed the end in between, the callback's arrival. A
                # statistics seam that fails must not keep the job from ending.
                age = observed_at - entry.started_at
                hint = entry.end_hint_age
                if hint is not None and entry.poll_age <= hint <= age:
                    duration = hint
                else:
                    duration = (entry.poll_age + age) / 2
                try:
                    self.durations.observe(entry.class_key, duration)
                except Exception:
                    log.exception("the duration statistics failed; the job ends regardless")
            self._end(job, status, task)
        elif status is not job.status:
            self._changed(job, status, task)
        else:
            self._touch(job)  # same status, a fresher snapshot (URLs, messages)

    def _follow(self, job: Job, *, poll_now: bool = False) -> None:
        assert job.task_id is not None
        assert self.pollers is not None
        self.following[job.task_id] = job
        self.pollers.follow(self.entry(job), poll_now=poll_now)

    def _changed(self, job: Job, status: JobStatus, task: Task | None) -> None:
        job._change(status, task)
        self._touch(job)
        for mirror in self._mirrors_of(job):
            # A mirror that polled its way further on its own keeps its own (later) snapshot.
            if _RANK[status] >= _RANK[mirror.status]:
                mirror.task = task if task is not None else mirror.task
                if mirror.status is not status:
                    mirror._change(status, task)
            self._touch(mirror)

    def _mirrors_of(self, job: Job) -> list[Job]:
        if not self._mirrors or job.task_id is None or self.by_task.get(job.task_id) is not job:
            return []
        return self._mirrors.get(job.task_id, [])

    def _touch(self, job: Job) -> None:
        if self.store is not None and not self.entry(job).replica:
            self.store.touch(job)

    def _end(self, job: Job, status: JobStatus, task: Task | None) -> None:
        entry = self.entry(job)
        mirrors: list[Job] = []
        if job.task_id is not None:
            if self.following.get(job.task_id) is job:
                del self.following[job.task_id]
            if self.by_task.get(job.task_id) is job:
                mirrors = self._mirrors.pop(job.task_id, [])
        self._give_back(job, entry)
        job._change(status, task)
        self._touch(job)
        _log_outcome(job)
        for mirror in mirrors:
            self._mirrored.discard(mirror)
            if not mirror.done:
                mirror.task = task if task is not None else mirror.task
                mirror.error = job.error
                mirror._change(status, task)
                self._touch(mirror)

    def closed(self) -> None:
        """The client closed: every slot its unfinished jobs hold is given back. Their tasks
        may go on server-side, but this client no longer accounts for them; whoever follows
        them next (a new client tracking them, or resuming them from a store) takes its own."""
        self.collector.close()
        for job in list(self.jobs.values()):
            entry = self.entry(job)
            if entry.holds_slot:
                self._give_back(job, entry)

    def _give_back(self, job: Job, entry: Entry) -> None:
        if entry.holds_slot:
            entry.holds_slot = False
            try:
                self.slots.release(job.id)
            except Exception:
                # A shared limiter that fails must not keep the job from ending; its lease
                # (if it keeps one) expires on its own.
                log.exception("the slot limiter failed to release job %s", job.id)

    # --- the job store ---------------------------------------------------------------------

    def record(self, job: Job) -> JobRecord:
        """What the job store keeps of ``job`` now."""
        error = job.error
        return JobRecord(
            id=job.id,
            request=job.request,
            task_id=job.task_id,
            status=job.status,
            task=job.task,
            sent=self.entry(job).sent,
            possible_duplicate=job.possible_duplicate,
            error=None if error is None else error_message(error),
            error_type=None if error is None else error_type(error),
            created_at=job._made,
            updated_at=job._updated,
        )


def _log_erfc(x: float) -> float:
    """log(erfc(x)), also where erfc underflows (far in a class's tail): for large x,
    erfc(x) ~ exp(-x^2) / (x sqrt(pi)) (1 - 1/(2x^2))."""
    if x < 5.0:
        return math.log(math.erfc(x))
    return -x * x - math.log(x * math.sqrt(math.pi)) + math.log1p(-0.5 / (x * x))


def _ended_since(fit: tuple[float, float], seen: float, now: float) -> float:
    """P(a log-normal task alive at age ``seen`` ended by age ``now``); ``fit`` is
    (log median, sigma * sqrt 2). Worked in log space, so a task far past its class's
    durations still expects only its (small) tail hazard's worth of ends in a moment."""
    if now <= seen:
        return 0.0
    mu, scale = fit
    survived = _log_erfc((math.log(now) - mu) / scale) - _log_erfc((math.log(seen) - mu) / scale)
    return -math.expm1(min(0.0, survived))


def _class_of(request: Text2VideoRequest) -> ClassKey:
    return (request.effective_model, request.effective_mode, request.effective_duration)


def _log_outcome(job: Job) -> None:
    if not log.isEnabledFor(logging.INFO):
        return
    if job.status is JobStatus.SUCCEEDED:
        log.info("job %s succeeded (task %s)", job.id, job.task_id)
    elif job.status is JobStatus.FAILED:
        reason = job.task.status_message if job.task is not None else None
        log.info("job %s failed (task %s): %s", job.id, job.task_id, reason or "no reason given")
    else:
        kind = type(job.error).__name__ if job.error is not None else "error"
        detail = job.error if isinstance(job.error, KlingError) else kind
        log.info("job %s ended without a result (%s): %s", job.id, kind, detail)


def _incomplete_end(task: Task) -> bool:
    """An end reported without what an end carries: a success with no video, a failure with
    no reason (a create answer's short form from a task that ended at once)."""
    if task.status is TaskStatus.SUCCEEDED:
        return not task.videos
    return task.status is TaskStatus.FAILED and not task.status_message
