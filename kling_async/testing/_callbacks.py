"""Callbacks: POSTing the bare task object to ``callback_url`` when a task's status changes.

One scheduler coroutine owns a heap of due deliveries (never a coroutine per task), and a few
worker coroutines do the POSTs. A task always maps to the same worker, so in ``every`` mode its
callbacks arrive in order; ``chaotic`` mode duplicates some and delays others past the terminal
one, because the protocol leaves ordering and duplicates unspecified and clients must cope.
The emulator only ever calls loopback addresses: it is a test tool, not a way to reach the network.
"""

from __future__ import annotations

import asyncio
import heapq
import ipaddress
import itertools
import logging
import math
import random
import urllib.parse
from collections.abc import Callable
from typing import Any, Final, Literal

import aiohttp
import anyio
import anyio.lowlevel

from ._clock import EmulatedClock
from ._state import EmulatedTask, EmulatorStats

CallbackMode = Literal["every", "terminal", "chaotic"]

logger = logging.getLogger("kling_async.testing")

_WORKERS: Final = 8
_DELIVERY_TIMEOUT: Final = aiohttp.ClientTimeout(total=10.0)
_CHAOS_RATE: Final = 0.3


def is_loopback_url(url: str) -> bool:
    """Whether ``url`` is http(s) to 127.0.0.0/8, ``::1`` or ``localhost``."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class CallbackScheduler:
    """Plans each task's callbacks at creation and delivers them when the emulated clock says."""

    def __init__(
        self,
        *,
        mode: CallbackMode,
        seed: int,
        clock: EmulatedClock,
        stats: EmulatorStats,
        tasks: dict[str, EmulatedTask],
        render: Callable[[EmulatedTask, float], dict[str, Any]],
    ) -> None:
        self._mode = mode
        self._rng = random.Random(f"kling-emulator-callbacks:{seed}")
        self._clock = clock
        self._stats = stats
        self._tasks = tasks
        self._render = render
        # (due, sequence, task_id, as_of): deliver at `due` the task as it was at `as_of`.
        self._heap: list[tuple[float, int, str, float]] = []
        self._sequence = itertools.count()
        self._wakeup = asyncio.Event()
        self._queues: list[asyncio.Queue[tuple[str, float]]] = [
            asyncio.Queue() for _ in range(_WORKERS)
        ]

    def schedule(self, task: EmulatedTask, *, after: float | None = None) -> None:
        """Plan the callbacks of a task (none without a loopback ``callback_url``).

        ``after``: plan only the status changes from that emulated instant on. A task loaded from
        a state file gets the changes still to come; the ones before were the previous process's
        to deliver, as a restarted server would not replay its past.
        """
        url = task.callback_url
        if url is None:
            return
        if not is_loopback_url(url):
            self._stats.callbacks_skipped += 1
            logger.info("not calling back %r: the emulator only calls loopback addresses", url)
            return
        changes: list[float] = []
        previous = None
        for as_of in (task.created_at, task.started_at, task.completes_at):
            status = task.status_at(as_of)
            if status != previous:
                changes.append(as_of)
                previous = status
        if self._mode == "terminal":
            changes = changes[-1:]
        if after is not None:
            changes = [as_of for as_of in changes if as_of >= after]
        deliveries = [(as_of, as_of) for as_of in changes]
        if self._mode == "chaotic":
            deliveries = self._scramble(changes, task)
        for due, as_of in deliveries:
            entry = (due, next(self._sequence), task.task_id, as_of)
            heapq.heappush(self._heap, entry)
            if self._heap[0] is entry:
                self._wakeup.set()

    def _scramble(self, changes: list[float], task: EmulatedTask) -> list[tuple[float, float]]:
        """Duplicate some deliveries and move some non-terminal ones after the terminal one."""
        rng = self._rng
        span = max(task.completes_at - task.created_at, 1e-3)
        deliveries: list[tuple[float, float]] = []
        for index, as_of in enumerate(changes):
            duplicate, late = rng.random() < _CHAOS_RATE, rng.random() < _CHAOS_RATE
            offset_duplicate, offset_late = rng.uniform(0, 0.25), rng.uniform(0, 0.25)
            due = as_of
            if late and index < len(changes) - 1:
                due = task.completes_at + offset_late * span
            deliveries.append((due, as_of))
            if duplicate:
                deliveries.append((due + offset_duplicate * span, as_of))
        return deliveries

    async def run(self, session: aiohttp.ClientSession) -> None:
        """Dispatch due callbacks to the workers until cancelled."""
        async with anyio.create_task_group() as task_group:
            for queue in self._queues:
                task_group.start_soon(self._deliver, session, queue)
            await self._dispatch()

    async def _dispatch(self) -> None:
        heap = self._heap
        while True:
            self._wakeup.clear()
            timeout = math.inf
            dispatched = 0
            while heap:
                delay = self._clock.real_seconds(heap[0][0] - self._clock.now())
                if delay > 0:
                    timeout = delay
                    break
                _, _, task_id, as_of = heapq.heappop(heap)
                self._queues[int(task_id) % len(self._queues)].put_nowait((task_id, as_of))
                dispatched += 1
                if dispatched % 1000 == 0:
                    await anyio.lowlevel.checkpoint()
            with anyio.move_on_after(timeout):
                await self._wakeup.wait()

    async def _deliver(
        self, session: aiohttp.ClientSession, queue: asyncio.Queue[tuple[str, float]]
    ) -> None:
        while True:
            task_id, as_of = await queue.get()
            task = self._tasks[task_id]
            assert task.callback_url is not None
            self._stats.requests_per_route["callback_sent"] += 1
            try:
                async with session.post(
                    task.callback_url, json=self._render(task, as_of), timeout=_DELIVERY_TIMEOUT
                ) as response:
                    await response.read()
                    delivered = response.status < 300
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                logger.info("callback to %r failed: %r", task.callback_url, exc)
                delivered = False
            if not delivered:
                self._stats.callbacks_failed += 1
