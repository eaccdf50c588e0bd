"""The submitter: a queue of jobs drained by a few create coroutines, within Kling's slots.

The slot limit itself, learned from 1303 answers, is
:class:`~kling_async.engine.limits.AdaptiveLimit`.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import Callable

import anyio
import anyio.abc
import attrs

from kling_async._errors import (
    AccountError,
    AmbiguousSubmissionError,
    AuthenticationError,
    ConcurrencyLimitError,
    JobStoreError,
    KlingError,
    RateLimitError,
    TransportError,
    UnreachableError,
)
from kling_async.engine.jobs import Job
from kling_async.engine.limits import RequestLimiter
from kling_async.engine.tracker import Disowned, Tracker
from kling_async.http.create import CreateSettings, CreateState, LandedUnseen
from kling_async.http.health import Health
from kling_async.http.resources import TaskResource
from kling_async.protocol.models import Task
from kling_async.protocol.retry import RetryPolicy

__all__ = ["Submitter"]

log = logging.getLogger("kling_async")

#: A job whose create stays ambiguous is queued again (each round starts with a lookup) for
#: at least this many rounds and as long as the retry policy's timeout: a storm that fails
#: most lookups must not end jobs whose first create may well have landed.
_AMBIGUOUS_ROUNDS = 6


@attrs.define
class _Pending:
    """A job on its way to a task: what is known of its creates, and its rounds so far (those
    that ended ambiguous, since when, and those that could not connect)."""

    state: CreateState
    ambiguous_rounds: int = 0
    ambiguous_since: float | None = None
    unreachable_rounds: int = 0


@attrs.define
class SubmitStats:
    submitted: int = 0
    rejected: int = 0


class Submitter:
    """Drains the job queue with ``workers`` create coroutines (``max_concurrent_submits``).

    Each job's :class:`CreateState` is kept here across its rounds, so a create once
    ambiguous stays so (and is looked up first) until a lookup or a POST settles it; a 1303
    changes nothing about it. A job proven created but not yet visible is looked for by a
    finder in the submitter's own task group, holding its slot, so the create workers move on.
    What each create's answer means for the job and its slot is reported to the tracker.
    """

    def __init__(
        self,
        resource: TaskResource,
        tracker: Tracker,
        requests: RequestLimiter,
        *,
        retry: RetryPolicy,
        settle_window: float,
        health: Health,
    ) -> None:
        self._resource = resource
        self._tracker = tracker
        self._requests = requests
        self._retry = retry
        self._health = health
        self._settings = CreateSettings(
            retry=retry,
            settle_window=settle_window,
            retry_concurrency=False,
            hand_off_landed=True,
        )
        self._rng = random.Random()
        self._queue: deque[Job] = deque()
        self._work = anyio.Event()
        self.fatal: BaseException | None = None
        #: Told of an account-fatal stop met here (a shared account passes it on).
        self.on_stop: Callable[[BaseException], None] | None = None
        self.stats = SubmitStats()
        self._pending: dict[Job, _Pending] = {}
        self._task_group: anyio.abc.TaskGroup | None = None

    @property
    def queued(self) -> int:
        return len(self._queue)

    def enqueue(self, job: Job, *, resume: bool = False) -> None:
        """Queue ``job``; ``resume`` marks a request an earlier run may already have sent."""
        if self.fatal is not None:
            self._reject(job, self.fatal)
            return
        self._pending[job] = _Pending(
            CreateState.from_earlier_run(job.id) if resume else CreateState(job.id)
        )
        self._queue.append(job)
        self._work.set()

    async def _next_job(self) -> Job:
        while not self._queue:
            await self._work.wait()
            if not self._queue:
                self._work = anyio.Event()
        return self._queue.popleft()

    def stop(self, error: BaseException, *, told: bool = False) -> None:
        """Account-fatal: no more creates; queued jobs fail with the reason. ``told``: another
        client of a shared account met it (so it is not passed on again)."""
        if self.fatal is None:
            self.fatal = error
            log.error("submission stopped for the account: %s", error)
            if not told and self.on_stop is not None:
                self.on_stop(error)
        while self._queue:
            self._reject(self._queue.popleft(), error)

    def _give_up_unreachable(self, error: UnreachableError) -> None:
        """The host is unreachable: every queued job ends now, not one connect at a time.
        Not permanent: jobs submitted later try again."""
        while self._queue:
            self._reject(self._queue.popleft(), error)

    async def run(self, workers: int) -> None:
        """The create coroutines, and the finders of jobs proven created, in one task group."""
        async with anyio.create_task_group() as task_group:
            self._task_group = task_group
            for _ in range(workers):
                task_group.start_soon(self._work_loop, name="kling-submitter")

    async def _work_loop(self) -> None:
        while True:
            job = await self._next_job()
            if job.done or self._tracker.entry(job).replica:
                continue  # ended while queued (a fatal stop), or another client's now
            if (fatal := self.fatal) is not None:
                self._reject(job, fatal)
                continue
            await self._tracker.take_slot(job)
            if self._tracker.entry(job).replica:
                continue  # another client of the shared account owns it (and its lease)
            if (fatal := self.fatal) is not None:  # stopped while this job waited for a slot
                self._tracker.answered(job, "failed")
                self._reject(job, fatal)
                continue
            await self._submit(job)

    async def _submit(self, job: Job) -> None:
        assert job.request is not None
        tracker = self._tracker
        pending = self._pending[job]
        state = pending.state
        sent_at = time.monotonic()
        try:
            await tracker.submitting(job)
            task = await self._resource.create_prepared(job.request, self._settings, state)
        except LandedUnseen:
            # Created (the server refused the repeat), not visible yet: look for it apart,
            # holding its slot, so this worker can move on.
            tracker.answered(job, "landed")
            assert self._task_group is not None
            self._task_group.start_soon(self._find, job, state, sent_at, name="kling-finder")
        except Disowned:
            # Another client of the shared account owns it (and its lease): nothing was sent.
            tracker.answered(job, "failed")
            self._pending.pop(job, None)
        except JobStoreError as exc:
            # The mark before the create could not be written, so nothing was sent: the job
            # waits (the store may be back soon: a shared one restarting) instead of ending.
            tracker.answered(job, "failed")
            pending.unreachable_rounds += 1
            log.error("job %s waits: %s", job.id, exc)  # noqa: TRY400 (one line a round)
            await self._requeue_later(job, self._retry.delay(pending.unreachable_rounds))
        except ConcurrencyLimitError:
            # No task was created; the state (ambiguous or not) is kept as it is.
            tracker.answered(job, "refused")
            self._requeue(job)
        except AmbiguousSubmissionError as exc:
            tracker.answered(job, "failed")
            rounds = pending.ambiguous_rounds = pending.ambiguous_rounds + 1
            if pending.ambiguous_since is None:
                pending.ambiguous_since = time.monotonic()
            waited = time.monotonic() - pending.ambiguous_since
            patient = rounds < _AMBIGUOUS_ROUNDS or waited < self._retry.timeout
            if patient and self._resource.can_look_up:
                # Not lost, not duplicated: look it up again later, then create if absent.
                await self._requeue_later(job, self._retry.delay(rounds, rng=self._rng))
                return
            self._reject(job, exc)
        except RateLimitError as exc:
            tracker.answered(job, "failed")
            self._requests.pause(self._retry.delay(1, retry_after=exc.retry_after, throttled=True))
            self._requeue(job)
        except (AccountError, AuthenticationError) as exc:
            tracker.answered(job, "failed")
            self._reject(job, exc)
            self.stop(exc)
        except TransportError as exc:
            tracker.answered(job, "failed")
            unreachable = exc if isinstance(exc, UnreachableError) else self._health.unreachable()
            if exc.request_sent or unreachable is not None:
                self._reject(job, unreachable or exc)
                if unreachable is not None:
                    self._give_up_unreachable(unreachable)
                return
            # Provably never sent: nothing was created, so sending it later is safe; the
            # health verdict ends this once the host has been unreachable long enough.
            verdict_in = self._health.until_verdict()
            pending.unreachable_rounds += 1
            delay = self._retry.delay(pending.unreachable_rounds, rng=self._rng)
            await self._requeue_later(job, delay if verdict_in is None else min(delay, verdict_in))
        except KlingError as exc:
            tracker.answered(job, "failed")
            self._reject(job, exc)
        except Exception as exc:
            # A bug (or a job store that cannot write) must not take the other jobs down:
            # this job ends with it, loudly.
            tracker.answered(job, "failed")
            log.exception("submitting job %s failed unexpectedly", job.id)
            self._reject(job, exc)
        else:
            tracker.answered(job, "created")
            self._created(job, state, task, sent_at)

    def _created(self, job: Job, state: CreateState, task: Task, sent_at: float) -> None:
        self._pending.pop(job, None)
        self.stats.submitted += 1
        self._tracker.created(
            job,
            task,
            sent_at,
            possible_duplicate=state.possible_duplicate,
            earlier_run=state.earlier_runs_task,
        )

    async def _find(self, job: Job, state: CreateState, sent_at: float) -> None:
        try:
            task = await self._resource.find_landed(state)
        except Exception as exc:
            # Its slot is given up with it; a bug ends this job only, loudly.
            if not isinstance(exc, KlingError):
                log.exception("looking for a created task failed unexpectedly")
            self._reject(job, exc)
            return
        self._created(job, state, task, sent_at)

    def _requeue(self, job: Job) -> None:
        self._tracker.requeued(job)
        self._queue.appendleft(job)
        self._work.set()

    async def _requeue_later(self, job: Job, delay: float) -> None:
        """Hold the job (and this worker) for ``delay`` seconds, then put it first in line:
        when the server is down, every worker ends up waiting like this, which is the
        back-off we want. A good answer from the server ends the wait early."""
        self._tracker.requeued(job)
        await self._health.wait_recovered(delay)
        self._requeue(job)

    def _reject(self, job: Job, error: BaseException) -> None:
        self._pending.pop(job, None)
        if not job.done:
            self.stats.rejected += 1
        self._tracker.fail(job, error)
