"""Learned durations kept across runs: summaries, the stores that keep them, the nearest-class
prior for a class never seen, the reset, and the batch tool's journal."""

from __future__ import annotations

import json
import logging
import math
import sqlite3
from pathlib import Path

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kling_async as ka
from kling_async.engine.durations import (
    CLIP_EXPONENT,
    PRO_FACTOR,
    DurationKeeper,
    LearnedDurations,
    borrowed_prior,
)
from kling_async.testing import Emulator

from .cli_helpers import EmulatorProcess, batch_command, run_main, write_prompts
from .conftest import SCALE, client_for

pytestmark = pytest.mark.anyio

STD5 = ("kling-v1", "std", "5")
POLICY = ka.PollPolicy()

durations_lists = st.lists(
    st.floats(min_value=1.0, max_value=5000.0, allow_nan=False), min_size=1, max_size=60
)


# --- summaries --------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(durations_lists)
def test_a_model_rebuilt_from_its_summary_fits_as_it_did(durations: list[float]) -> None:
    original = POLICY.duration_model()
    for seconds in durations:
        original.observe(seconds)
    rebuilt = POLICY.duration_model()
    rebuilt.absorb(
        ka.DurationSummary.from_dict(json.loads(json.dumps(original.summary().to_dict())))
    )
    assert rebuilt.count == original.count
    for mine, theirs in zip(rebuilt.fit(), original.fit(), strict=True):
        assert math.isclose(mine, theirs, rel_tol=1e-9, abs_tol=1e-9)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"count": -1, "mean_log": 1.0, "var_log": 0.1}, "count"),
        ({"count": 1.5, "mean_log": 1.0, "var_log": 0.1}, "count"),
        ({"count": True, "mean_log": 1.0, "var_log": 0.1}, "count"),
        ({"count": 3, "mean_log": float("nan"), "var_log": 0.1}, "mean_log"),
        ({"count": 3, "mean_log": 1.0, "var_log": -0.5}, "var_log"),
        ({"count": 3, "mean_log": 1.0, "var_log": float("inf")}, "var_log"),
        ({"count": 3, "mean_log": 1.0}, "var_log"),
        ({"count": 3, "mean_log": "x", "var_log": 0.1}, "malformed|could not convert"),
        ([1, 2, 3], "mapping"),
    ],
)
def test_a_bad_summary_is_refused_naming_the_field(data: object, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ka.DurationSummary.from_dict(data)


# --- the nearest known class ------------------------------------------------------------


def learned(key: tuple[str, str, str], seconds: float, n: int = 40) -> LearnedDurations:
    stats = LearnedDurations(POLICY)
    for _ in range(n):
        stats.observe(key, seconds)
    return stats


def test_a_class_never_seen_starts_from_the_nearest_known_one_scaled() -> None:
    stats = learned(STD5, 100.0)
    median, _ = stats.model(STD5).fit()
    longer = stats.model(("kling-v1", "std", "10")).fit()
    assert math.isclose(longer[0], median * 2**CLIP_EXPONENT, rel_tol=1e-9)
    pro = stats.model(("kling-v1", "pro", "5")).fit()
    assert math.isclose(pro[0], median * PRO_FACTOR, rel_tol=1e-9)
    # Wider than the class it borrows from: the scaling is a guess.
    assert longer[1] > stats.model(STD5).fit()[1]


def test_the_nearest_class_is_the_same_model_and_mode_first() -> None:
    stats = learned(STD5, 100.0)
    for _ in range(40):
        stats.observe(("kling-v2", "std", "10"), 500.0)
    # Same model and mode at another length beats another model at the same length.
    median, _ = borrowed_prior(
        ("kling-v1", "std", "10"), {k: stats.model(k) for k in stats.summaries()}
    )
    assert math.isclose(median, stats.model(STD5).fit()[0] * 2**CLIP_EXPONENT, rel_tol=1e-9)


def test_with_nothing_known_a_class_starts_from_the_policy() -> None:
    stats = LearnedDurations(ka.PollPolicy(initial_estimate=42.0))
    assert stats.model(STD5).fit() == (42.0, 0.5)


def test_a_borrowed_prior_gives_way_to_the_class_own_tasks() -> None:
    stats = learned(STD5, 100.0)
    key = ("kling-v1", "std", "10")
    for _ in range(30):
        stats.observe(key, 400.0)
    assert 350.0 < stats.model(key).fit()[0] < 400.0


def test_loaded_classes_count_for_a_bounded_weight() -> None:
    stats = LearnedDurations(POLICY, known={STD5: ka.DurationSummary(100_000, math.log(100), 0.01)})
    for _ in range(200):
        stats.observe(STD5, 200.0)  # the tasks got twice as slow
    assert stats.model(STD5).fit()[0] > 130.0  # this run's tasks moved it


# --- stores ------------------------------------------------------------------------------


async def test_the_memory_and_sqlite_stores_keep_forget_and_skip_bad_rows(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    summary = ka.DurationSummary(12, 4.5, 0.09)
    memory = ka.MemoryJobStore()
    assert isinstance(memory, ka.DurationStore)
    await memory.save_durations({STD5: summary})
    assert await memory.load_durations() == {STD5: summary}
    await memory.forget_durations()
    assert await memory.load_durations() == {}

    path = tmp_path / "jobs.sqlite3"
    async with ka.SQLiteJobStore(path) as store:
        assert isinstance(store, ka.DurationStore)
        await store.save_durations({STD5: summary, ("kling-v1", "pro", "10"): summary})
    with sqlite3.connect(path) as db:  # the file is outside input: a damaged row
        db.execute(
            "INSERT INTO kling_durations VALUES ('kling-v2', 'std', '5', ?)",
            (json.dumps({"count": 3, "mean_log": "NaN", "var_log": -1}),),
        )
    caplog.set_level(logging.WARNING, logger="kling_async")
    async with ka.SQLiteJobStore(path) as store:
        loaded = await store.load_durations()
        assert loaded == {STD5: summary, ("kling-v1", "pro", "10"): summary}
        assert "kling-v2" in caplog.text and "ignored" in caplog.text
        await store.forget_durations()
    async with ka.SQLiteJobStore(path) as store:
        assert await store.load_durations() == {}


async def test_a_file_of_an_earlier_release_gains_the_durations_table(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    record = ka.JobRecord(id="old-1", task_id="t-1", status=ka.JobStatus.SUCCEEDED)
    async with ka.SQLiteJobStore(path) as store:
        await store.save([record])
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE kling_durations")  # as the previous release wrote it
    async with ka.SQLiteJobStore(path) as store:
        assert await store.load_durations() == {}
        await store.save_durations({STD5: ka.DurationSummary(3, 4.0, 0.1)})
        assert [r.id for r in await store.load()] == ["old-1"]


# --- the client ----------------------------------------------------------------------------


async def run_batch(emu: Emulator, store: object, n: int = 12) -> ka.KlingClient:
    async with client_for(emu, store=store) as kling:
        jobs = kling.submit_many(ka.Text2VideoRequest(prompt=f"warm {i}") for i in range(n))
        with anyio.fail_after(60):
            async for _ in kling.as_completed(jobs):
                pass
    return kling


async def test_a_second_client_on_the_store_starts_from_what_the_first_learned(
    tmp_path: Path,
) -> None:
    path = tmp_path / "jobs.sqlite3"
    async with Emulator(time_scale=SCALE, seed=3, median_duration=30.0) as emu:
        await run_batch(emu, path)
        async with ka.SQLiteJobStore(path) as store:
            saved = await store.load_durations()
        assert saved[STD5].count == 12  # every task measured, saved as the client closed
        median = math.exp(saved[STD5].mean_log) / SCALE
        assert 15.0 < median < 60.0  # near the emulator's 30 s, far from the 90 s prior
        async with client_for(emu, store=path) as kling:
            model = kling._tracker.durations.model(STD5)
            assert model.count == 12
            # Its first poll of a new task falls near the learned median, not the prior's.
            first = model.next_age(0.0) / SCALE
            fresh = client_for(emu).poll.duration_model().next_age(0.0) / SCALE
            assert first < fresh / 1.5
            await kling.forget_durations()
            assert kling._tracker.durations.model(STD5).count == 0
        async with ka.SQLiteJobStore(path) as store:
            assert await store.load_durations() == {}


async def test_statistics_are_saved_while_the_client_runs() -> None:
    """A crash loses at most one save period of what was learned."""
    store = ka.MemoryJobStore()
    stats = LearnedDurations(POLICY)
    keeper = DurationKeeper(stats, store)
    await keeper.load()
    stats.observe(STD5, 80.0)
    await keeper.save()
    assert (await store.load_durations())[STD5].count == 1


async def test_a_store_that_cannot_save_durations_never_stops_the_client(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Failing(ka.MemoryJobStore):
        async def load_durations(self) -> dict[tuple[str, str, str], ka.DurationSummary]:
            raise OSError("disk on fire")

        async def save_durations(self, summaries: object) -> None:
            raise OSError("disk on fire")

    caplog.set_level(logging.WARNING, logger="kling_async")
    async with Emulator(time_scale=SCALE, seed=5) as emu:
        store = Failing()
        await run_batch(emu, store, n=3)
        assert all(record.finished for record in await store.load())
    assert "could not be loaded" in caplog.text and "could not be saved" in caplog.text


async def test_given_duration_stats_are_left_alone(tmp_path: Path) -> None:
    """A client given its own ``duration_stats`` keeps them to itself: nothing is loaded
    into them or saved from them."""
    store = ka.MemoryJobStore()
    await store.save_durations({STD5: ka.DurationSummary(50, math.log(1.0), 0.01)})
    mine = LearnedDurations(POLICY)
    async with Emulator(time_scale=SCALE, seed=6) as emu:
        async with client_for(emu, store=store, duration_stats=mine) as kling:
            assert kling._tracker.durations is mine
    assert mine.summaries() == {}
    assert (await store.load_durations())[STD5].count == 50


# --- the batch tool ----------------------------------------------------------------------


def journal_durations(path: Path) -> dict[tuple[str, str, str], ka.DurationSummary]:
    async def read() -> dict[tuple[str, str, str], ka.DurationSummary]:
        async with ka.SQLiteJobStore(path) as store:
            return await store.load_durations()

    return anyio.run(read)


def test_the_journal_keeps_durations_for_the_next_run_and_forgets_on_demand(
    tmp_path: Path, server: EmulatorProcess
) -> None:
    out = tmp_path / "out"
    first = run_main(batch_command(write_prompts(tmp_path / "a.txt", 4, "a"), out, server))
    assert first.code == 0, first.err
    journal = out / "kling-journal.sqlite3"
    kept = journal_durations(journal)
    assert sum(summary.count for summary in kept.values()) == 4
    # A second batch in the same directory (another prompt file) starts from them and adds.
    second = run_main(batch_command(write_prompts(tmp_path / "b.txt", 3, "b"), out, server))
    assert second.code == 0, second.err
    assert sum(summary.count for summary in journal_durations(journal).values()) == 7
    third = run_main(
        batch_command(write_prompts(tmp_path / "c.txt", 2, "c"), out, server, "--forget-durations")
    )
    assert third.code == 0, third.err
    assert sum(summary.count for summary in journal_durations(journal).values()) == 2


# --- a shared account ---------------------------------------------------------------------


async def test_a_shared_account_keeps_durations_for_the_next_client_and_forgets() -> None:
    from kling_async.redis import RedisAccount

    from .redis_helpers import redis_server

    with redis_server() as server:
        async with Emulator(time_scale=SCALE, seed=8, median_duration=30.0) as emu:
            async with client_for(emu, account=RedisAccount(server.url, lease_ttl=2.0)) as kling:
                jobs = kling.submit_many(ka.Text2VideoRequest(prompt=f"r {i}") for i in range(6))
                with anyio.fail_after(60):
                    async for _ in kling.as_completed(jobs):
                        pass
            async with client_for(emu, account=RedisAccount(server.url, lease_ttl=2.0)) as kling:
                model = kling._tracker.durations.model(STD5)
                assert model.count == 6  # the account's completions, from the earlier client
                assert model.fit()[0] / SCALE < 60.0
                await kling.forget_durations()
                assert kling._tracker.durations.model(STD5).count == 0
            async with client_for(emu, account=RedisAccount(server.url, lease_ttl=2.0)) as kling:
                assert kling._tracker.durations.model(STD5).count == 0
