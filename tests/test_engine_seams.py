"""The engine's seams: a slot limiter, a request limiter and duration statistics passed to the
client are the ones it uses, each slot is released exactly once, and the body's exception
leaves ``async with`` as it was raised."""

from __future__ import annotations

from collections import Counter

import anyio
import pytest

import kling_async as ka
from kling_async.protocol.schedule import ClassKey, DurationModel
from kling_async.testing import Emulator

from .conftest import SCALE, client_for

pytestmark = pytest.mark.anyio


class CountingSlots:
    """A SlotLimiter of its own (as a shared one would be): a fixed limit, every call kept."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self.held: set[str] = set()
        self.calls: list[tuple[str, str]] = []
        self.releases: Counter[str] = Counter()
        self.peak = 0
        self._changed = anyio.Event()

    @property
    def active(self) -> int:
        return len(self.held)

    @property
    def limit(self) -> float:
        return self._limit

    @property
    def peak_active(self) -> int:
        return self.peak

    async def acquire(self, job_id: str) -> None:
        while len(self.held) >= self._limit:
            changed = self._changed
            await changed.wait()
        self.hold(job_id)
        self.calls.append(("acquire", job_id))

    def hold(self, job_id: str) -> None:
        assert job_id not in self.held, f"slot taken twice for {job_id}"
        self.held.add(job_id)
        self.peak = max(self.peak, len(self.held))

    def answered(self, job_id: str, outcome: ka.CreateOutcome) -> None:
        self.calls.append((outcome, job_id))
        if outcome in ("refused", "failed"):
            self.release(job_id)

    def release(self, job_id: str) -> None:
        self.releases[job_id] += 1
        self.held.discard(job_id)
        self._changed.set()
        self._changed = anyio.Event()


class CountingRequests:
    def __init__(self) -> None:
        self.acquired = 0
        self.paused: list[float] = []

    async def acquire(self) -> None:
        self.acquired += 1

    def pause(self, seconds: float) -> None:
        self.paused.append(seconds)


class RecordingDurations:
    def __init__(self, policy: ka.PollPolicy) -> None:
        self._policy = policy
        self._models: dict[ClassKey, DurationModel] = {}
        self.observed: list[tuple[ClassKey, float]] = []

    def model(self, key: ClassKey) -> DurationModel:
        if key not in self._models:
            self._models[key] = self._policy.duration_model()
        return self._models[key]

    def observe(self, key: ClassKey, seconds: float) -> None:
        self.observed.append((key, seconds))
        self.model(key).observe(seconds)


async def test_the_client_uses_the_seams_it_is_given() -> None:
    slots = CountingSlots(limit=3)
    requests = CountingRequests()
    poll = ka.PollPolicy().scaled(SCALE)
    durations = RecordingDurations(poll)
    async with Emulator(time_scale=SCALE, seed=21) as emu:
        async with client_for(
            emu,
            slot_limiter=slots,
            request_limiter=requests,
            duration_stats=durations,
            poll=poll,
        ) as kling:
            jobs = kling.submit_many([ka.Text2VideoRequest(prompt=f"c{i}") for i in range(8)])
            with anyio.fail_after(30):
                async for _ in kling.as_completed(jobs):
                    pass
            stats = kling.stats
        assert all(job.status is ka.JobStatus.SUCCEEDED for job in jobs)
        assert emu.stats.peak_active <= 3
        assert slots.peak == stats.peak_active <= 3
        assert stats.active_limit == 3
        # Each job: one acquire, one "created", one release at its end, never two.
        for job in jobs:
            assert slots.calls.count(("acquire", job.id)) == 1
            assert slots.calls.count(("created", job.id)) == 1
            assert slots.releases[job.id] == 1
        assert slots.held == set()
        # Every request went through the request limiter.
        routes = emu.stats.requests_per_route
        api_requests = sum(routes.values()) - routes["callback_sent"] - routes["download"]
        assert requests.acquired == api_requests
        # Every measured end taught the statistics, for the request's class.
        assert len(durations.observed) == 8
        assert {key for key, _ in durations.observed} == {("kling-v1", "std", "5")}


async def test_each_1303_releases_its_slot_once() -> None:
    slots = CountingSlots(limit=10)
    async with Emulator(time_scale=SCALE, seed=22, concurrency_limit=2) as emu:
        async with client_for(emu, slot_limiter=slots) as kling:
            jobs = kling.submit_many([ka.Text2VideoRequest(prompt=f"c{i}") for i in range(6)])
            with anyio.fail_after(60):
                async for _ in kling.as_completed(jobs):
                    pass
    refused = [job_id for outcome, job_id in slots.calls if outcome == "refused"]
    assert refused  # the emulator's limit of 2 was met
    # A job refused with 1303 takes a slot again for its next create: one release per take.
    for job in jobs:
        assert slots.releases[job.id] == slots.calls.count(("acquire", job.id))
    assert slots.held == set()


def test_a_seam_that_is_not_one_is_refused_with_its_name() -> None:
    with pytest.raises(ka.ValidationError, match="slot_limiter"):
        ka.KlingClient(api_key="sk-x", slot_limiter=object())  # type: ignore[arg-type]
    with pytest.raises(ka.ValidationError, match="request_limiter"):
        ka.KlingClient(api_key="sk-x", request_limiter=object())  # type: ignore[arg-type]
    with pytest.raises(ka.ValidationError, match="duration_stats"):
        ka.KlingClient(api_key="sk-x", duration_stats=object())  # type: ignore[arg-type]


async def test_the_bodys_exception_leaves_async_with_unchanged(emu: Emulator) -> None:
    class Mine(Exception):
        pass

    async def body() -> None:
        async with client_for(emu) as kling:
            kling.submit(ka.Text2VideoRequest(prompt="left behind"))
            raise Mine("from the body")

    with pytest.raises(Mine) as info:
        await body()
    assert str(info.value) == "from the body"
    # Not wrapped, and not replaced by the cancellation of the background work.
    assert type(info.value) is Mine
