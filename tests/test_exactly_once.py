"""Creates never bill twice: every fault kind, judged by the emulator's ground truth."""

from __future__ import annotations

import logging

import anyio
import attrs
import pytest

import kling_async as ka
from kling_async.testing import Emulator, FaultKind, Faults

from .conftest import FAST_RETRY, SCALE, client_for

pytestmark = pytest.mark.anyio


async def create_many(kling: ka.KlingClient, n: int) -> list[ka.Task]:
    results: list[ka.Task] = []

    async def one(i: int) -> None:
        results.append(await kling.text2video.create(ka.Text2VideoRequest(prompt=f"clip {i}")))

    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(one, i)
    return results


async def test_ten_creates_dropped_after_commit_leave_exactly_ten_tasks() -> None:
    faults = Faults(create={FaultKind.DROP_AFTER_COMMIT: 1.0})
    async with Emulator(time_scale=SCALE, faults=faults) as emu, client_for(emu) as kling:
        tasks = await create_many(kling, 10)
    assert emu.stats.faults_injected[FaultKind.DROP_AFTER_COMMIT.name] == 10
    assert emu.stats.tasks_created == 10
    assert sorted(emu.stats.created_per_external_id.values()) == [1] * 10
    assert {t.task_id for t in tasks} == set(emu.tasks)
    assert emu.stats.requests_per_route["create"] == 10


@pytest.mark.parametrize(
    "kind",
    [
        FaultKind.ERROR_5XX_BEFORE_COMMIT,
        FaultKind.DROP_AFTER_COMMIT,
        FaultKind.TRUNCATED_JSON,
        FaultKind.COMETAPI_ERROR_ENVELOPE,
        FaultKind.HTML_502,
    ],
)
@pytest.mark.parametrize("duplicates", ["reject", "return_first"])
async def test_each_fault_kind_yields_one_task_per_create(kind: FaultKind, duplicates: str) -> None:
    """Half the creates fail: with no retry budget every create retries until it lands."""
    faults = Faults(create={kind: 0.5})
    unbudgeted = attrs.evolve(FAST_RETRY, budget_ratio=None)
    async with (
        Emulator(time_scale=SCALE, seed=3, faults=faults, duplicate_external_id=duplicates) as emu,  # type: ignore[arg-type]
        client_for(emu, retry=unbudgeted) as kling,
    ):
        tasks = await create_many(kling, 12)
    assert emu.stats.faults_injected[kind.name] > 0
    assert len(tasks) == 12
    assert emu.stats.tasks_created == 12
    assert set(emu.stats.created_per_external_id.values()) == {1}
    assert {t.task_id for t in tasks} == set(emu.tasks)


@pytest.mark.parametrize("kind", [FaultKind.HTML_502, FaultKind.DROP_AFTER_COMMIT])
async def test_under_the_retry_budget_a_failing_create_says_so_and_never_duplicates(
    kind: FaultKind,
) -> None:
    """Half the creates fail, more than the default 20% budget pays retries for: some creates
    end ambiguous, with their id, and none is ever created twice."""
    outcomes: list[ka.Task | ka.AmbiguousSubmissionError] = []
    async with Emulator(time_scale=SCALE, seed=3, faults=Faults(create={kind: 0.5})) as emu:
        async with client_for(emu) as kling:

            async def one(i: int) -> None:
                request = ka.Text2VideoRequest(prompt=f"clip {i}", external_task_id=f"job-{i}")
                try:
                    outcomes.append(await kling.text2video.create(request))
                except ka.AmbiguousSubmissionError as exc:
                    outcomes.append(exc)

            async with anyio.create_task_group() as tg:
                for i in range(24):
                    tg.start_soon(one, i)
    created = emu.stats.created_per_external_id
    assert len(outcomes) == 24
    assert set(created.values()) <= {1}
    for outcome in outcomes:
        if isinstance(outcome, ka.Task):
            assert created[outcome.external_task_id or ""] == 1
        else:
            assert outcome.external_task_id.startswith("job-")


