"""What a client learns of durations under push delivery: a confirmed end that a callback
claimed is measured at the callback, not at the midpoint since the create."""

from __future__ import annotations

import anyio
import pytest

import kling_async as ka
from kling_async.protocol.schedule import ClassKey
from kling_async.testing import Emulator

from .conftest import SCALE, client_for
from .test_push_delivery import receiver

pytestmark = pytest.mark.anyio


class Recording(ka.LearnedDurations):
    def __init__(self, policy: ka.PollPolicy) -> None:
        super().__init__(policy)
        self.seen: list[float] = []

    def observe(self, key: ClassKey, seconds: float) -> None:
        self.seen.append(seconds)
        super().observe(key, seconds)


async def test_durations_confirmed_by_callbacks_are_not_halved() -> None:
    policy = ka.PollPolicy().scaled(SCALE)
    durations = Recording(policy)
    async with receiver() as hook, Emulator(time_scale=SCALE, seed=43) as emu:
        async with client_for(emu, callback_url=hook.url, duration_stats=durations) as kling:
            hook.kling = kling
            jobs = kling.submit_many([ka.Text2VideoRequest(prompt=f"d{i}") for i in range(6)])
            with anyio.fail_after(30):
                async for _ in kling.as_completed(jobs):
                    pass
        truth = {t.task_id: (t.completes_at - t.created_at) * SCALE for t in emu.tasks.values()}
    assert len(durations.seen) == len(jobs)
    # Each measured from the create's send to the callback: never much under the truth.
    assert min(durations.seen) >= 0.9 * min(truth.values())
    assert sum(durations.seen) >= 0.9 * sum(truth.values())
