"""Lookups by external_task_id, learned at run time; and credentials paired with families.

CometAPI documents no lookup by external id, so the client must not trust a miss there: it
looks up a task it knows exists, and where no form finds it, an ambiguous create is reported
(with its external id) instead of being sent again. The emulator's ``cometapi_lookups=False``
serves ``/kling`` that way. The route counters tell the lookup forms apart: a query-form
lookup is always ``get_by_external_id``, a path-form lookup of an id that has no task is
``get`` (the emulator takes it for a task id).
"""

from __future__ import annotations

import anyio
import attrs
import pytest

import kling_async as ka
from kling_async.testing import Emulator, FaultKind, Faults

from .conftest import FAST_RETRY, SCALE, client_for

pytestmark = pytest.mark.anyio

DROP_ALL = Faults(create={FaultKind.DROP_AFTER_COMMIT: 1.0})
FAIL_ALL = Faults(create={FaultKind.ERROR_5XX_BEFORE_COMMIT: 1.0})
#: Rounds of an ambiguous job end after six tries and this long (FAST_RETRY's is 10 s).
SHORT = attrs.evolve(FAST_RETRY, timeout=0.3)


def request(external_task_id: str) -> ka.Text2VideoRequest:
    return ka.Text2VideoRequest(prompt="p", external_task_id=external_task_id)


async def test_without_lookups_an_ambiguous_create_is_reported_not_sent_again() -> None:
    async with Emulator(time_scale=SCALE, cometapi_lookups=False) as emu:
        async with client_for(emu, base_url=emu.url + "/kling") as kling:
            known = await kling.text2video.create(request("known"))
            emu.set_faults(DROP_ALL)
            for i in range(5):
                with anyio.fail_after(10), pytest.raises(ka.AmbiguousSubmissionError) as info:
                    await kling.text2video.create(request(f"lost-{i}"))
                assert info.value.external_task_id == f"lost-{i}"
                assert f"lost-{i}" in str(info.value)
        routes = emu.stats.requests_per_route
        assert routes["create"] == 1 + 5  # one POST per create, never a second
        assert emu.stats.created_per_external_id == {
            "known": 1,
            **{f"lost-{i}": 1 for i in range(5)},
        }
        # The known task was looked for in the path forms too (both answer as a task id here).
        assert routes["get"] >= 2
        assert known.task_id in emu.tasks


async def test_without_lookups_submitted_jobs_end_ambiguous_with_one_post_each() -> None:
    async with Emulator(time_scale=SCALE, cometapi_lookups=False) as emu:
        async with client_for(emu, base_url=emu.url + "/kling", retry=SHORT) as kling:
            await kling.text2video.create(request("known"))
            emu.set_faults(DROP_ALL)
            jobs = kling.submit_many([request(f"job-{i}") for i in range(6)])
            with anyio.fail_after(30):
                async for _ in kling.as_completed(jobs):
                    pass
        for job in jobs:
            assert job.status is ka.JobStatus.ERROR
            assert isinstance(job.error, ka.AmbiguousSubmissionError)
            assert job.error.external_task_id == job.external_task_id
        assert emu.stats.requests_per_route["create"] == 1 + 6
        assert set(emu.stats.created_per_external_id.values()) == {1}


@pytest.mark.parametrize("base", ["", "/kling"])
async def test_with_lookups_an_ambiguous_create_is_resolved_by_lookup(base: str) -> None:
    async with Emulator(time_scale=SCALE) as emu:
        async with client_for(emu, base_url=emu.url + base) as kling:
            await kling.text2video.create(request("known"))
            emu.set_faults(DROP_ALL)
            tasks = [await kling.text2video.create(request(f"found-{i}")) for i in range(3)]
        assert emu.stats.requests_per_route["create"] == 1 + 3
        for i, task in enumerate(tasks):
            assert task.external_task_id == f"found-{i}"
            assert emu.tasks[task.task_id].external_task_id == f"found-{i}"
        assert set(emu.stats.created_per_external_id.values()) == {1}


@pytest.mark.parametrize("form", ["path", "query"])
async def test_the_checked_form_is_the_one_used_afterwards(form: str) -> None:
    """After the check finds the known task in the configured form, the lookups of a create
    that never landed go out in that form (none in the other)."""
    retry = attrs.evolve(FAST_RETRY, attempts=2, budget_ratio=None)
    async with Emulator(time_scale=SCALE) as emu:
        async with client_for(emu, external_id_lookup=form, retry=retry) as kling:
            await kling.text2video.create(request("known"))
            emu.set_faults(FAIL_ALL)
            with anyio.fail_after(10), pytest.raises(ka.AmbiguousSubmissionError):
                await kling.text2video.create(request("never"))
        routes = emu.stats.requests_per_route
        assert routes["create"] == 1 + 2
        assert emu.stats.tasks_created == 1
        if form == "path":
            assert routes["get_by_external_id"] == 1  # the check, which found "known"
            assert routes["get"] >= 2  # a look after each failed POST, all by path
        else:
            assert routes["get_by_external_id"] >= 3
            assert routes["get"] == 0


