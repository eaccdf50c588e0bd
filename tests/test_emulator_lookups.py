"""Lookups as real backends serve them: a visibility lag, duplicate policies, lookups switched
off on CometAPI's family, and wall-clock timestamps. Raw HTTP over loopback, as the wire is what
is asserted; the page arithmetic under a lag is checked against a plain filter with hypothesis."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kling_async.testing import Emulator
from kling_async.testing._state import Lifecycle, TaskStore
from tests.test_emulator import Api, assert_envelope, assert_error, call, sleep_until

pytestmark = pytest.mark.anyio

SCALE = 0.001
#: The three lookup forms of protocol 1.1, as (path, query) for an external id.
FORMS: tuple[Callable[[str], tuple[str, dict[str, str]]], ...] = (
    lambda ext: (f"/{ext}", {}),
    lambda ext: ("", {"external_task_id": ext}),
    lambda ext: (f"/{ext}", {"external_task_id": "true"}),
)


async def listed(api: Api) -> list[str]:
    status, answer = await api.get(pageSize="500")
    assert status == 200, answer
    return [task["task_id"] for task in assert_envelope(answer)]


async def lookups(api: Api, ext: str) -> list[tuple[int, Any]]:
    results = []
    for form in FORMS:
        path, params = form(ext)
        results.append(await api.get(path, **params))
    return results


# -- visibility lag ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["/v1", "/kling/v1"])
async def test_a_lagging_task_is_hidden_from_every_lookup_form_and_the_list(
    session: aiohttp.ClientSession, family: str
) -> None:
    async with Emulator(time_scale=SCALE, median_duration=1e6, visibility_lag=400) as emu:
        api = Api(session, emu, family=family)
        task_id = await api.task_id(external_task_id="late")
        task = emu.tasks[task_id]
        assert task.visible_at == pytest.approx(task.created_at + 400)

        status, answer = await api.get(f"/{task_id}")  # by task id: at once
        assert status == 200
        assert assert_envelope(answer)["task_id"] == task_id
        for status, answer in await lookups(api, "late"):
            assert status == 400
            assert_error(answer, 1201, "Task not found")
        assert task_id not in await listed(api)
        assert emu.now() < task.visible_at  # every look above was inside the lag

        await sleep_until(emu, task.visible_at)
        for status, answer in await lookups(api, "late"):
            assert status == 200, answer
            assert assert_envelope(answer)["task_id"] == task_id
        assert await listed(api) == [task_id]
        assert emu.stats.requests_per_route["get_by_external_id"] == 6


async def test_duplicate_policies_see_invisible_tasks(session: aiohttp.ClientSession) -> None:
    async with Emulator(time_scale=SCALE, median_duration=1e6, visibility_lag=1e5) as emu:
        api = Api(session, emu)
        first = await api.task_id(external_task_id="dup")

        status, answer = await api.create(external_task_id="dup")  # default: reject
        assert status == 400
        assert_error(answer, 1201, "external_task_id", "already exists")

        emu.set_duplicate_policy("return_first")
        assert await api.task_id(external_task_id="dup") == first

        emu.set_duplicate_policy("allow")
        second = await api.task_id(external_task_id="dup")
        assert second != first
        assert emu.stats.created_per_external_id["dup"] == 2
        assert emu.stats.tasks_created == 2
        for status, _ in await lookups(api, "dup"):
            assert status == 400  # both still invisible
        with pytest.raises(ValueError, match="duplicate_external_id"):
            emu.set_duplicate_policy("ignore")  # type: ignore[arg-type]
        assert emu.settings_snapshot()["duplicate_external_id"] == "allow"


async def test_a_lag_change_applies_to_tasks_created_after_it(
    session: aiohttp.ClientSession,
) -> None:
    async with Emulator(time_scale=SCALE, median_duration=1e6, visibility_lag=1e5) as emu:
        api = Api(session, emu)
        hidden = await api.task_id(external_task_id="hidden")
        emu.set_visibility_lag(0)
        shown = await api.task_id(external_task_id="shown")
        older_visible = [await api.task_id() for _ in range(3)]
        assert await listed(api) == [*older_visible[::-1], shown]
        status, _ = await api.get(external_task_id="shown")
        assert status == 200
        status, _ = await api.get(external_task_id="hidden")
        assert status == 400
        assert emu.tasks[hidden].visible_at > emu.now()
        assert emu.settings_snapshot()["visibility_lag"] == 0
        with pytest.raises(ValueError, match="visibility_lag"):
            emu.set_visibility_lag(-1)
        with pytest.raises(TypeError, match="visibility_lag"):
            emu.set_visibility_lag("5")  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(
    lags=st.lists(st.sampled_from([0.0, 0.0, 5.0, 50.0]), min_size=0, max_size=40),
    later=st.floats(min_value=0, max_value=60),
    page_num=st.integers(min_value=1, max_value=8),
    page_size=st.integers(min_value=1, max_value=12),
    unsaved=st.integers(min_value=0, max_value=3),
)
def test_list_pages_are_the_visible_tasks_newest_first(
    lags: list[float], later: float, page_num: int, page_size: int, unsaved: int
) -> None:
    """The tail-filter-then-index paging equals filtering every task, for any mix of lags.

    As in a run: tasks are created in time order before ``now``, and the rows not yet synced
    are the newest ones (the state file writes them in creation order).
    """
    store = TaskStore(seed=3, lifecycle=Lifecycle(median_duration=10))
    for index, lag in enumerate(lags):
        store.create(
            now=index * 2.0,
            model_name="kling-v1",
            mode="std",
            duration="5",
            aspect_ratio="16:9",
            external_task_id=None,
            callback_url=None,
            request={},
            visibility_lag=lag,
        )
    ids = list(store.tasks)
    store.unsaved.update(ids[len(ids) - unsaved :])
    now = 2.0 * len(lags) + later
    visible = [store.tasks[i] for i in reversed(ids) if store.visible(store.tasks[i], now)]
    expected = visible[(page_num - 1) * page_size : page_num * page_size]
    assert list(store.newest_first(page_num, page_size, now)) == expected


# -- lookups switched off on CometAPI's family -------------------------------------------------


@pytest.mark.parametrize(
    ("style", "http_status", "code"),
    [("kling_1201", 400, 1201), ("kling_1203", 404, 1203), ("new_api", 400, "task_not_exist")],
)
async def test_no_cometapi_lookups_on_the_kling_family(
    session: aiohttp.ClientSession, style: Any, http_status: int, code: int | str
) -> None:
    async with Emulator(time_scale=SCALE, cometapi_lookups=False, unknown_task=style) as emu:
        comet = Api(session, emu, family="/kling/v1")
        task_id = await comet.task_id(external_task_id="ext-1")

        for params in ({}, {"external_task_id": "ext-1"}, {"pageNum": "1"}):
            status, answer = await comet.get(**params)
            assert status == 404, params
            assert answer["error"]["code"] == "invalid_url"
            assert answer["error"]["type"] == "comet_api_error"
            assert "GET /kling/v1/videos/text2video" in answer["error"]["message"]

        for path, params in [("/ext-1", {}), ("/ext-1", {"external_task_id": "true"})]:
            status, answer = await comet.get(path, **params)
            assert status == http_status, (path, params)
            assert answer["code"] == code
        status, answer = await comet.get(f"/{task_id}")
        assert status == 200
        assert assert_envelope(answer)["task_id"] == task_id
        assert emu.stats.requests_per_route["list"] == 2
        assert emu.stats.requests_per_route["get_by_external_id"] == 1

        official = Api(session, emu, family="/v1")  # the /v1 family keeps every lookup
        for status, answer in await lookups(official, "ext-1"):
            assert status == 200
            assert assert_envelope(answer)["task_id"] == task_id
        assert await listed(official) == [task_id]


async def test_lookups_are_on_by_default_on_the_kling_family(
    session: aiohttp.ClientSession,
) -> None:
    async with Emulator(time_scale=SCALE) as emu:
        comet = Api(session, emu, family="/kling/v1")
        task_id = await comet.task_id(external_task_id="ext-2")
        for status, answer in await lookups(comet, "ext-2"):
            assert status == 200
            assert assert_envelope(answer)["task_id"] == task_id


# -- timestamps --------------------------------------------------------------------------------


async def test_timestamps_are_wall_clock_milliseconds(session: aiohttp.ClientSession) -> None:
    async with Emulator(
        time_scale=SCALE, median_duration=200, duration_sigma=0, url_ttl=30_000
    ) as emu:
        api = Api(session, emu)
        status, answer = await api.create()
        assert status == 200
        data = assert_envelope(answer)
        assert abs(data["created_at"] - time.time() * 1000) < 1000
        assert data["updated_at"] == data["created_at"]

        await sleep_until(emu, emu.tasks[data["task_id"]].completes_at)
        _, answer = await api.get(f"/{data['task_id']}")
        done = assert_envelope(answer)
        assert done["task_status"] == "succeed"
        assert abs(done["updated_at"] - time.time() * 1000) < 1000
        # 200 emulated seconds at 0.001 real seconds each: 200 real milliseconds.
        assert done["updated_at"] - done["created_at"] == pytest.approx(200, abs=2)
        url = done["task_result"]["videos"][0]["url"]
        expires = int(url.split("expires=")[1].split("&")[0])
        # 30,000 emulated seconds of TTL are 30 real seconds from now, on the wall clock.
        assert abs(expires - (time.time() + 30) * 1000) < 1000


# -- admin ---------------------------------------------------------------------------------------


async def test_admin_settings_cover_the_new_knobs(session: aiohttp.ClientSession) -> None:
    async with Emulator(time_scale=SCALE, median_duration=0, admin=True) as emu:
        url = f"{emu.url}/_emulator/settings"
        hostile = "http://169.254.169.254/latest/meta-data/{video_id}"
        body = {"visibility_lag": 7, "duplicate_external_id": "allow", "result_url": hostile}
        status, answer = await call(session, "POST", url, json=body)
        assert status == 200, answer
        assert answer["visibility_lag"] == 7
        assert answer["duplicate_external_id"] == "allow"
        assert answer["result_url"] == hostile
        assert emu.settings_snapshot() == answer

        for bad in (
            {"visibility_lag": -1},
            {"visibility_lag": True},
            {"duplicate_external_id": "sometimes"},
            {"result_url": "{nope}"},
            {"visibility_lag": 1, "result_url": 5},  # nothing applied when one value is bad
        ):
            status, answer = await call(session, "POST", url, json=bad)
            assert status == 400, bad
            assert "error" in answer
        assert emu.settings_snapshot()["visibility_lag"] == 7

        status, answer = await call(session, "POST", url, json={"result_url": None})
        assert answer["result_url"] is None
        status, answer = await call(session, "GET", url)
        assert status == 200
        assert answer["duplicate_external_id"] == "allow"
