"""The 1:1 client against the emulator over loopback HTTP: create, get, list, wait, watch."""

from __future__ import annotations

import anyio
import pytest

import kling_async as ka
from kling_async.testing import Emulator

from .conftest import SCALE, client_for

pytestmark = pytest.mark.anyio

REQUEST = ka.Text2VideoRequest(prompt="A cat surfing a wave at sunset")


async def test_create_and_wait_round_trip_makes_exactly_one_post(emu: Emulator) -> None:
    async with client_for(emu) as kling:
        task = await kling.text2video.create(REQUEST)
        assert task.status is ka.TaskStatus.SUBMITTED
        assert task.external_task_id is not None and task.external_task_id.startswith("ka-")
        final = await kling.text2video.wait(task.task_id, timeout=10)
    assert final.succeeded
    assert final.video is not None and final.video.url.startswith(emu.files_url)
    assert final.video.duration is not None and 4 < final.video.duration < 6
    assert final.created_at is not None and final.created_at.tzinfo is not None
    assert emu.stats.requests_per_route["create"] == 1
    assert emu.stats.tasks_created == 1
    assert emu.stats.created_per_external_id == {task.external_task_id: 1}


async def test_request_fields_reach_the_server(emu: Emulator) -> None:
    request = ka.Text2VideoRequest(
        prompt="p",
        model_name="kling-v3",
        mode="pro",
        duration=12,
        aspect_ratio="3:2",
        camera_control={"type": "simple", "config": {"zoom": -4}},
        external_task_id="mine-1",
    )
    async with client_for(emu) as kling:
        task = await kling.text2video.create(request)
    emulated = emu.tasks[task.task_id]
    assert (emulated.model_name, emulated.mode, emulated.duration) == ("kling-v3", "pro", "12")
    assert task.external_task_id == "mine-1"


async def test_get_by_task_id_and_by_external_id_in_every_form(emu: Emulator) -> None:
    async with client_for(emu) as kling:
        created = await kling.text2video.create(
            ka.Text2VideoRequest(prompt="p", external_task_id="job/7 ü")
        )
        by_id = await kling.text2video.get(created.task_id)
        assert by_id.task_id == created.task_id
    for form in ("query", "path", "path_flag"):
        async with client_for(emu, external_id_lookup=form) as kling:
            found = await kling.text2video.get(external_task_id="job/7 ü")
            assert found.task_id == created.task_id, form
            assert found.external_task_id == "job/7 ü"


@pytest.mark.parametrize("style", ["kling_1201", "kling_1203", "new_api"])
async def test_unknown_task_is_not_found_in_every_variant(style: str) -> None:
    async with Emulator(time_scale=SCALE, unknown_task=style) as emu:  # type: ignore[arg-type]
        async with client_for(emu) as kling:
            with pytest.raises(ka.TaskNotFoundError) as info:
                await kling.text2video.get("123456789012345678")
            assert info.value.http_status in (400, 404)
            with pytest.raises(ka.TaskNotFoundError):
                await kling.text2video.get(external_task_id="never-made")
        # A verdict, not a glitch: looked up once each, never retried.
        assert emu.stats.requests_per_route["get"] == 1


async def test_list_pages(emu: Emulator) -> None:
    async with client_for(emu) as kling:
        created = [await kling.text2video.create(REQUEST) for _ in range(5)]
        page = await kling.text2video.list(page=1, page_size=3)
        assert [t.task_id for t in page] == [t.task_id for t in reversed(created)][:3]
        second = await kling.text2video.list(page=2, page_size=3)
        assert len(second) == 2
        with pytest.raises(ka.ValidationError, match="page_size"):
            await kling.text2video.list(page_size=501)
    assert emu.stats.requests_per_route["list"] == 2


async def test_wait_raises_task_failed_error_with_the_task() -> None:
    async with Emulator(time_scale=SCALE, failure_rate=1.0) as emu, client_for(emu) as kling:
        task = await kling.text2video.create(REQUEST)
        with pytest.raises(ka.TaskFailedError) as info:
            await kling.text2video.wait(task.task_id, timeout=10)
    assert info.value.task.failed
    assert info.value.task.task_id == task.task_id
    assert info.value.task.status_message
    assert info.value.task.status_message in str(info.value)


