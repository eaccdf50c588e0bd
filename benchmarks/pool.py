"""Pool: event-loop iterations per poll, the poller pool's own overhead.

Each contender makes ``polls`` polls due one after another, ``spacing`` seconds apart, against
a task resource that answers at once (no network, no await): what is left is what handing a
due poll to a poller costs the event loop. Iterations are counted as calls of the loop's
selector (one per turn of the loop), from the first poll to the last:

- ``kling_async``: the SDK's pool (pollers take due polls themselves; one loop timer for
  the heap's head, re-armed only when the head changes);
- ``legacy_dispatcher``: the dispatcher it replaced (``benchmarks/_legacy_pool.py``: a cancel
  scope and timer per sleep, a zero-buffer stream per hand-off);
- ``sleeping_loop``: one coroutine sleeping until each instant, the floor (2 iterations a
  sleep: the timer's turn, then the coroutine's).

One line per contender::

    pool contender=kling_async polls=500 loop_iterations_per_poll=...
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import anyio

import kling_async as ka
from kling_async.engine.durations import LearnedDurations
from kling_async.engine.jobs import EventHub
from kling_async.engine.pollers import PollerPool
from kling_async.engine.tracker import Tracker

from ._legacy_pool import LegacyPollerPool

POLLS = 500
SPACING = 0.004


class _Counter:
    """Counts the turns of the running loop (its selector's calls) between two marks."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self._selector: Any = loop._selector  # type: ignore[attr-defined]
        self._select: Callable[..., Any] = self._selector.select
        self.turns = 0
        self.first = 0
        self.last = 0

        def select(timeout: float | None = None) -> Any:
            self.turns += 1
            return self._select(timeout)

        self._selector.select = select

    def close(self) -> None:
        self._selector.select = self._select

    def mark_first(self) -> None:
        self.first = self.turns

    def mark_last(self) -> None:
        self.last = self.turns


class _Answers:
    """A task resource that answers every poll at once, and says when the last was made."""

    def __init__(self, polls: int, counter: _Counter, done: asyncio.Event) -> None:
        self._left = polls
        self._first = True
        self._counter = counter
        self._done = done

    async def get(self, task_id: str) -> ka.Task:
        if self._first:
            self._first = False
            self._counter.mark_first()
        self._left -= 1
        if not self._left:
            self._counter.mark_last()
            self._done.set()
        return ka.Task(task_id=task_id, status=ka.TaskStatus.PROCESSING)


async def _pool(pool_class: type[PollerPool], polls: int, spacing: float) -> float:
    # Polled once each: the next poll of a task is an hour away.
    policy = ka.PollPolicy(
        min_interval=3600.0, max_interval=7200.0, initial_estimate=7200.0, jitter=0.0
    )
    tracker = Tracker(EventHub(), ka.AdaptiveLimit(None), LearnedDurations(policy))
    counter = _Counter()
    done = asyncio.Event()
    pool = pool_class(_Answers(polls, counter, done), policy, tracker)  # type: ignore[arg-type]
    jobs = [tracker.track(f"task-{i}") for i in range(polls)]
    start = time.monotonic() + 0.1
    for i, job in enumerate(jobs):
        pool._schedule(tracker.entry(job), start + i * spacing)  # due one after another
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.run, 4)
            await done.wait()
            tg.cancel_scope.cancel()
    finally:
        counter.close()
    return (counter.last - counter.first) / (polls - 1)


async def _sleeping_loop(sleeps: int, spacing: float) -> float:
    counter = _Counter()
    start = time.monotonic() + 0.1
    try:
        for i in range(sleeps):
            await asyncio.sleep(max(0.0, start + i * spacing - time.monotonic()))
            if i == 0:
                counter.mark_first()
        counter.mark_last()
    finally:
        counter.close()
    return (counter.last - counter.first) / (sleeps - 1)


def run(polls: int = POLLS, spacing: float = SPACING) -> None:
    contenders: list[tuple[str, type[PollerPool]]] = [
        ("kling_async", PollerPool),
        ("legacy_dispatcher", LegacyPollerPool),
    ]
    for name, pool_class in contenders:
        per_poll = asyncio.run(_pool(pool_class, polls, spacing))
        print(
            f"pool contender={name} polls={polls} loop_iterations_per_poll={per_poll:.2f}",
            flush=True,
        )
    per_sleep = asyncio.run(_sleeping_loop(polls, spacing))
    print(
        f"pool contender=sleeping_loop sleeps={polls} loop_iterations_per_sleep={per_sleep:.2f}",
        flush=True,
    )
