"""Where a class's schedule starts: the nearest known class (also for a class first polled
while nothing was known), loaded summaries whatever their order, and a shared account's
stream loaded as a job store's summaries are (bounded weight, bad entries skipped, a reset
without a client)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

import kling_async as ka
from kling_async.engine.durations import (
    CLIP_EXPONENT,
    LOADED_WEIGHT_CAP,
    PRO_FACTOR,
    LearnedDurations,
    borrowed_prior,
)
from kling_async.redis import RedisAccount
from kling_async.testing import Emulator

from .conftest import SCALE, client_for
from .redis_helpers import RedisServer, redis_server

pytestmark = pytest.mark.anyio

STD5 = ("kling-v1", "std", "5")
STD10 = ("kling-v1", "std", "10")
POLICY = ka.PollPolicy()


def test_a_class_first_polled_while_nothing_was_known_borrows_once_another_ends() -> None:
    """A mixed first batch: the 10 s class is polled from the policy's guess only until the
    5 s class has data, not until its own first task ends."""
    stats = LearnedDurations(POLICY)
    assert stats.model(STD10).fit() == (POLICY.initial_estimate, 0.5)
    for _ in range(8):
        stats.observe(STD5, 40.0)
    median, _ = stats.model(STD10).fit()
    assert math.isclose(median, stats.model(STD5).fit()[0] * 2**CLIP_EXPONENT, rel_tol=1e-9)
    # Once it has data of its own, the class is its own (and keeps it).
    stats.observe(STD10, 300.0)
    before = stats.model(STD10).fit()
    for _ in range(8):
        stats.observe(STD5, 10.0)
    assert stats.model(STD10).fit() == before
    assert stats.model(STD10).count == 1


def test_another_model_in_the_same_mode_is_nearer_than_one_in_another_mode() -> None:
    stats = LearnedDurations(POLICY)
    for _ in range(20):
        stats.observe(("kling-v1", "pro", "5"), 160.0)
        stats.observe(("kling-v2", "std", "5"), 50.0)
    known = {key: stats.model(key) for key in stats.summaries()}
    median, _ = borrowed_prior(("kling-v3", "std", "5"), known)
    assert math.isclose(median, known[("kling-v2", "std", "5")].fit()[0], rel_tol=1e-9)
    # Within the same model, the other mode wins over another model, scaled by the mode.
    median, _ = borrowed_prior(("kling-v1", "std", "5"), known)
    assert math.isclose(median, known[("kling-v1", "pro", "5")].fit()[0] / PRO_FACTOR, rel_tol=1e-9)


def test_a_loaded_class_fits_as_saved_whatever_else_is_loaded_first() -> None:
    source = LearnedDurations(POLICY)
    for seconds in (60.0, 80.0, 95.0, 120.0):
        source.observe(STD10, seconds)
    saved = {STD5: ka.DurationSummary(30, math.log(20.0), 0.04), **source.summaries()}
    for order in (saved, dict(reversed(saved.items()))):
        loaded = LearnedDurations(POLICY, known=order)
        assert loaded.model(STD10).fit() == source.model(STD10).fit()


async def test_a_new_class_in_a_second_run_starts_from_the_scaled_median(tmp_path: Path) -> None:
    """After a run learned (kling-v1, std, 5), a run on the same store starts the 10 s class
    from its median scaled by the clip length: nearer the emulator's 10 s tasks (1.5x its
    5 s ones) than the policy's guess is."""
    path = tmp_path / "jobs.sqlite3"
    async with Emulator(time_scale=SCALE, seed=11, median_duration=30.0) as emu:
        async with client_for(emu, store=path) as kling:
            jobs = kling.submit_many(ka.Text2VideoRequest(prompt=f"five {i}") for i in range(10))
            with anyio.fail_after(60):
                async for _ in kling.as_completed(jobs):
                    pass
        async with client_for(emu, store=path) as kling:
            stats = kling._tracker.durations
            learned = stats.model(STD5).fit()[0]
            start = stats.model(STD10).fit()[0]
            assert math.isclose(start, learned * 2**CLIP_EXPONENT, rel_tol=1e-9)
            jobs = kling.submit_many(
                ka.Text2VideoRequest(prompt=f"ten {i}", duration="10") for i in range(6)
            )
            with anyio.fail_after(60):
                async for _ in kling.as_completed(jobs):
                    pass
            assert stats.model(STD10).count == 6
        truth = [
            (t.completes_at - t.created_at) * SCALE
            for t in emu.tasks.values()
            if t.duration == "10"
        ]
    true_median = sorted(truth)[len(truth) // 2]
    prior = POLICY.scaled(SCALE).initial_estimate
    assert abs(math.log(start / true_median)) < abs(math.log(prior / true_median))


# --- a shared account ----------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with redis_server() as running:
        yield running


def completion(key: object, seconds: object, mark: str) -> dict[Any, Any]:
    return {"w": "gone-worker", "k": json.dumps(key), "s": str(seconds), "n": mark}


async def test_a_shared_account_loads_each_class_with_a_bounded_weight_and_skips_bad_entries(
    server: RedisServer,
) -> None:
    connection = aioredis.Redis.from_url(server.url, decode_responses=True)
    stream = "kling:{acct}:durations"
    try:
        for i in range(LOADED_WEIGHT_CAP + 100):
            await connection.xadd(stream, completion(list(STD5), 40 * SCALE, f"old:{i}"))
        for i in range(5):
            await connection.xadd(stream, completion(list(STD10), 60 * SCALE, f"old2:{i}"))
        await connection.xadd(stream, completion(list(STD10), 60 * SCALE, "old2:4"))  # a repeat
        bad_entries: list[dict[Any, Any]] = [
            {"w": "x", "k": "not json", "s": "40", "n": "bad:1"},
            completion(list(STD5), "nan", "bad:2"),
            completion(list(STD5), -3, "bad:3"),
            completion("abc", 40.0, "bad:4"),
            completion([1, 2], 40.0, "bad:5"),
            {"w": "x", "n": "bad:6"},
        ]
        for bad in bad_entries:
            await connection.xadd(stream, bad)
        async with Emulator(time_scale=SCALE, seed=12) as emu:
            account = RedisAccount(server.url, name="acct", lease_ttl=2.0)
            async with client_for(emu, account=account) as kling:
                stats = kling._tracker.durations
                assert stats.model(STD5).count == LOADED_WEIGHT_CAP
                assert math.isclose(stats.model(STD5).fit()[0], 40 * SCALE, rel_tol=0.02)
                assert stats.model(STD10).count == 5
            # The reset, without a client: the next one starts from the policy.
            await RedisAccount(server.url, name="acct").forget_durations()
            assert await connection.exists(stream) == 0
            async with client_for(emu, account=account) as kling:
                assert kling._tracker.durations.model(STD5).count == 0
    finally:
        await connection.aclose()


async def test_a_shared_account_forgets_by_the_fingerprint_its_clients_bound(
    server: RedisServer,
) -> None:
    account = RedisAccount(server.url, lease_ttl=2.0)
    with pytest.raises(ka.UsageError, match="needs the account"):
        await account.forget_durations()
    async with Emulator(time_scale=SCALE, seed=13, median_duration=30.0) as emu:
        async with client_for(emu, account=account) as kling:
            jobs = kling.submit_many(ka.Text2VideoRequest(prompt=f"r {i}") for i in range(4))
            with anyio.fail_after(60):
                async for _ in kling.as_completed(jobs):
                    pass
        async with client_for(emu, account=account) as kling:
            assert kling._tracker.durations.model(STD5).count == 4  # warm from the first
        await account.forget_durations()  # the account of the last client made with it
        async with client_for(emu, account=account) as kling:
            assert kling._tracker.durations.model(STD5).count == 0
