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

import asyncio
import enum
import heapq
import logging
import math
import random
import time
from collections import deque
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel

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
    from kling_async.engine.entry import Entry, HeapItem
    from kling_async.engine.jobs import Job
    from kling_async.engine.tracker import Tracker
    from kling_async.protocol.models import Task

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
#: A poll due this soon counts as due: a timer may fire a hair early (the loop's clock
#: resolution; uvloop's clock counts milliseconds), and waiting out the rest would cost one
#: more turn of the loop for nothing.
_DUE_WITHIN = 0.001


#: Superseded heap items dropped in one go, at most; an entry put back in at its due counts
#: as ``_REFILE_COST`` drops (a pop in C against a push that compares entries in Python).
_DROPS_PER_TURN = 2000
_REFILE_COST = 4


class _Turn(enum.Enum):
    AGAIN = "again"  # see ``PollerPool._take``


class _Early:
    """A poll brought forward while its entry waits in the heap under a later key: the
    entry stays where it is (it cannot be moved without knowing its place), and this item
    stands for the poll until a later schedule supersedes it (its ``token`` is no longer
    the entry's). Hints and the odd schedule that moves a poll up make these; every other
    schedule costs no item of its own."""

    __slots__ = ("entry", "heap_key", "token")

    def __init__(self, entry: Entry, due: float, token: int) -> None:
        self.entry = entry
        self.heap_key: float | None = due
        self.token = token

    def __lt__(self, other: HeapItem) -> bool:
        return self.heap_key < other.heap_key  # type: ignore[operator]  # (never None there)


class _Idle:
    """A poller with nothing to do: woken with a poll handed to it (or to look again)."""

    __slots__ = ("event", "item")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.item: tuple[Entry, int] | None = None