async def test_wait_timeout_is_a_timeout_error() -> None:
    async with Emulator(time_scale=1.0) as emu, client_for(emu) as kling:
        task = await kling.text2video.create(REQUEST)
        with pytest.raises(TimeoutError) as info:
            await kling.text2video.wait(task.task_id, timeout=0.2)
    assert isinstance(info.value, ka.WaitTimeoutError)
    assert info.value.task_id == task.task_id
    assert info.value.task is not None and not info.value.task.is_terminal


async def test_watch_yields_each_status_once_in_order(emu: Emulator) -> None:
    async with client_for(emu) as kling:
        task = await kling.text2video.create(REQUEST)
        seen = [snapshot.status async for snapshot in kling.text2video.watch(task.task_id)]
    assert seen[-1] is ka.TaskStatus.SUCCEEDED
    assert len(seen) == len(set(seen))
    order = [ka.TaskStatus.SUBMITTED, ka.TaskStatus.PROCESSING, ka.TaskStatus.SUCCEEDED]
    assert seen == [s for s in order if s in seen]


@pytest.mark.parametrize(
    "make",
    [
        lambda: ka.Text2VideoRequest(prompt="x" * 501),  # CometAPI's limit
        lambda: ka.Text2VideoRequest(prompt="p", negative_prompt="n" * 201),
        lambda: ka.Text2VideoRequest(prompt="p", aspect_ratio="21:9"),
        lambda: ka.Text2VideoRequest(prompt="p", model_name="kling-v1", duration=7),
    ],
)
async def test_invalid_requests_never_reach_the_server(emu: Emulator, make: object) -> None:
    async with client_for(emu) as kling:
        with pytest.raises(ka.ValidationError):
            await kling.text2video.create(make())  # type: ignore[operator]
        with pytest.raises(ka.ValidationError):
            kling.submit(make())  # type: ignore[operator]
    assert sum(emu.stats.requests_per_route.values()) == 0


async def test_official_limits_follow_jwt_auth(emu: Emulator) -> None:
    long_prompt = ka.Text2VideoRequest(prompt="x" * 2000)
    async with client_for(emu, access_key=emu.access_key, secret_key=emu.secret_key) as kling:
        assert kling.profile is ka.OFFICIAL
        task = await kling.text2video.create(long_prompt)
        assert (await kling.text2video.wait(task.task_id, timeout=10)).succeeded
        with pytest.raises(ka.ValidationError, match="official accepts 16:9, 9:16, 1:1"):
            await kling.text2video.create(ka.Text2VideoRequest(prompt="p", aspect_ratio="4:3"))


async def test_kling_path_family_works_too(emu: Emulator) -> None:
    async with client_for(emu, base_url=emu.url + "/kling") as kling:
        task = await kling.text2video.create(REQUEST)
        assert (await kling.text2video.get(task.task_id)).task_id == task.task_id


async def test_bad_key_is_an_authentication_error_not_retried(emu: Emulator) -> None:
    async with client_for(emu, api_key="sk-wrong") as kling:
        with pytest.raises(ka.AuthenticationError) as info:
            await kling.text2video.create(REQUEST)
        assert info.value.http_status == 401
        with pytest.raises(ka.AuthenticationError):
            await kling.text2video.get("1")
    assert emu.stats.tasks_created == 0
    assert emu.stats.requests_per_route["create"] == 1


@pytest.mark.parametrize("code", [1100, 1101, 1102, 1103, 1304])
async def test_account_fatal_codes_are_never_retried(emu: Emulator, code: int) -> None:
    emu.force_account_error(code)
    async with client_for(emu) as kling:
        with pytest.raises(ka.AccountError) as info:
            await kling.text2video.create(REQUEST)
    assert info.value.code == code
    assert info.value.http_status == (403 if code == 1103 else 429)
    assert emu.stats.requests_per_route["create"] == 1
    assert emu.stats.tasks_created == 0


async def test_rejections_are_not_retried(emu: Emulator) -> None:
    # The emulator checks model names; the SDK only warns, so the server's verdict comes back.
    async with client_for(emu) as kling:
        with pytest.warns(ka.UnknownModelWarning):
            request = kling.text2video.prepare(ka.Text2VideoRequest(prompt="p", model_name="x-9"))
        with pytest.raises(ka.InvalidRequestError) as info:
            await kling.text2video.create_prepared(request, kling.text2video._create_settings)
    assert info.value.code == 1201
    assert "model_name" in str(info.value)
    assert emu.stats.requests_per_route["create"] == 1


