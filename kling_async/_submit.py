"""The submitter: a queue of jobs drained by a few create coroutines, within Kling's slots.

Kling counts parallel tasks per account and answers 1303 past the limit, creating nothing.
The limit is not published (it depends on the resource pack), so :class:`AdaptiveLimit` learns
it: a 1303 lowers the limit to the tasks we hold, and the submitter then waits for one of them
to end; sustained success probes one slot higher, and each failed probe doubles the successes
required before the next, so a fixed limit costs only a logarithmic number of 1303s.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable

import anyio
import attrs

from ._budget import RequestBudget
from ._create import CreateSettings
from ._errors import (
    AccountError,
    AmbiguousSubmissionError,
    AuthenticationError,
    ConcurrencyLimitError,
    KlingError,
    RateLimitError,
    TransportError,
)
from ._jobs import Job, JobStatus
from ._models import Task
from ._resources import Text2VideoResource
from ._retry import RetryPolicy

__all__ = ["AdaptiveLimit", "Submitter"]

log = logging.getLogger("kling_async")

_FIRST_PROBE_AFTER = 4
#: Rounds a job whose create stays ambiguous is queued again (each starts with a lookup).
_AMBIGUOUS_ROUNDS = 6
#: Rounds a job whose create cannot reach the server is queued again before it fails.
_UNREACHABLE_ROUNDS = 8


class AdaptiveLimit:
    """Kling slots: ``active`` tasks held (create in flight or task not yet ended) against a
    ``limit`` that stays within [1, ``ceiling``]. ``ceiling`` None means unknown: start
    unbounded and learn from the first 1303."""

    def __init__(self, ceiling: int | None) -> None:
        self.ceiling: float = math.inf if ceiling is None else ceiling
        self.limit: float = self.ceiling
        self.active = 0
        self.peak_active = 0
        self.throttled = 0  # 1303 answers seen
        #: No create starts before this instant (after a 1303 while we hold no slot at all).
        self.not_before = 0.0
        self._idle_throttles = 0
        self._successes = 0
        self._probe_after = _FIRST_PROBE_AFTER
        self._probing = False
        self._changed = anyio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_changed(self, at_most: float | None = None) -> None:
        with anyio.move_on_after(at_most):
            await self._changed.wait()

    async def acquire(self) -> None:
        while True:
            if (pause := self.not_before - time.monotonic()) > 0:
                await self.wait_changed(at_most=pause)
            elif self.active >= self.limit:
                await self.wait_changed()
            else:
                break
        self.hold()

    def hold(self) -> None:
        """Count a slot without waiting (a task followed with ``track`` holds one too)."""
        self.active += 1
        self.peak_active = max(self.peak_active, self.active)

    def release(self) -> None:
        if self.active <= 0:
            log.error("slot released twice; the count stays at zero")
            return
        self.active -= 1
        self._notify()

    def on_success(self) -> None:
        self._idle_throttles = 0
        if self.active < self.limit or self.limit >= self.ceiling:
            return
        self._successes += 1
        if self._successes >= self._probe_after:
            self._successes = 0
            self._probing = True
            self.limit += 1
            self._notify()

    def on_concurrency_limit(self, retry: RetryPolicy, rng: random.Random) -> None:
        """A 1303 for the create holding one slot: that slot is released, and the server's
        limit is at most the tasks we still hold. Holding none (other clients of the account
        hold the slots), no task of ours will end to free one, so creates back off instead."""
        self.throttled += 1
        self.active = max(0, self.active - 1)
        if self._probing:
            self._probe_after *= 2
            self._probing = False
        self.limit = max(1, min(self.limit, self.active))
        self._successes = 0
        if self.active == 0:
            self._idle_throttles += 1
            self.not_before = time.monotonic() + retry.delay(self._idle_throttles, rng=rng)
        # Nothing to wake: the limit only went down.


@attrs.define
class SubmitStats:
    submitted: int = 0
    rejected: int = 0


class Submitter:
    """Drains the job queue with ``workers`` create coroutines (``max_concurrent_submits``)."""

    def __init__(
        self,
        resource: Text2VideoResource,
        limit: AdaptiveLimit,
        budget: RequestBudget,
        *,
        retry: RetryPolicy,
        settle_window: float,
        on_submitted: Callable[[Job, Task, float], None],
    ) -> None:
        self._resource = resource
        self.limit = limit
        self._budget = budget
        self._retry = retry
        self._settings = CreateSettings(
            retry=retry, settle_window=settle_window, retry_concurrency=False
        )
        self._on_submitted = on_submitted
        self._rng = random.Random()
        self._queue: deque[Job] = deque()
        self._work = anyio.Event()
        self.fatal: BaseException | None = None
        self.stats = SubmitStats()
        #: Jobs whose last create ended ambiguous, with the rounds they have had.
        self._unsettled: dict[Job, tuple[int, BaseException]] = {}
        #: Jobs whose creates could not reach the server, with the rounds they have had.
        self._unreachable: dict[Job, int] = {}

    @property
    def queued(self) -> int:
        return len(self._queue)

    def enqueue(self, job: Job, *, resume: bool = False) -> None:
        """Queue ``job``; ``resume`` marks a request an earlier run may already have sent."""
        if self.fatal is not None:
            self._reject(job, self.fatal)
            return
        if resume and job.external_task_id is not None:
            self._unsettled[job] = (0, AmbiguousSubmissionError(job.external_task_id))
        self._queue.append(job)
        self._work.set()

    async def _next_job(self) -> Job:
        while not self._queue:
            await self._work.wait()
            if not self._queue:
                self._work = anyio.Event()
        return self._queue.popleft()

    def _stop(self, error: BaseException) -> None:
        """Account-fatal: no more creates; queued jobs fail with the reason."""
        if self.fatal is None:
            self.fatal = error
            log.error("submission stopped for the account: %s", error)
        while self._queue:
            self._reject(self._queue.popleft(), error)

    async def run(self) -> None:
        """One create coroutine; the client starts ``max_concurrent_submits`` of them."""
        while True:
            job = await self._next_job()
            await self.limit.acquire()
            if self.fatal is not None:
                self.limit.release()
                self._reject(job, self.fatal)
                continue
            await self._submit(job)

    async def _submit(self, job: Job) -> None:
        assert job.request is not None
        job._set_status(JobStatus.SUBMITTING)
        sent_at = time.monotonic()
        rounds, earlier = self._unsettled.pop(job, (0, None))
        try:
            task = await self._resource.create_prepared(
                job.request, self._settings, earlier_ambiguity=earlier
            )
        except AmbiguousSubmissionError as exc:
            self.limit.release()
            if rounds + 1 < _AMBIGUOUS_ROUNDS and self._resource.can_look_up:
                # Not lost, not duplicated: look it up again later, then create if absent.
                self._unsettled[job] = (rounds + 1, exc.cause or exc)
                await self._requeue_later(job, self._retry.delay(rounds + 1, rng=self._rng))
                return
            self._reject(job, exc)
        except ConcurrencyLimitError:
            self._keep_unsettled(job, rounds, earlier)
            self.limit.on_concurrency_limit(self._retry, self._rng)
            self._requeue(job)
        except RateLimitError as exc:
            self._keep_unsettled(job, rounds, earlier)
            self.limit.release()
            self._budget.pause(self._retry.delay(1, retry_after=exc.retry_after, throttled=True))
            self._requeue(job)
        except (AccountError, AuthenticationError) as exc:
            self.limit.release()
            self._reject(job, exc)
            self._stop(exc)
        except TransportError as exc:
            self.limit.release()
            unreachable = self._unreachable.pop(job, 0) + 1
            if exc.request_sent or unreachable >= _UNREACHABLE_ROUNDS:
                self._reject(job, exc)
                return
            # Provably never sent: nothing was created, so sending it later is safe.
            self._keep_unsettled(job, rounds, earlier)
            self._unreachable[job] = unreachable
            await self._requeue_later(job, self._retry.delay(unreachable, rng=self._rng))
        except KlingError as exc:
            self.limit.release()
            self._reject(job, exc)
        except Exception as exc:
            # A bug must not take the other jobs down: this job ends with it, loudly.
            self.limit.release()
            log.exception("submitting a job failed unexpectedly")
            self._reject(job, exc)
        else:
            self._unreachable.pop(job, None)
            self.limit.on_success()
            self.stats.submitted += 1
            self._on_submitted(job, task, sent_at)

    def _keep_unsettled(self, job: Job, rounds: int, earlier: BaseException | None) -> None:
        """A create that was once ambiguous stays so until a lookup settles it."""
        if earlier is not None:
            self._unsettled[job] = (rounds, earlier)

    def _requeue(self, job: Job) -> None:
        job._set_status(JobStatus.QUEUED)
        self._queue.appendleft(job)
        self._work.set()

    async def _requeue_later(self, job: Job, delay: float) -> None:
        """Hold the job (and this worker) for ``delay`` seconds, then put it first in line:
        when the server is down, every worker ends up waiting like this, which is the
        back-off we want."""
        job._set_status(JobStatus.QUEUED)
        await anyio.sleep(delay)
        self._requeue(job)

    def _reject(self, job: Job, error: BaseException) -> None:
        self._unsettled.pop(job, None)
        self._unreachable.pop(job, None)
        job._fail(error)
        self.stats.rejected += 1