async def test_a_path_form_client_resolves_an_ambiguous_create() -> None:
    async with Emulator(time_scale=SCALE) as emu:
        async with client_for(emu, external_id_lookup="path") as kling:
            await kling.text2video.create(request("known"))
            emu.set_faults(DROP_ALL)
            task = await kling.text2video.create(request("dropped"))
            emu.set_faults(None)
            final = await kling.text2video.wait(task.task_id, timeout=10)
        assert final.succeeded and final.external_task_id == "dropped"
        assert emu.stats.requests_per_route["create"] == 2
        assert emu.stats.created_per_external_id == {"known": 1, "dropped": 1}


async def test_with_no_lookup_form_a_submitted_job_ends_ambiguous_with_its_id() -> None:
    async with Emulator(time_scale=SCALE, faults=DROP_ALL) as emu:
        async with client_for(emu, external_id_lookup=None) as kling:
            job = kling.submit(request("mine-7"))
            with anyio.fail_after(10):
                async for _ in kling.as_completed([job]):
                    pass
            stats = kling.stats
        assert job.status is ka.JobStatus.ERROR
        assert job.external_task_id == "mine-7"
        assert isinstance(job.error, ka.AmbiguousSubmissionError)
        assert job.error.external_task_id == "mine-7"
        assert "mine-7" in str(job.error)
        assert stats.rejected == 1
        assert emu.stats.requests_per_route["create"] == 1
        assert emu.stats.requests_per_route["get_by_external_id"] == 0
        assert emu.stats.created_per_external_id == {"mine-7": 1}


async def test_strict_auth_pairs_bearer_keys_with_kling_and_jwts_with_v1() -> None:
    async with Emulator(time_scale=SCALE, strict_auth=True) as emu:
        jwt = {"access_key": emu.access_key, "secret_key": emu.secret_key}
        for family, credentials in (("/kling", {}), ("", jwt)):
            async with client_for(emu, base_url=emu.url + family, **credentials) as kling:
                task = await kling.text2video.create(ka.Text2VideoRequest(prompt="p"))
                final = await kling.text2video.wait(task.task_id, timeout=10)
                assert final.succeeded
        created = emu.stats.tasks_created
        posts = emu.stats.requests_per_route["create"]

        for family, credentials in (("", {}), ("/kling", jwt)):
            async with client_for(emu, base_url=emu.url + family, **credentials) as kling:
                with pytest.raises(ka.AuthenticationError):
                    await kling.text2video.create(ka.Text2VideoRequest(prompt="p"))
                with pytest.raises(ka.AuthenticationError):
                    await kling.text2video.get(task.task_id)
                job = kling.submit(ka.Text2VideoRequest(prompt="p"))
                with anyio.fail_after(10):
                    async for _ in kling.as_completed([job]):
                        pass
                assert isinstance(job.error, ka.AuthenticationError)
        assert emu.stats.tasks_created == created
        assert emu.stats.requests_per_route["create"] == posts + 4  # never retried


async def test_a_lookup_answered_with_a_list_page_proves_nothing() -> None:
    """A gateway that ignores ?external_task_id= and answers with a page of the list: the
    page lacks our task, which must not be read as "never created" (a re-POST could bill
    twice). The create ends ambiguous after one POST."""
    from tests.hostile import HostileServer

    async with HostileServer(api_mode="ignores_lookups") as hostile:
        async with ka.KlingClient(
            api_key="sk-test",
            base_url=hostile.url,
            retry=ka.RetryPolicy(attempts=3, timeout=2, initial=0.01, maximum=0.02),
            settle_window=0.1,
        ) as kling:
            with anyio.fail_after(20), pytest.raises(ka.AmbiguousSubmissionError) as info:
                await kling.text2video.create(
                    ka.Text2VideoRequest(prompt="p", external_task_id="mine-1")
                )
            with pytest.raises(ka.ResponseDecodeError, match="may not support lookups"):
                await kling.text2video.get(external_task_id="mine-1")
    assert info.value.external_task_id == "mine-1"
    assert hostile.hits["api_POST"] == 1


async def test_a_refusal_that_only_names_the_field_is_no_proof_of_a_task() -> None:
    """A resumed create refused with "external_task_id is invalid: ..." does not mean the
    task exists: the job ends (ambiguous, its id kept) instead of looking for it forever."""
    from tests.hostile import HostileServer

    async with HostileServer(api_mode="id_rule_400") as hostile:
        async with ka.KlingClient(
            api_key="sk-test",
            base_url=hostile.url,
            retry=ka.RetryPolicy(attempts=3, timeout=0.5, initial=0.01, maximum=0.02),
            settle_window=0.05,
        ) as kling:
            job = kling.submit(
                ka.Text2VideoRequest(prompt="p", external_task_id="mine-2"), resume=True
            )
            with anyio.fail_after(20):
                async for _ in kling.as_completed([job]):
                    pass
    assert isinstance(job.error, ka.AmbiguousSubmissionError | ka.InvalidRequestError)
    assert job.external_task_id == "mine-2"
    assert job.task_id is None