async def test_rate_limit_1302_is_retried_for_gets_and_creates() -> None:
    async with Emulator(time_scale=SCALE, rate_limit=20, rate_burst=2) as emu:
        async with client_for(emu) as kling:
            tasks = [await kling.text2video.create(REQUEST) for _ in range(4)]
            for task in tasks:
                await kling.text2video.get(task.task_id)
        assert emu.stats.sent_1302 > 0
        assert emu.stats.tasks_created == 4
        assert all(n == 1 for n in emu.stats.created_per_external_id.values())


async def test_concurrency_limit_1303_create_waits_for_a_slot() -> None:
    async with Emulator(time_scale=SCALE, concurrency_limit=1) as emu, client_for(emu) as kling:
        first = await kling.text2video.create(REQUEST)
        second = await kling.text2video.create(REQUEST)
        assert second.task_id != first.task_id
    assert emu.stats.sent_1303 >= 1
    assert emu.stats.peak_active == 1
    assert emu.stats.tasks_created == 2


async def test_jwt_is_reminted_once_on_expiry(
    emu: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first token is minted with a clock 2000 s behind (already expired to the server):
    the server answers 1004, the client mints a fresh one and the call goes through."""
    import time

    import kling_async.protocol.auth as auth_module

    calls = iter([time.time() - 2000])
    monkeypatch.setattr(auth_module, "wall_clock", lambda: next(calls, time.time()))
    async with client_for(emu, access_key=emu.access_key, secret_key=emu.secret_key) as kling:
        task = await kling.text2video.create(REQUEST)
    assert emu.stats.sent_errors[1004] == 1
    assert emu.stats.tokens_seen == 1
    assert emu.stats.tasks_created == 1
    assert task.external_task_id in emu.stats.created_per_external_id


async def test_jwt_refresh_before_expiry_uses_a_new_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """Client and server share a clock that jumps 1600 s: the client mints a fresh token
    before the old one expires, so the server never has to answer 1004."""
    import time

    import kling_async.protocol.auth as auth_module

    offset = [0.0]
    monkeypatch.setattr(auth_module, "wall_clock", lambda: time.time() + offset[0])
    async with (
        Emulator(time_scale=SCALE, wall_clock=lambda: time.time() + offset[0]) as emu,
        client_for(emu, access_key=emu.access_key, secret_key=emu.secret_key) as kling,
    ):
        task = await kling.text2video.create(REQUEST)
        await kling.text2video.get(task.task_id)
        assert emu.stats.tokens_seen == 1
        offset[0] = 1600.0  # 200 s before expiry: inside the refresh margin
        await kling.text2video.get(task.task_id)
        assert emu.stats.tokens_seen == 2
        assert emu.stats.sent_errors[1004] == 0


async def test_client_requires_async_with(emu: Emulator) -> None:
    """Every misuse raises the one documented class, saying what to do instead."""
    kling = client_for(emu)
    with pytest.raises(ka.UsageError, match="async with"):
        await kling.text2video.get("1")
    with pytest.raises(ka.UsageError, match="async with"):
        kling.submit(REQUEST)
    with pytest.raises(ka.UsageError, match="async with"):
        kling.observe(ka.Task(task_id="1", status=ka.TaskStatus.SUBMITTED))
    async with kling:
        pass
    with pytest.raises(ka.UsageError, match="has closed"):
        kling.submit(REQUEST)
    with pytest.raises(ka.UsageError, match="once"):
        async with kling:
            pass
    with pytest.raises(ka.UsageError, match="not both"):
        ka.KlingClient(api_key="sk-x", access_key="ak", secret_key="sk")


async def test_transport_failure_is_typed() -> None:
    async with Emulator(time_scale=SCALE) as emu:
        url = emu.url
    kling = ka.KlingClient(
        api_key="sk-x", base_url=url, retry=ka.RetryPolicy(attempts=2, initial=0.01, maximum=0.02)
    )
    async with kling:
        with pytest.raises(ka.TransportError) as info:
            await kling.text2video.get("1")
        assert info.value.request_sent is False
        with anyio.fail_after(5), pytest.raises(ka.TransportError):
            await kling.text2video.create(REQUEST)
