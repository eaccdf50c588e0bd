"""The poller pool: a few coroutines serving one schedule for every task the client follows.

The pool owns the schedule and the requests; the tracker owns what they show. One heap keyed
by next poll time replaces a sleeping coroutine per task, so following 100,000
tasks costs a heap entry each, not a task each. A task's next poll comes from its class's
``DurationModel`` (:mod:`kling_async.protocol.schedule`), which learns from every task of
the class that ends.
Where the backend has the list endpoint and many tasks are active, one list sweep (500 tasks a
page) can stand in for hundreds of single GETs.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import random
import time
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from kling_async._errors import (
    AccountError,
    AuthenticationError,
    InvalidRequestError,
    KlingError,
    TaskNotFoundError,
    UnreachableError,
)
from kling_async.http.resources import TaskResource
from kling_async.protocol.poll import PollPolicy

if TYPE_CHECKING:
    from kling_async.engine.jobs import Job
    from kling_async.engine.tracker import Entry, Tracker

__all__ = ["PollerPool"]

log = logging.getLogger("kling_async")

_PAGE_SIZE = 500
_MAX_PAGE = 1000  # the list endpoint's pageNum range is 1..1000
#: A task reported missing this many times in a row is given up (fresh tasks may lag the index).
_MISSES_ALLOWED = 3
#: Poll rounds (each already retried) that may fail in a row before a job ends with the error,
#: and only once the failures have lasted this many ``max_interval``\ s: a storm of transient
#: errors must not end jobs whose tasks are running fine.
_FAILURES_ALLOWED = 10
_FAILING_INTERVALS = 10
#: Tasks of a list page applied between two yields to the event loop.
_YIELD_EVERY = 100


class PollerPool:
    """Polls the jobs the tracker follows until they end; see the module docstring.

    The pool owns the schedule and the requests; what a poll shows is reported to the
    tracker (:meth:`Tracker.snapshot`, :meth:`Tracker.fail`), which owns the job's state.
    """

    # The heap holds (due, sequence, token, entry); an item whose token is no longer the
    # entry's was superseded by a later schedule and is skipped when it comes up.

    def __init__(
        self,
        resource: TaskResource,
        policy: PollPolicy,
        tracker: Tracker,
        *,
        list_sweep: bool = False,
        sweep_threshold: int = 20,
        rng: random.Random | None = None,
    ) -> None:
        self._resource = resource
        self.policy = policy
        self._tracker = tracker
        tracker.pollers = self
        self._list_sweep = list_sweep
        self._sweep_threshold = sweep_threshold
        self._rng = rng or random.Random()
        self._heap: list[tuple[float, int, int, Entry]] = []
        self._seq = itertools.count()
        self._wakeup = anyio.Event()
        self._sweeping: anyio.Event | None = None
        self._last_sweep = -math.inf
        #: Tasks the last sweep looked for and did not find: they are polled one by one.
        self._missed_by_sweep: set[str] = set()
        self._sweep_failures = 0
        self._sweeps_paused_until = -math.inf
        self.polls = 0
        self.sweeps = 0

    # --- scheduling (the tracker's calls) ---------------------------------------------------

    @property
    def following(self) -> dict[str, Job]:
        return self._tracker.following

    def follow(self, entry: Entry, *, poll_now: bool = False) -> None:
        """Put a newly followed job on the schedule (its first poll from its class's plan, or
        the safety net while callbacks come for tasks like it)."""
        if poll_now:
            self.poll_now(entry)
        elif self._tracker.pushes(entry):
            self._schedule(entry, time.monotonic() + self._safety_gap())
        else:
            model = self._tracker.durations.model(entry.class_key)
            self._schedule(entry, entry.started_at + model.next_age(0.0))

    def poll_now(self, entry: Entry) -> None:
        """Poll this job's task as soon as a poller is free (a track)."""
        self._schedule(entry, time.monotonic(), pinned=True)

    def hinted(self, entry: Entry, *, ending: bool) -> None:
        """A callback came for this job's task. One that claims an end is confirmed by a poll
        now, or ``min_interval`` after the last one a hint brought (duplicates and forgeries
        cost at most one poll per interval); any other puts off a planned poll to the safety
        net, never one already due to confirm."""
        now = time.monotonic()
        if ending:
            entry.unconfirmed = True
            # Never sooner than a back-off the task is in (not found yet, failing polls):
            # claims, forged or not, must not use up what those rounds allow.
            at = max(self._confirm_at(entry, now), entry.not_before)
            if not (entry.pinned and entry.due <= at):  # one is due (or on its way)
                self._confirm(entry, at)
        elif not entry.pinned:
            # The net counts from the last look, so callbacks that keep coming can never put
            # the next poll off for ever.
            net = max(now, entry.started_at + entry.poll_age + self._safety_gap())
            if entry.due < net:
                self._schedule(entry, net)

    def _confirm_at(self, entry: Entry, now: float) -> float:
        """Now, or ``min_interval`` after the last confirming poll (never later than that)."""
        wait = self.policy.min_interval
        return max(now, min(entry.confirmed_at + wait, now + wait))

    def _confirm(self, entry: Entry, at: float) -> None:
        entry.confirmed_at = at
        self._schedule(entry, at, pinned=True)

    def schedule_next(self, entry: Entry) -> None:
        """Schedule the next poll after a snapshot at ``entry.poll_age``.

        While callbacks come for the task, each that claims an end bringing a poll forward by
        itself, the schedule keeps only a safety net: one poll every ``safety_interval``, in
        case the callback that matters is lost."""
        age = entry.poll_age
        now = time.monotonic()
        if entry.unconfirmed:
            # A callback claimed an end while the last poll was on its way: look again.
            self._confirm(entry, self._confirm_at(entry, now))
            return
        if self._tracker.pushes(entry):
            self._schedule(entry, now + self._safety_gap())
            return
        gap = self._tracker.durations.model(entry.class_key).next_age(age) - age
        gap = max(self.policy.min_interval * 0.5, self.policy.jittered(gap, self._rng))
        self._schedule(entry, now + gap)

    def _safety_gap(self) -> float:
        # Jittered down only: the net sees every end within ``safety_interval``.
        jitter = self.policy.jitter
        return self.policy.safety_interval * self._rng.uniform(1 - jitter, 1)

    def _schedule(self, entry: Entry, due: float, *, pinned: bool = False) -> None:
        entry.poll_token += 1
        entry.due = due
        entry.pinned = pinned
        was_first = not self._heap or due < self._heap[0][0]
        heapq.heappush(self._heap, (due, next(self._seq), entry.poll_token, entry))
        if was_first:
            self._wakeup.set()

    async def _sleep(self, seconds: float | None) -> None:
        event = self._wakeup
        with anyio.move_on_after(seconds):
            await event.wait()
        if event.is_set() and self._wakeup is event:
            self._wakeup = anyio.Event()

    # --- the workers -----------------------------------------------------------------------

    async def run(self, workers: int) -> None:
        """Serve the schedule: one dispatcher sleeps until the next poll is due and hands it
        to the first free of ``workers`` pollers, so a schedule change wakes one coroutine,
        not all of them, and a busy pool holds due polls back instead of piling them up."""
        send, receive = anyio.create_memory_object_stream["tuple[Entry, int]"](0)
        async with anyio.create_task_group() as tg, send, receive:
            for _ in range(workers):
                tg.start_soon(self._work, receive.clone(), name="kling-poller")
            await self._dispatch(send)

    async def _dispatch(self, send: MemoryObjectSendStream[tuple[Entry, int]]) -> None:
        heap = self._heap
        while True:
            if not heap:
                await self._sleep(None)
                continue
            due, _, token, entry = heap[0]
            delay = due - time.monotonic()
            if delay > 0:
                await self._sleep(delay)
                continue
            heapq.heappop(heap)
            if token == entry.poll_token and not entry.job.done:
                await send.send((entry, token))

    async def _work(self, receive: MemoryObjectReceiveStream[tuple[Entry, int]]) -> None:
        async with receive:
            async for entry, token in receive:
                if self._sweeping is not None:
                    # A sweep in flight is about to look at this task too; see what it finds.
                    await self._sweeping.wait()
                if token != entry.poll_token or entry.job.done:
                    continue
                try:
                    await self._serve(entry)
                except Exception:
                    # A bug must not take every other task down with it: log it loudly and
                    # keep following this task, more slowly.
                    log.exception("following task %s failed unexpectedly", entry.job.task_id)
                    if not entry.job.done:
                        self._schedule(entry, time.monotonic() + self.policy.max_interval)

    async def _serve(self, entry: Entry) -> None:
        if not self._sweeping_on() or entry.job.task_id in self._missed_by_sweep:
            await self._poll(entry)
        elif (wait := self._last_sweep + self.policy.min_interval - time.monotonic()) > 0:
            # A sweep covers everyone soon: it is cheaper than a poll of its own.
            self._schedule(entry, time.monotonic() + wait, pinned=entry.pinned)
        else:
            await self._sweep(entry)

    def _sweeping_on(self) -> bool:
        return (
            self._list_sweep
            and len(self.following) >= self._sweep_threshold
            and time.monotonic() >= self._sweeps_paused_until
        )

    async def _poll(self, entry: Entry) -> None:
        job = entry.job
        assert job.task_id is not None
        self.polls += 1
        entry.unconfirmed = False  # what this poll sees answers every hint before it
        try:
            task = await self._resource.get(job.task_id)
        except KlingError as exc:
            if self.following.get(job.task_id) is not job:
                return  # no longer this job's to follow (it ended, or another took the task)
            self._poll_failed(entry, exc)
            return
        entry.not_found = entry.failures = 0
        entry.failing_since = None
        self._tracker.snapshot(job, task, time.monotonic())

    def _poll_failed(self, entry: Entry, error: KlingError) -> None:
        job = entry.job
        if isinstance(error, TaskNotFoundError):
            entry.not_found += 1
            if entry.not_found >= _MISSES_ALLOWED:
                self._tracker.fail(job, error)
            else:
                gap = self.policy.min_interval * 2**entry.not_found
                entry.not_before = time.monotonic() + gap
                self._schedule(entry, entry.not_before)
        elif isinstance(
            error, AuthenticationError | AccountError | InvalidRequestError | UnreachableError
        ):
            # A verdict about this task, this account or the host: asking again cannot
            # change it (an unreachable host's jobs keep their task_id for track()).
            self._tracker.fail(job, error)
        else:
            # Retries for this poll ran out; the task is not lost, just looked at later (with
            # a growing gap, so an outage costs few requests and recovery is seen soon), and
            # given up (its task_id kept on the job) only after many such rounds in a row.
            entry.failures += 1
            if entry.failing_since is None:
                entry.failing_since = time.monotonic()
            lasted = time.monotonic() - entry.failing_since
            if (
                entry.failures >= _FAILURES_ALLOWED
                and lasted >= _FAILING_INTERVALS * self.policy.max_interval
            ):
                self._tracker.fail(job, error)
                return
            log.warning("poll of task %s failed (%s); trying again later", job.task_id, error)
            gap = min(self.policy.max_interval, self.policy.min_interval * 2**entry.failures)
            entry.not_before = time.monotonic() + gap
            self._schedule(entry, entry.not_before)

    async def _sweep(self, trigger: Entry) -> None:
        """Look at every followed task through the list endpoint (500 tasks a page).

        The list is newest first and may hold many tasks that are not ours, so paging goes
        on only while one more page is cheaper than polling the tasks still missing one by
        one, and never past the API's last page number.
        """
        self._sweeping = sweeping = anyio.Event()
        wanted = set(self.following)
        seen: set[str] = set()
        missing = len(wanted)
        try:
            for page in range(1, _MAX_PAGE + 1):
                tasks = await self._resource.list(page=page, page_size=_PAGE_SIZE)
                observed_at = time.monotonic()
                for index, task in enumerate(tasks, 1):
                    task_id = task.task_id
                    job = self.following.get(task_id)
                    if job is not None and task_id not in seen:
                        seen.add(task_id)
                        missing -= task_id in wanted
                        self._tracker.snapshot(job, task, observed_at)
                    if index % _YIELD_EVERY == 0:
                        await anyio.lowlevel.checkpoint()  # a page is big: let others run
                if len(tasks) < _PAGE_SIZE or missing <= page:
                    break
            self.sweeps += 1
            self._missed_by_sweep = {i for i in wanted - seen if i in self.following}
        except InvalidRequestError as exc:
            # The backend refuses the list endpoint (a gateway without it): stop trying.
            log.warning("list sweeps refused (%s); polling tasks one by one from now on", exc)
            self._list_sweep = False
        except KlingError as exc:
            self._sweep_failures += 1
            pause = min(600.0, self.policy.max_interval * 2 ** (self._sweep_failures - 1))
            self._sweeps_paused_until = time.monotonic() + pause
            log.warning("list sweep failed (%s); polling one by one for %.0f s", exc, pause)
        else:
            self._sweep_failures = 0
        finally:
            self._last_sweep = time.monotonic()
            self._sweeping = None
            sweeping.set()
        if trigger.job.task_id not in seen and not trigger.job.done:
            await self._poll(trigger)