async def test_stalled_reply_is_adopted_by_lookup_not_resent() -> None:
    faults = Faults(create={FaultKind.STALL_AFTER_COMMIT: 1.0}, stall_seconds=5.0)
    async with Emulator(time_scale=SCALE, faults=faults) as emu:
        async with client_for(emu, timeout=0.2) as kling:
            with anyio.fail_after(4):
                task = await kling.text2video.create(ka.Text2VideoRequest(prompt="p"))
        assert emu.stats.requests_per_route["create"] == 1
        assert emu.stats.tasks_created == 1
        assert task.task_id in emu.tasks


async def test_without_lookup_an_ambiguous_create_raises_with_its_external_id() -> None:
    faults = Faults(create={FaultKind.DROP_AFTER_COMMIT: 1.0})
    async with Emulator(time_scale=SCALE, faults=faults) as emu:
        async with client_for(emu, external_id_lookup=None) as kling:
            with pytest.raises(ka.AmbiguousSubmissionError) as info:
                await kling.text2video.create(
                    ka.Text2VideoRequest(prompt="p", external_task_id="mine-42")
                )
        assert info.value.external_task_id == "mine-42"
        assert "mine-42" in str(info.value)
        assert emu.stats.requests_per_route["create"] == 1  # never re-sent blindly
        assert emu.stats.created_per_external_id == {"mine-42": 1}


async def test_a_create_that_never_lands_ends_ambiguous_not_duplicated() -> None:
    faults = Faults(create={FaultKind.ERROR_5XX_BEFORE_COMMIT: 1.0})
    async with Emulator(time_scale=SCALE, faults=faults) as emu:
        async with client_for(
            emu, retry=ka.RetryPolicy(attempts=3, initial=0.01, maximum=0.02)
        ) as kling:
            with pytest.raises(ka.AmbiguousSubmissionError) as info:
                await kling.text2video.create(ka.Text2VideoRequest(prompt="p"))
        assert isinstance(info.value.cause, ka.ServerError)
        assert emu.stats.requests_per_route["create"] == 3
        assert emu.stats.tasks_created == 0


async def test_query_faults_are_retried_until_wait_succeeds() -> None:
    rates = {
        FaultKind.ERROR_5XX_BEFORE_COMMIT: 0.1,
        FaultKind.DROP_AFTER_COMMIT: 0.1,
        FaultKind.TRUNCATED_JSON: 0.1,
        FaultKind.COMETAPI_ERROR_ENVELOPE: 0.1,
        FaultKind.HTML_502: 0.1,
    }
    async with Emulator(time_scale=SCALE, seed=11, faults=Faults(query=rates)) as emu:
        async with client_for(emu) as kling:
            tasks = [
                await kling.text2video.create(ka.Text2VideoRequest(prompt="p")) for _ in range(5)
            ]
            finals = [await kling.text2video.wait(t.task_id, timeout=20) for t in tasks]
        assert all(t.succeeded for t in finals)
        assert sum(emu.stats.faults_injected.values()) > 0


async def test_no_secret_reaches_a_repr_an_error_or_a_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    faults = Faults.storm(0.15, stall_seconds=1.0)
    secrets: list[str] = []
    messages: list[str] = []
    async with Emulator(time_scale=SCALE, seed=5, faults=faults) as emu:
        secrets += [emu.api_key, emu.secret_key]
        for kwargs in (
            {"api_key": emu.api_key},
            {"access_key": emu.access_key, "secret_key": emu.secret_key},
            {"api_key": "sk-this-one-is-wrong"},
        ):
            async with client_for(emu, timeout=0.3, **kwargs) as kling:
                token = kling._auth.header().removeprefix("Bearer ")
                secrets.append(token)
                messages.append(repr(kling))
                messages.append(repr(kling._auth))
                for _ in range(4):
                    try:
                        task = await kling.text2video.create(ka.Text2VideoRequest(prompt="p"))
                        await kling.text2video.wait(task.task_id, timeout=5)
                    except ka.KlingError as exc:
                        messages += [str(exc), repr(exc), repr(exc.__cause__)]
    secrets.append("sk-this-one-is-wrong")
    messages += [record.getMessage() for record in caplog.records]
    messages += [str(record.exc_info) for record in caplog.records if record.exc_info]
    assert len(messages) > 6
    for secret in secrets:
        for message in messages:
            assert secret not in message