class PollerPool:
    """Polls the jobs the tracker follows until they end; see the module docstring.

    The pool owns the schedule and the requests; what a poll shows is reported to the
    tracker (:meth:`Tracker.snapshot`, :meth:`Tracker.fail`), which owns the job's state.
    """

    # The heap holds the entries themselves, each at most once, filed under ``heap_key``
    # (the due of the schedule that put it there): following 100,000 tasks costs the heap a
    # pointer each, and a sweep that reschedules them all pushes nothing. A schedule while
    # the entry is in the heap only changes its ``due`` when that is later than its key:
    # when the entry comes up it goes back in at its due (a poll put off, the usual case:
    # each snapshot puts the next poll further away). A schedule that moves the poll up
    # pushes an ``_Early`` item for it, which a later schedule supersedes (its token is no
    # longer the entry's), and the entry, when it comes up at its later key, is dropped.
    # An entry whose job ended or is no longer followed (another job follows its task,
    # another client owns it) is dropped when it comes up, as is a superseded ``_Early``.
    #
    # Pollers take due items themselves: one that finishes a poll takes the next due one
    # at once, and one with nothing due waits in ``_idle``. One timer (the event loop's
    # own, ``_timer``) is armed for the heap's head while some poller waits, and re-armed
    # only when an earlier item becomes the head; when it fires, due items are handed to
    # waiting pollers directly. So a due poll costs the loop what a sleep does (the timer's
    # turn, then the poller's), not a cancel scope and a rendezvous each, and a busy pool
    # leaves due polls in the heap instead of piling them up.

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
        self._heap: list[Entry | _Early] = []
        self._idle: deque[_Idle] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._sweeping: anyio.Event | None = None
        self._last_sweep = -math.inf
        #: Sweeps are numbered; an entry keeps the number of the last one that saw its task
        #: (``Entry.swept``), which costs each a slot, not a place in two sets per sweep.
        self._sweep_number = 0
        #: Tasks the last sweep looked for and did not find: they are polled one by one.
        self._missed_by_sweep: set[str] = set()
        #: Each page of the last sweep: its answer's fingerprint and the tasks it gave, so
        #: an unchanged page is neither parsed nor structured again (see ``list_page``).
        self._pages: dict[int, tuple[int, list[Task]]] = {}
        #: Only a real task resource gives answers' fingerprints (a stand-in may only ``get``).
        self._remembers = isinstance(resource, TaskResource)
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
        if self._sweeping is not None:
            entry.swept = -self._sweep_number  # followed during a sweep: not looked for
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
        entry.poll_token = token = entry.poll_token + 1
        entry.due = due
        entry.pinned = pinned
        key = entry.heap_key
        if key is None:
            entry.heap_key = due
            heapq.heappush(self._heap, entry)
        elif due < key:
            heapq.heappush(self._heap, _Early(entry, due, token))
        # else: the entry comes up at its key first, and goes back in at ``due`` then.
        if self._idle and due < self._timer_at:
            self._release()  # a new head while pollers wait: hand it over, or re-arm

    # --- handing due polls to pollers ------------------------------------------------------

    def scheduled(self, entry: Entry) -> float | None:
        """When the heap has the entry's next poll due (None: it has none). It looks through
        the whole heap: for tests and debugging, not for the pool's own use."""
        for item in self._heap:
            if isinstance(item, _Early):
                if item.entry is entry and item.token == entry.poll_token:
                    return item.heap_key
            elif item is entry and entry.heap_key is not None and entry.due >= entry.heap_key:
                return entry.due
        return None

    def _drop_superseded(self) -> bool:
        """Settle the heap's head: drop the items that no longer stand for a poll, and put
        the entries whose poll was put off back in at their due, until the head is a poll
        meant at its key. False if there were so many that the rest must wait for the next
        turn of the loop (100,000 tasks whose first polls a sweep put off all come up)."""
        heap = self._heap
        following = self.following
        budget = _DROPS_PER_TURN
        while budget > 0:
            budget -= 1
            if not heap:
                return True
            item = heap[0]
            if isinstance(item, _Early):
                entry = item.entry
                if item.token == entry.poll_token and not entry.job.done:
                    return True
                heapq.heappop(heap)
                continue
            job, due, key = item.job, item.due, item.heap_key
            if key is None or due < key or job.done or following.get(job.task_id or "") is not job:
                # Moved up (an ``_Early`` has it), ended, or followed by another job or
                # another client now.
                item.heap_key = None
                heapq.heappop(heap)
            elif due == key:
                return True
            else:
                item.heap_key = due  # put off: back in at its due
                heapq.heapreplace(heap, item)
                budget -= _REFILE_COST - 1
        return False

    def _take(self) -> tuple[Entry, int] | _Turn | None:
        """The next due poll still meant, None if none is due, or ``_Turn.AGAIN`` to look
        again after letting others run."""
        if not self._drop_superseded():
            return _Turn.AGAIN
        heap = self._heap
        if heap and (key := heap[0].heap_key) is not None and key <= time.monotonic() + _DUE_WITHIN:
            item = heapq.heappop(heap)
            if isinstance(item, _Early):
                return item.entry, item.token
            item.heap_key = None
            return item, item.poll_token
        return None

    def _release(self) -> None:
        """Hand due polls to waiting pollers, one each; then arm the timer for the next."""
        idle = self._idle
        while idle:
            item = self._take()
            if item is None or item is _Turn.AGAIN:
                break
            poller = idle.popleft()
            poller.item = item
            poller.event.set()
        self._arm()

    def _arm(self) -> None:
        """Arm the one timer for the heap's head, if some poller waits and the timer is not
        armed for that instant or an earlier one (a timer that fires early just re-arms)."""
        if not self._idle or self._loop is None:
            return
        heap = self._heap
        if not self._drop_superseded():
            head = -math.inf  # more to drop: at the next turn
        elif heap and (key := heap[0].heap_key) is not None:
            head = key
        else:
            return
        if head >= self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = head
        self._timer = self._loop.call_later(max(0.0, head - time.monotonic()), self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        self._release()

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._timer_at = math.inf

    # --- the workers -----------------------------------------------------------------------

    async def run(self, workers: int) -> None:
        """Serve the schedule with ``workers`` pollers (see the class comment): each takes
        the next due poll itself, or waits to be handed one when the timer fires, so a
        schedule change wakes one coroutine, not all of them, and a busy pool holds due
        polls back instead of piling them up (at most ``workers`` in flight)."""
        self._loop = asyncio.get_running_loop()
        try:
            async with anyio.create_task_group() as tg:
                for _ in range(workers):
                    tg.start_soon(self._work, name="kling-poller")
        finally:
            self._disarm()
            self._idle.clear()
            self._loop = None

    async def _work(self) -> None:
        me = _Idle()
        streak = 0  # polls taken in a row without waiting
        while True:
            item = self._take()
            if item is _Turn.AGAIN:
                await anyio.lowlevel.checkpoint()
                continue
            if item is not None:
                streak += 1
                if streak % _YIELD_EVERY == 0:
                    # Many due at once (100,000 tracked, a sweep putting them off): most
                    # are served without a request, so let others run now and then.
                    await anyio.lowlevel.checkpoint()
            else:
                streak = 0
                self._idle.append(me)
                self._arm()
                try:
                    await me.event.wait()
                finally:
                    if me.item is None and me in self._idle:
                        self._idle.remove(me)  # cancelled while waiting
                me.event = anyio.Event()
                item, me.item = me.item, None
                if item is None:
                    continue
            entry, token = item
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
            if self._remembers:
                task, entry.answer_hash = await self._resource.poll(
                    job.task_id, entry.answer_hash, entry.answer
                )
                entry.answer = task
            else:
                task = await self._resource.get(job.task_id)
        except KlingError as exc:
            if self.following.get(job.task_id) is not job:
                return  # no longer this job's to follow (it ended, or another took the task)
            self._poll_failed(entry, exc)
            return
        entry.clear_failures()
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
        self._sweep_number = number = self._sweep_number + 1
        following = self.following
        entry_of = self._tracker.entry
        # The sweep looks for the tasks followed now; one followed meanwhile is applied if
        # a page shows it, but not looked for (``follow`` marks it -number). An entry seen
        # is marked ``number``, so a task a page shift shows twice is applied once.
        wanted = len(following)
        seen = 0  # wanted tasks seen

        def held(task_id: str) -> str | None:
            job = following.get(task_id)
            return None if job is None else job.task_id

        try:
            for page in range(1, _MAX_PAGE + 1):
                known, last = self._pages.get(page, (None, None))
                tasks, fingerprint = await self._resource.list_page(
                    page, _PAGE_SIZE, known=known, last=last, held=held
                )
                if fingerprint is None:
                    self._pages.pop(page, None)
                else:
                    self._pages[page] = (fingerprint, tasks)
                observed_at = time.monotonic()
                for index, task in enumerate(tasks, 1):
                    job = following.get(task.task_id)
                    if job is not None:
                        entry = entry_of(job)
                        if entry.swept != number:
                            seen += entry.swept != -number
                            entry.swept = number
                            self._tracker.snapshot(job, task, observed_at)
                    if index % _YIELD_EVERY == 0:
                        await anyio.lowlevel.checkpoint()  # a page is big: let others run
                if len(tasks) < _PAGE_SIZE or wanted - seen <= page:
                    for stale in [p for p in self._pages if p > page]:
                        del self._pages[stale]
                    break
            self.sweeps += 1
            self._missed_by_sweep = (
                set()
                if seen >= wanted
                else {
                    task_id
                    for task_id, job in following.items()
                    if entry_of(job).swept not in (number, -number)
                }
            )
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
        if trigger.swept != number and not trigger.job.done:
            await self._poll(trigger)
