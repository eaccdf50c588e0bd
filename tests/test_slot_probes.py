"""Slot probes: while jobs wait at a limit the account has shown, a create goes out anyway now
and then, so a slot freed by a task that ended unseen is taken at once (see
``kling_async.engine.limits``). The account's own count is the ground truth throughout."""

from __future__ import annotations

import anyio
import pytest

import kling_async as ka
from kling_async.engine.limits import AdaptiveLimit
from kling_async.testing import Emulator

from .conftest import SCALE, client_for
from .test_push_delivery import receiver

pytestmark = pytest.mark.anyio


def requests(n: int) -> list[ka.Text2VideoRequest]:
    return [ka.Text2VideoRequest(prompt=f"probe clip {i}") for i in range(n)]


async def finish(kling: ka.KlingClient, jobs: list[ka.Job], seconds: float = 60) -> None:
    with anyio.fail_after(seconds):
        async for _ in kling.as_completed(jobs):
            pass


def slow_polls() -> ka.PollPolicy:
    """Polls far apart next to the probe: whoever sees a freed slot first, it is the probe."""
    return ka.PollPolicy(
        min_interval=20.0, max_interval=40.0, initial_estimate=90.0, probe_interval=1.0
    ).scaled(SCALE)


async def test_probes_take_freed_slots_without_passing_the_account_limit() -> None:
    async with Emulator(time_scale=SCALE, seed=11, concurrency_limit=3) as emu:
        async with client_for(emu, max_active_tasks=None, poll=slow_polls()) as kling:
            jobs = kling.submit_many(requests(24))
            await finish(kling, jobs)
            stats = kling.stats
        assert all(job.status is ka.JobStatus.SUCCEEDED for job in jobs)
        assert emu.stats.peak_active == 3  # the account's count, probes included
        assert emu.stats.tasks_created == 24
        assert max(emu.stats.created_per_external_id.values()) == 1
        accepted = stats.slot_probes - stats.slot_probes_refused
        assert accepted >= 1  # a freed slot was taken before any poll saw its task end
        assert stats.concurrency_limited == emu.stats.sent_1303
        # A probe teaches the limit nothing: the 1303s beyond the probes' are the few of
        # learning it (a burst of creates at first, then rare probes of the limit itself).
        assert 1 <= emu.stats.sent_1303 - stats.slot_probes_refused <= 10


async def test_no_probe_passes_a_limit_the_user_set() -> None:
    """A ``max_active_tasks`` below the account's limit is a cap: the account never refuses
    at it, so the client never learns it is full and never probes past it."""
    async with Emulator(time_scale=SCALE, seed=12, concurrency_limit=10) as emu:
        async with client_for(emu, max_active_tasks=3, poll=slow_polls()) as kling:
            jobs = kling.submit_many(requests(15))
            await finish(kling, jobs)
            stats = kling.stats
        assert emu.stats.peak_active == 3
        assert emu.stats.sent_1303 == 0
        assert stats.slot_probes == 0


async def test_probes_can_be_turned_off() -> None:
    policy = ka.PollPolicy(probe_interval=None).scaled(SCALE)
    assert policy.probe_interval is None
    async with Emulator(time_scale=SCALE, seed=13, concurrency_limit=3) as emu:
        async with client_for(emu, max_active_tasks=None, poll=policy) as kling:
            jobs = kling.submit_many(requests(15))
            await finish(kling, jobs)
            stats = kling.stats
        assert stats.slot_probes == 0
        assert emu.stats.peak_active == 3


async def test_callbacks_make_probes_moot() -> None:
    """Where callbacks report every end at once, no end goes unnoticed to look for."""
    async with receiver() as hook, Emulator(time_scale=SCALE, seed=14, concurrency_limit=3) as emu:
        async with client_for(
            emu, max_active_tasks=None, poll=slow_polls(), callback_url=hook.url
        ) as kling:
            hook.kling = kling
            jobs = kling.submit_many(requests(24))
            await finish(kling, jobs)
            stats = kling.stats
        assert all(job.status is ka.JobStatus.SUCCEEDED for job in jobs)
        assert emu.stats.peak_active == 3
        # At most a probe or two before the first callback arrives; none once they come.
        assert stats.slot_probes <= 2
        assert stats.concurrency_limited <= 10


def test_the_probe_interval_is_validated_and_scaled() -> None:
    with pytest.raises(ValueError, match=r"PollPolicy.probe_interval=0 is invalid: must be > 0"):
        ka.PollPolicy(probe_interval=0)
    assert ka.PollPolicy(probe_interval=2.0).scaled(0.5).probe_interval == 1.0


# --- the limiter alone: what a probe's answer means --------------------------------------


async def full_limiter(**settings: object) -> AdaptiveLimit:
    """A limiter that learned a limit of 2 from a 1303 (the account has shown it is full)."""
    slots = AdaptiveLimit(None, **settings)  # type: ignore[arg-type]
    for job in ("a", "b", "c"):
        await slots.acquire(job)
    slots.answered("a", "created")
    slots.answered("b", "created")
    slots.answered("c", "refused")
    assert slots.limit == 2
    return slots


async def test_a_refused_probe_teaches_the_limit_nothing() -> None:
    slots = await full_limiter(probe_interval=0.01)
    with anyio.fail_after(5):
        await slots.acquire("d")  # past the limit: a probe
    assert slots.slot_probes == 1
    assert slots.active == 3
    slots.answered("d", "refused")
    assert (slots.limit, slots.active, slots.slot_probes_refused) == (2, 2, 1)
    with anyio.fail_after(5):
        await slots.acquire("d")  # the next one, an interval later
    slots.answered("d", "created")
    assert (slots.limit, slots.active) == (2, 3)  # held past the limit until an end is seen


async def test_probes_stop_at_two_slots_past_the_limit() -> None:
    slots = await full_limiter(probe_interval=0.001)
    for job in ("d", "e"):
        with anyio.fail_after(5):
            await slots.acquire(job)
        slots.answered(job, "created")
    assert slots.active == 4
    with anyio.move_on_after(0.05) as waited:
        await slots.acquire("f")
    assert waited.cancelled_caught  # no third one until an end is seen
    slots.release("a")
    with anyio.fail_after(5):
        await slots.acquire("f")


async def test_a_probe_unpaid_by_any_end_stops_the_probes() -> None:
    """An accepted probe that no end of ours pays for means the account had room anyway (its
    limit rose, or someone else let go of slots): probing stops until a 1303 again."""
    slots = await full_limiter(probe_interval=0.001, probe_debt_limit=0.01)
    with anyio.fail_after(5):
        await slots.acquire("d")
    slots.answered("d", "created")
    await anyio.sleep(0.03)
    with anyio.move_on_after(0.05) as waited:
        await slots.acquire("e")
    assert waited.cancelled_caught
    assert slots.slot_probes == 1


async def test_no_probe_while_no_end_is_likely() -> None:
    ends = [0.0]
    slots = await full_limiter(probe_interval=0.001, unnoticed_ends=lambda since: ends[0])
    with anyio.move_on_after(0.05) as waited:
        await slots.acquire("d")
    assert waited.cancelled_caught
    assert slots.slot_probes == 0
    ends[0] = 1.0  # the tasks holding slots have likely ended by now
    with anyio.fail_after(5):
        await slots.acquire("d")
    assert slots.slot_probes == 1
