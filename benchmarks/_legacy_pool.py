"""The poller pool's dispatcher before the "leaner pool" change, kept to measure against.

One dispatcher coroutine slept until the heap's head was due (a new cancel scope and timer
per sleep, ``anyio.move_on_after``) and handed each due poll to a free worker through a
zero-buffer memory object stream (a rendezvous per hand-off). Only the dispatch differs
from :class:`~kling_async.engine.pollers.PollerPool`: polls, sweeps and the tracker are
the same code. ``benchmarks/pool.py`` counts the loop iterations each costs per poll.
"""

from __future__ import annotations

import heapq
import itertools
import time

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from kling_async.engine.entry import Entry
from kling_async.engine.pollers import PollerPool

__all__ = ["LegacyPollerPool"]


class LegacyPollerPool(PollerPool):
    """The dispatcher, the stream and the workers as they were."""

    def _prepare(self) -> None:
        self._legacy_heap: list[tuple[float, int, int, Entry]] = []
        self._legacy_seq = itertools.count()
        self._wakeup = anyio.Event()

    def _schedule(self, entry: Entry, due: float, *, pinned: bool = False) -> None:
        if not hasattr(self, "_legacy_heap"):
            self._prepare()
        entry.poll_token += 1
        entry.due = due
        entry.pinned = pinned
        heap = self._legacy_heap
        was_first = not heap or due < heap[0][0]
        heapq.heappush(heap, (due, next(self._legacy_seq), entry.poll_token, entry))
        if was_first:
            self._wakeup.set()

    async def _sleep(self, seconds: float | None) -> None:
        event = self._wakeup
        with anyio.move_on_after(seconds):
            await event.wait()
        if event.is_set() and self._wakeup is event:
            self._wakeup = anyio.Event()

    async def run(self, workers: int) -> None:
        if not hasattr(self, "_legacy_heap"):
            self._prepare()
        send, receive = anyio.create_memory_object_stream["tuple[Entry, int]"](0)
        async with anyio.create_task_group() as tg, send, receive:
            for _ in range(workers):
                tg.start_soon(self._legacy_work, receive.clone(), name="kling-poller")
            await self._dispatch(send)

    async def _dispatch(self, send: MemoryObjectSendStream[tuple[Entry, int]]) -> None:
        heap = self._legacy_heap
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

    async def _legacy_work(self, receive: MemoryObjectReceiveStream[tuple[Entry, int]]) -> None:
        async with receive:
            async for entry, token in receive:
                if self._sweeping is not None:
                    await self._sweeping.wait()
                if token != entry.poll_token or entry.job.done:
                    continue
                await self._serve(entry)
