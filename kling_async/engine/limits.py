"""The account's limits, as the engine sees them: slots and request rate.

Kling counts parallel tasks per account and answers 1303 past the limit, creating nothing.
The limit is not published (it depends on the resource pack), so :class:`AdaptiveLimit` learns
it: a 1303 lowers the limit to the tasks we hold, and the submitter then waits for one of them
to end. Sustained success at the limit probes one slot higher: a refused probe doubles the
successes required before the next (up to 256, and at least one probe every ``probe_period``
seconds, so a cap that rises late is still found), so a fixed limit costs only a logarithmic
number of 1303s; an accepted probe is followed by the next one after a single success, so a
raised cap is climbed a slot per finished task rather than a slot per several. (Probing by
more than a slot at a time would cost a burst of 1303s whenever a probe is accepted only
because a task ended unnoticed.)

A *slot probe* is the other kind. A task ends on the server a detection lag before a poll
sees it, and while jobs wait for a slot that lag delays the next job. So while jobs wait at a
limit the account has shown (a 1303), one create goes out anyway, at most every
``probe_interval`` seconds, once the tasks holding slots have likely ended unnoticed
(``unnoticed_ends``: the expected number that ended since they were last known to run, by
their classes' duration models). The account answers at once whether a slot is free:

- refused (1303), it created nothing and cost one request, and it says that every task we hold
  was still running, so the expected count starts again from that instant (which keeps probes
  to one or two per task, whatever the number of slots);
- accepted, its task holds a slot past the limit until the poll that sees the ended task gives
  that one back. It is a debt that the next end seen pays; a debt unpaid for
  ``probe_debt_limit`` seconds means the account took a task while none of ours had ended (its
  limit rose, or another client let go of slots), so probing stops until a 1303 again.

At most ``_MAX_PROBE_EXTRA`` slots are held past the limit so, and never past ``ceiling``: a
``max_active_tasks`` the user set is a cap even a probe keeps (a cap below the account's limit
never meets a 1303, so it is never probed past). A slot probe teaches the limit nothing: it
was sent past the limit on purpose.

:class:`RequestBudget` is a token bucket (``rate`` requests per second, bursts up to
``burst``) in the spirit of aiometer's ``max_per_second``; plus a global pause, which a 1302
("too fast") answer sets so that every coroutine of the client backs off together instead of
each retrying on its own.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Literal, Protocol, runtime_checkable

import anyio

from kling_async.protocol.retry import RetryPolicy

__all__ = ["AdaptiveLimit", "CreateOutcome", "RequestBudget", "RequestLimiter", "SlotLimiter"]

log = logging.getLogger("kling_async")

_FIRST_PROBE_AFTER = 4
#: Slots held beyond the limit by accepted slot probes, at most: each accepted one stands for
#: a task that ended unnoticed, and a poll soon sees it; more would only hide a raised limit.
_MAX_PROBE_EXTRA = 2
#: A slot probe goes once the tasks holding slots have, by their duration models, this many
#: ends expected between them since they were last known to run (a poll, or the last probe's
#: answer: a refused one says all ran, an accepted one that all but one did).
_PROBE_THRESHOLD = 0.3
#: Successes at the limit between probes never exceed this, so a raised cap is found.
_MAX_PROBE_AFTER = 256


#: How a create that held a slot was answered: ``created`` (its task is seen: the account
#: took one more), ``landed`` (its task exists but is not visible yet: the slot stays held, no
#: lesson), ``refused`` (1303: nothing was created, the slot is gone and the limit learns),
#: ``failed`` (any other outcome with no task: the slot is freed).
CreateOutcome = Literal["created", "landed", "refused", "failed"]


@runtime_checkable
class SlotLimiter(Protocol):
    """The account's parallel-task slots (Kling's concurrency limit), as the engine uses them.

    A slot is taken for one job (keyed by its id, so a shared implementation can keep a lease
    per job) by :meth:`acquire` before its create, or by :meth:`hold` for a task followed
    without a create (``track``, a job loaded from a store). The create's answer is reported
    once with :meth:`answered`; the slot of a job whose task exists is given back with
    :meth:`release` when the task ends, and when the client closes with the task still
    running (the client no longer accounts for it; whoever follows it next takes a slot of
    its own). Each slot taken (one per create round, or one per :meth:`hold`) is given back
    exactly once, by :meth:`answered` (``refused``/``failed``: no task) or :meth:`release`;
    an implementation may treat a second release of one job as a no-op. ``limit`` is the
    limit as learned so far (inf while unknown).
    """

    @property
    def active(self) -> int: ...

    @property
    def limit(self) -> float: ...

    @property
    def peak_active(self) -> int: ...

    async def acquire(self, job_id: str) -> None: ...

    def hold(self, job_id: str) -> None: ...

    def answered(self, job_id: str, outcome: CreateOutcome) -> None: ...

    def release(self, job_id: str) -> None: ...


@runtime_checkable
class RequestLimiter(Protocol):
    """The account's request rate: every request of the client waits in :meth:`acquire`;
    :meth:`pause` holds them all after a 1302 ("too fast"), so they back off together."""

    async def acquire(self) -> None: ...

    def pause(self, seconds: float) -> None: ...


class RequestBudget:
    """The in-process :class:`RequestLimiter`: ``await budget.acquire()`` before each request
    waits as long as the budget requires.

    Reservations are handed out in call order: each caller books the next free instant and
    sleeps until it, so waiters never race and the rate holds exactly over any window.
    """

    def __init__(self, rate: float | None, *, burst: int | None = None) -> None:
        if rate is not None and not (isinstance(rate, int | float) and rate > 0):
            raise ValueError(f"max_requests_per_second={rate!r} is invalid: must be > 0 or None")
        self.rate = rate
        self.burst = max(1, burst if burst is not None else math.ceil(rate or 1))
        self._next = 0.0  # the earliest instant the next request may start
        self._paused_until = 0.0

    def pause(self, seconds: float) -> None:
        """Hold every request for ``seconds`` from now (extends, never shortens, a pause)."""
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    async def acquire(self) -> None:
        # A pause may be extended while we sleep, so look again after each one.
        while (paused := self._paused_until - time.monotonic()) > 0:  # noqa: ASYNC110
            await anyio.sleep(paused)
        if self.rate is None:
            return
        now = time.monotonic()
        interval = 1.0 / self.rate
        # A bucket of `burst` tokens: an idle budget may start up to `burst` requests at once.
        slot = max(self._next, now - (self.burst - 1) * interval)
        self._next = slot + interval
        if slot > now:
            await anyio.sleep(slot - now)


class AdaptiveLimit:
    """The in-process :class:`SlotLimiter`: ``active`` slots held (create in flight or task not
    yet ended) against a ``limit`` that stays within [1, ``ceiling``]. ``ceiling`` None means
    unknown: start unbounded and learn from the first 1303. See the module docstring for
    probing. Held slots are kept per job id, so a second release of one job changes nothing
    (and is logged: the tracker never makes one).
    """

    def __init__(
        self,
        ceiling: int | None,
        *,
        retry: RetryPolicy | None = None,
        probe_period: float = 1200.0,
        probe_interval: float | None = None,
        unnoticed_ends: Callable[[float], float] | None = None,
        probe_debt_limit: float = 120.0,
        rng: random.Random | None = None,
    ) -> None:
        self.ceiling: float = math.inf if ceiling is None else ceiling
        #: Slot probes (see the module docstring): one create at most this often (seconds)
        #: while jobs wait at a limit the account has shown; None: never. ``unnoticed_ends``
        #: (given the instant all our tasks were last known to run) is the expected number of
        #: tasks holding slots that ended unseen; None: probe at every interval.
        self.probe_interval = probe_interval
        self._unnoticed_ends = unnoticed_ends
        self._slot_probe: str | None = None  # the job whose create is the slot probe in flight
        self._last_slot_probe = -math.inf  # when one was sent, or last found not worth it
        #: When a refused slot probe showed every task holding a slot still running.
        self._all_running_at = -math.inf
        #: When each accepted slot probe was sent, until a task end seen pays for it.
        self._probe_debts: deque[float] = deque()
        self.probe_debt_limit = probe_debt_limit
        #: The account refused a create at the limit in force (it is the account's, not ours).
        self._shown_full = False
        self.slot_probes = 0  # slot probes sent
        self.slot_probes_refused = 0  # of them, answered 1303 (also in concurrency_limited)
        #: However many successes the next probe waits for, one goes out at least this often
        #: (seconds) while demand presses on the limit, so a cap raised late is found.
        self.probe_period = probe_period
        self._retry = retry or RetryPolicy()
        self._rng = rng or random.Random()
        self._last_probe = time.monotonic()
        self.limit: float = self.ceiling
        self._holders: set[str] = set()
        self._in_flight: set[str] = set()  # creates sent and not answered yet
        self.peak_active = 0
        self.concurrency_limited = 0  # 1303 answers seen
        #: No create starts before this instant (after a 1303 while we hold no slot at all).
        self.not_before = 0.0
        self._idle_refusals = 0
        self._successes = 0
        self._probe_after = _FIRST_PROBE_AFTER
        #: After an accepted probe the next one goes after a single success.
        self._climbing = False
        #: While probing: the limit before the probe (a task beyond it proves the probe).
        self._probe_from: float | None = None
        self._changed = anyio.Event()

    @property
    def active(self) -> int:
        return len(self._holders)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def _wait_changed(self, at_most: float | None = None) -> None:
        with anyio.move_on_after(at_most):
            await self._changed.wait()

    async def acquire(self, job_id: str) -> None:
        while True:
            now = time.monotonic()
            if (pause := self.not_before - now) > 0:
                await self._wait_changed(at_most=pause)
            elif self.active < self.limit:
                break
            elif (probe_in := self._slot_probe_in(now)) is None:
                await self._wait_changed()
            elif probe_in > 0:
                await self._wait_changed(at_most=probe_in)
            elif not self._probe_worth_it():
                self._last_slot_probe = now  # look again an interval later
            else:
                self._slot_probe = job_id
                self._last_slot_probe = now
                self.slot_probes += 1
                break
        self.hold(job_id)
        self._in_flight.add(job_id)

    def _slot_probe_in(self, now: float) -> float | None:
        """Seconds until a slot probe may go (<= 0: now), or None while none may."""
        debts = self._probe_debts
        if debts and now - debts[0] > self.probe_debt_limit:
            # No end of ours paid for it: the account had room we did not take up.
            debts.clear()
            self._shown_full = False
            log.info("slot probes paused: the account accepted a task beyond its known limit")
        if (
            self.probe_interval is None
            or not self._shown_full
            or self._slot_probe is not None
            or self._probe_from is not None  # a probe of the limit is out: its answer first
            or self.active >= self.ceiling
            or self.active >= self.limit + _MAX_PROBE_EXTRA
        ):
            return None
        return self._last_slot_probe + self.probe_interval - now

    def _probe_worth_it(self) -> bool:
        if self._unnoticed_ends is None:
            return True
        return self._unnoticed_ends(self._all_running_at) >= _PROBE_THRESHOLD

    def hold(self, job_id: str) -> None:
        if job_id in self._holders:
            log.error("a slot was taken twice for job %s; it is counted once", job_id)
            return
        self._holders.add(job_id)
        self.peak_active = max(self.peak_active, self.active)

    def release(self, job_id: str) -> None:
        self._give_back(job_id, ended=True)

    def _give_back(self, job_id: str, *, ended: bool) -> None:
        if job_id not in self._holders:
            log.error("a slot was released twice for job %s; the count is unchanged", job_id)
            return
        self._holders.discard(job_id)
        self._in_flight.discard(job_id)
        if ended and self._probe_debts:
            self._probe_debts.popleft()  # a task of ours seen to end: the oldest probe is paid
        self._notify()

    def answered(self, job_id: str, outcome: CreateOutcome) -> None:
        self._in_flight.discard(job_id)
        if job_id == self._slot_probe:
            self._slot_probe_answered(job_id, outcome)
        elif outcome == "created":
            self._created()
        elif outcome == "refused":
            self._refused(job_id)
        elif outcome == "failed":
            self._give_back(job_id, ended=False)  # no task: it pays no probe's debt
        # "landed": the task exists unseen; its slot stays held and nothing is learned.

    def _created(self) -> None:
        self._idle_refusals = 0
        if self._probe_from is not None:
            existing = self.active - self.in_flight  # tasks known to exist, this one included
            if existing <= self._probe_from:
                return  # an older create; the probe's own answer is still to come
            self._probe_from = None
            self._climbing = True  # the account took one more: try the next soon
            self._shown_full = False  # until a 1303 shows the new limit
        if self.active != self.limit or self.limit >= self.ceiling:
            return  # below the limit, or past it by accepted slot probes: no lesson either way
        self._successes += 1
        due = self._successes >= (1 if self._climbing else self._probe_after)
        if due or time.monotonic() - self._last_probe >= self.probe_period:
            self._successes = 0
            self._last_probe = time.monotonic()
            self._probe_from = self.limit
            self.limit = min(self.ceiling, self.limit + 1)
            self._notify()

    def _slot_probe_answered(self, job_id: str, outcome: CreateOutcome) -> None:
        """A slot probe's answer: accepted, its task holds a slot past the limit until the task
        that ended unnoticed is seen; refused, it taught nothing (it was sent past the limit on
        purpose). Either way the next one may be timed."""
        self._slot_probe = None
        if outcome == "created":
            # One task of ours had ended unseen (it pays this debt when seen); the others
            # were running, as far as anything tells: ends count again from the probe.
            self._idle_refusals = 0
            self._probe_debts.append(self._last_slot_probe)
            self._all_running_at = self._last_slot_probe
        elif outcome == "refused":
            self.concurrency_limited += 1
            self.slot_probes_refused += 1
            self._all_running_at = self._last_slot_probe  # when it was sent
            self._holders.discard(job_id)
        elif outcome == "failed":
            self._give_back(job_id, ended=False)
            return
        self._notify()

    def _refused(self, job_id: str) -> None:
        """A 1303 for the create holding one slot: that slot is released, and the server's
        limit is at most the tasks we still hold. Holding none (other clients of the account
        hold the slots), no task of ours will end to free one, so creates back off instead."""
        self.concurrency_limited += 1
        self._holders.discard(job_id)
        if self._probe_from is not None:
            self._probe_after = min(self._probe_after * 2, _MAX_PROBE_AFTER)
            self._probe_from = None
        self._climbing = False
        self._shown_full = True
        self.limit = max(1, min(self.limit, self.active))
        self._successes = 0
        if self.active == 0:
            self._idle_refusals += 1
            self.not_before = time.monotonic() + self._retry.delay(
                self._idle_refusals, rng=self._rng
            )
        # Nothing to wake: the limit only went down.
