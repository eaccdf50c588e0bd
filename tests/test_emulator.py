"""The emulator speaks the protocol: routes, envelope, validation, lifecycle, limits, lookups.

Every test talks to a real emulator over loopback HTTP with a raw aiohttp client: the emulator is
the reference server the SDK is tested against, so its wire behaviour is what is asserted here.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import re
import time
import uuid
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import anyio
import jwt
import pytest

from kling_async import testing
from kling_async.testing import EmulatedTask, Emulator, FaultKind, Faults
from kling_async.testing._callbacks import CallbackScheduler
from kling_async.testing._state import Lifecycle, TaskStore

pytestmark = pytest.mark.anyio

CREATE = "/v1/videos/text2video"
FAMILIES = ("/v1", "/kling/v1")
TASK_KEYS = {
    "task_id",
    "task_status",
    "task_status_msg",
    "task_info",
    "task_result",
    "final_unit_deduction",
    "created_at",
    "updated_at",
}


# -- helpers (imported by the other test_emulator_* files) --------------------------------------


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def mint_jwt(
    access_key: str, secret: str, now: float, *, exp: float = 1800, nbf: float = -5
) -> str:
    payload = {"iss": access_key, "exp": int(now + exp), "nbf": int(now + nbf)}
    return jwt.encode(payload, secret, algorithm="HS256", headers={"typ": "JWT"})


async def call(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> tuple[int, Any]:
    """One request; the status and the decoded JSON body (or the text if it is not JSON)."""
    async with session.request(method, url, headers=headers, **kwargs) as response:
        text = await response.text()
    try:
        return response.status, json.loads(text)
    except ValueError:
        return response.status, text


class Api:
    """A thin raw client: paths and headers only, so every assertion is about the wire."""

    def __init__(
        self, session: aiohttp.ClientSession, emu: Emulator, *, family: str = "/v1", token: str = ""
    ) -> None:
        self.session = session
        self.emu = emu
        self.base = emu.url + family
        self.headers = bearer(token or emu.api_key)

    async def create(self, **body: Any) -> tuple[int, Any]:
        body.setdefault("prompt", "A cat surfing a wave")
        url = f"{self.base}/videos/text2video"
        return await call(self.session, "POST", url, headers=self.headers, json=body)

    async def get(self, path: str = "", **params: str) -> tuple[int, Any]:
        url = f"{self.base}/videos/text2video{path}"
        return await call(self.session, "GET", url, headers=self.headers, params=params)

    async def task_id(self, **body: Any) -> str:
        status, answer = await self.create(**body)
        assert status == 200, answer
        return str(answer["data"]["task_id"])


async def sleep_until(emu: Emulator, emulated_time: float) -> None:
    """Sleep (real time) until the emulated clock has passed ``emulated_time``."""
    await anyio.sleep(max(emulated_time - emu.now(), 0.0) * emu.time_scale + 0.002)
    assert emu.now() > emulated_time


async def eventually(predicate: Callable[[], bool], *, within: float = 5.0) -> None:
    """Wait for ground truth (the emulator's stats), which has no event to wait on."""
    with anyio.fail_after(within):
        while not predicate():
            await anyio.sleep(0.005)


def assert_envelope(answer: Any) -> Any:
    assert set(answer) == {"code", "message", "request_id", "data"}
    assert answer["code"] == 0
    assert answer["message"] == "SUCCEED"
    assert uuid.UUID(answer["request_id"]).version == 4
    return answer["data"]


def assert_error(answer: Any, code: int, *fragments: str) -> None:
    assert set(answer) == {"code", "message", "request_id"}, answer
    assert answer["code"] == code, answer
    for fragment in fragments:
        assert fragment in answer["message"], answer


# -- envelope and routes -----------------------------------------------------------------------


async def test_create_answer_is_the_documented_envelope(session: aiohttp.ClientSession) -> None:
    async with Emulator(time_scale=0.001, median_duration=1e6) as emu:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", emu.url)
        status, answer = await Api(session, emu).create(external_task_id="job-1")
        assert status == 200
        data = assert_envelope(answer)
        assert set(data) == {"task_id", "task_status", "task_info", "created_at", "updated_at"}
        assert re.fullmatch(r"[1-9]\d{17}", data["task_id"])
        assert data["task_status"] == "submitted"
        assert data["task_info"] == {"external_task_id": "job-1"}
        assert data["created_at"] == data["updated_at"]
        assert isinstance(data["created_at"], int)
        assert data["created_at"] > 1_600_000_000_000  # Unix milliseconds
        task = emu.tasks[data["task_id"]]
        assert task.external_task_id == "job-1"
        assert (task.model_name, task.mode, task.duration) == ("kling-v1", "std", "5")
        assert emu.stats.tasks_created == 1
        assert emu.stats.created_per_external_id == {"job-1": 1}


@pytest.mark.parametrize("family", FAMILIES)
async def test_every_route_answers_in_both_families(
    session: aiohttp.ClientSession, family: str
) -> None:
    async with Emulator(time_scale=0.001, median_duration=1e6) as emu:
        api = Api(session, emu, family=family)
        task_id = await api.task_id(external_task_id="ext-7")
        no_ext = await api.task_id()

        for path, params, route in [
            (f"/{task_id}", {}, "get"),
            ("/ext-7", {}, "get_by_external_id"),
            ("", {"external_task_id": "ext-7"}, "get_by_external_id"),
            ("/ext-7", {"external_task_id": "true"}, "get_by_external_id"),
        ]:
            before = emu.stats.requests_per_route[route]
            status, answer = await api.get(path, **params)
            assert status == 200, (path, params, answer)
            data = assert_envelope(answer)
            assert set(data) == TASK_KEYS
            assert data["task_id"] == task_id
            assert data["task_info"] == {"external_task_id": "ext-7"}
            assert data["task_status"] == "submitted"
            assert data["task_result"] == {}
            assert emu.stats.requests_per_route[route] == before + 1

        status, answer = await api.get(f"/{no_ext}")
        assert assert_envelope(answer)["task_info"] == {}

        status, answer = await api.get(pageNum="1", pageSize="10")
        assert status == 200
        assert [task["task_id"] for task in assert_envelope(answer)] == [no_ext, task_id]
        assert emu.stats.requests_per_route["create"] == 2
        assert emu.stats.requests_per_route["list"] == 1


async def test_unknown_paths_and_methods_answer_in_the_kling_envelope(
    session: aiohttp.ClientSession,
) -> None:
    async with Emulator(time_scale=0.001) as emu:
        status, answer = await call(session, "GET", emu.url + "/v1/videos/nothing")
        assert status == 404
        assert_error(answer, 1203)
        status, answer = await call(session, "DELETE", emu.url + CREATE)
        assert status == 404
        assert_error(answer, 1202, "DELETE")


# -- lifecycle ---------------------------------------------------------------------------------


async def test_lifecycle_on_the_scaled_clock(session: aiohttp.ClientSession) -> None:
    # sigma 0: every std 5 s task takes exactly 300 emulated s = 0.3 real s; half of it queued.
    async with Emulator(
        time_scale=0.001, median_duration=300, duration_sigma=0, queue_fraction=0.5
    ) as emu:
        api = Api(session, emu)
        task_id = await api.task_id(external_task_id="life")
        task = emu.tasks[task_id]
        assert task.completes_at - task.created_at == pytest.approx(300)
        assert task.started_at - task.created_at == pytest.approx(150)

        _, answer = await api.get(f"/{task_id}")
        assert answer["data"]["task_status"] == "submitted"
        await sleep_until(emu, task.started_at + 5)
        _, answer = await api.get(f"/{task_id}")
        data = answer["data"]
        assert data["task_status"] == "processing"
        assert data["task_result"] == {}
        # Wall-clock milliseconds: 150 emulated seconds at time_scale 0.001 are 150 real ms.
        assert data["updated_at"] - data["created_at"] == pytest.approx(150, abs=2)
        await sleep_until(emu, task.completes_at + 5)
        _, answer = await api.get(f"/{task_id}")
        data = answer["data"]
        assert data["task_status"] == "succeed"
        assert data["task_status_msg"] == ""
        assert data["final_unit_deduction"] == "1"
        assert data["updated_at"] - data["created_at"] == pytest.approx(300, abs=2)
        (video,) = data["task_result"]["videos"]
        assert set(video) == {"id", "url", "duration"}
        assert video["id"] == task.video_ids[0]
        assert video["url"] == f"{emu.files_url}/files/{video['id']}.mp4"
        assert re.fullmatch(r"5\.[1-3]", video["duration"])


def test_status_is_derived_from_the_clock() -> None:
    task = EmulatedTask(
        task_id="123456789012345678",
        external_task_id=None,
        model_name="kling-v1",
        mode="std",
        duration="5",
        aspect_ratio="16:9",
        callback_url=None,
        created_at=10.0,
        started_at=20.0,
        completes_at=50.0,
        outcome="failed",
        failure_message="Video generation failed",
        videos=(),
        final_unit_deduction="1",
        request={},
    )
    assert [task.status_at(t) for t in (10, 19.9, 20, 49.9, 50, 1e9)] == [
        "submitted",
        "submitted",
        "processing",
        "processing",
        "failed",
        "failed",
    ]
    assert [task.changed_at(t) for t in (15, 25, 55)] == [10, 20, 50]
    assert [task.is_active(t) for t in (9, 10, 49.9, 50)] == [False, True, True, False]


async def test_durations_follow_mode_and_clip_length(session: aiohttp.ClientSession) -> None:
    async with Emulator(
        time_scale=0.001, median_duration=1e6, duration_sigma=0, pro_factor=2, long_factor=3
    ) as emu:
        api = Api(session, emu)
        spans = {}
        for mode, duration in [("std", "5"), ("pro", "5"), ("std", "10"), ("pro", "10")]:
            task = emu.tasks[await api.task_id(mode=mode, duration=duration)]
            spans[mode, duration] = task.completes_at - task.created_at
        assert spans["pro", "5"] == pytest.approx(2 * spans["std", "5"])
        assert spans["std", "10"] == pytest.approx(3 * spans["std", "5"])
        assert spans["pro", "10"] == pytest.approx(6 * spans["std", "5"])
        assert spans["std", "5"] == pytest.approx(1e6)


async def test_failure_rate(session: aiohttp.ClientSession) -> None:
    async with Emulator(time_scale=0.001, median_duration=0, failure_rate=1.0) as emu:
        api = Api(session, emu)
        task_id = await api.task_id()
        _, answer = await api.get(f"/{task_id}")
        data = answer["data"]
        assert data["task_status"] == "failed"
        assert data["task_status_msg"] == "Video generation failed"
        assert data["task_result"] == {}
        assert data["final_unit_deduction"] == "0"
        assert emu.tasks[task_id].video_ids == ()

    async with Emulator(time_scale=0.001, median_duration=0, failure_rate=0.3, seed=5) as emu:
        api = Api(session, emu)
        for _ in range(100):
            await api.task_id()
        failed = sum(task.outcome == "failed" for task in emu.tasks.values())
        assert 15 <= failed <= 45
        _, answer = await api.get(pageSize="100")
        assert sum(task["task_status"] == "failed" for task in answer["data"]) == failed


async def test_same_seed_same_tasks() -> None:
    async def run(seed: int) -> list[tuple[str, float, str]]:
        async with (
            Emulator(time_scale=0.001, seed=seed, failure_rate=0.5) as emu,
            aiohttp.ClientSession() as session,
        ):
            api = Api(session, emu)
            for index in range(12):
                await api.task_id(mode="pro" if index % 3 else "std")
            return [
                (task.task_id, round(task.completes_at - task.created_at, 6), task.outcome)
                for task in emu.tasks.values()
            ]

    first, again, other = await run(42), await run(42), await run(43)
    assert first == again
    assert first != other
    assert {outcome for *_, outcome in first} == {"succeed", "failed"}


# -- concurrency, rate, account ----------------------------------------------------------------


async def test_concurrency_limit_answers_1303_and_creates_nothing(
    session: aiohttp.ClientSession,
) -> None:
    async with Emulator(
        time_scale=0.001, median_duration=100, duration_sigma=0, concurrency_limit=2
    ) as emu:
        api = Api(session, emu)
        first = await api.task_id()
        await api.task_id()
        status, answer = await api.create(external_task_id="third")
        assert status == 429
        assert_error(answer, 1303, "parallel task over resource pack limit")
        assert emu.stats.tasks_created == 2
        assert emu.stats.sent_1303 == 1
        assert emu.stats.sent_errors[1303] == 1
        assert "third" not in emu.stats.created_per_external_id
        assert emu.active_tasks() == 2

        emu.set_concurrency_limit(3)
        await api.task_id()
        assert emu.stats.peak_active == 3

        await sleep_until(emu, emu.tasks[first].completes_at + 100)  # all three done
        assert emu.active_tasks() == 0
        emu.set_concurrency_limit(1)
        await api.task_id()
        status, _ = await api.create()
        assert status == 429
        assert emu.stats.sent_1303 == 2
        assert emu.stats.peak_active == 3
        emu.set_concurrency_limit(None)
        await api.task_id()


async def test_rate_limit_answers_1302_on_every_route(session: aiohttp.ClientSession) -> None:
    async with Emulator(time_scale=0.001, rate_limit=0.5, rate_burst=3) as emu:
        api = Api(session, emu)
        task_id = await api.task_id()
        assert (await api.get(f"/{task_id}"))[0] == 200
        assert (await api.get())[0] == 200
        for attempt in (api.get(f"/{task_id}"), api.create(), api.get(external_task_id="x")):
            status, answer = await attempt
            assert status == 429
            assert_error(answer, 1302)
        assert emu.stats.sent_1302 == 3
        assert emu.stats.tasks_created == 1


@pytest.mark.parametrize(
    ("code", "http_status"), [(1100, 429), (1101, 429), (1102, 429), (1103, 403), (1304, 429)]
)
async def test_forced_account_errors(
    session: aiohttp.ClientSession, code: int, http_status: int
) -> None:
    async with Emulator(time_scale=0.001) as emu:
        api = Api(session, emu)
        emu.force_account_error(code)
        status, answer = await api.create()
        assert status == http_status
        assert_error(answer, code)
        assert emu.stats.tasks_created == 0
        assert emu.stats.sent_errors[code] == 1
        emu.force_account_error(None)
        await api.task_id()
        with pytest.raises(ValueError, match="code must be one of"):
            emu.force_account_error(1303)


# -- lookups, duplicates, list -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("style", "http_status", "code"),
    [("kling_1201", 400, 1201), ("kling_1203", 404, 1203), ("new_api", 400, "task_not_exist")],
)
async def test_unknown_task_variants(
    session: aiohttp.ClientSession, style: Any, http_status: int, code: int | str
) -> None:
    async with Emulator(time_scale=0.001, unknown_task=style) as emu:
        api = Api(session, emu)
        await api.task_id(external_task_id="known")
        for path, params in [
            ("/999999999999999999", {}),
            ("/nobody", {}),
            ("", {"external_task_id": "nobody"}),
            ("/known-not", {"external_task_id": "true"}),
        ]:
            status, answer = await api.get(path, **params)
            assert status == http_status, (path, params)
            assert answer["code"] == code
            if isinstance(code, int):
                assert_error(answer, code, "Task not found")
            else:
                assert answer == {"code": "task_not_exist", "message": "task_not_exist"}


async def test_task_id_wins_over_an_external_id_with_the_same_text(
    session: aiohttp.ClientSession,
) -> None:
    async with Emulator(time_scale=0.001) as emu:
        api = Api(session, emu)
        first = await api.task_id()
        second = await api.task_id(external_task_id=first)
        _, answer = await api.get(f"/{first}")
        assert answer["data"]["task_id"] == first
        _, answer = await api.get(f"/{first}", external_task_id="true")
        assert answer["data"]["task_id"] == second


async def test_duplicate_external_id_rejected(session: aiohttp.ClientSession) -> None:
    async with Emulator(time_scale=0.001, duplicate_external_id="reject") as emu:
        api = Api(session, emu)
        await api.task_id(external_task_id="dup")
        status, answer = await api.create(external_task_id="dup")
        assert status == 400
        assert_error(answer, 1201, "external_task_id", "already exists")
        assert emu.stats.tasks_created == 1
        assert emu.stats.created_per_external_id["dup"] == 1


async def test_duplicate_external_id_returns_the_first(session: aiohttp.ClientSession) -> None:
    async with Emulator(time_scale=0.001, duplicate_external_id="return_first") as emu:
        api = Api(session, emu)
        first = await api.task_id(external_task_id="dup")
        assert await api.task_id(external_task_id="dup") == first
        assert emu.stats.tasks_created == 1
        assert emu.stats.created_per_external_id["dup"] == 1


async def test_duplicate_external_id_allowed_counts_every_task(
    session: aiohttp.ClientSession,
) -> None:
    async with Emulator(time_scale=0.001, duplicate_external_id="allow") as emu:
        api = Api(session, emu)
        first = await api.task_id(external_task_id="dup")
        second = await api.task_id(external_task_id="dup")
        assert first != second
        assert emu.stats.created_per_external_id["dup"] == 2
        _, answer = await api.get(external_task_id="dup")
        assert answer["data"]["task_id"] == first


async def test_list_pages_newest_first(session: aiohttp.ClientSession) -> None:
    async with Emulator(time_scale=0.001) as emu:
        api = Api(session, emu)
        created = [await api.task_id() for _ in range(7)]
        newest_first = created[::-1]

        async def page(**params: str) -> list[str]:
            status, answer = await api.get(**params)
            assert status == 200
            data = assert_envelope(answer)
            assert isinstance(data, list)
            return [task["task_id"] for task in data]

        assert await page() == newest_first
        assert await page(pageNum="1", pageSize="3") == newest_first[:3]
        assert await page(pageNum="2", pageSize="3") == newest_first[3:6]
        assert await page(pageNum="3", pageSize="3") == newest_first[6:]
        assert await page(pageNum="4", pageSize="3") == []
        assert await page(pageNum="1000", pageSize="500") == []
        for name, value in [
            ("pageNum", "0"),
            ("pageNum", "1001"),
            ("pageSize", "0"),
            ("pageSize", "501"),
            ("pageSize", "ten"),
        ]:
            status, answer = await api.get(**{name: value})
            assert status == 400
            assert_error(answer, 1201, name)


# -- validation --------------------------------------------------------------------------------

COMET_ONLY_RATIOS = ["4:3", "3:4", "3:2", "2:3"]
LONG = "x" * 501

# (body changes, code, field named in the message), rejected under both profiles
ALWAYS_INVALID: list[tuple[dict[str, Any], int, str]] = [
    ({"prompt": None}, 1201, "prompt"),
    ({"prompt": ""}, 1201, "prompt"),
    ({"prompt": "   "}, 1201, "prompt"),
    ({"prompt": 5}, 1201, "prompt"),
    ({"prompt": "x" * 2501}, 1201, "prompt"),
    ({"negative_prompt": "x" * 2501}, 1201, "negative_prompt"),
    ({"negative_prompt": ["no"]}, 1201, "negative_prompt"),
    ({"cfg_scale": 1.5}, 1201, "cfg_scale"),
    ({"cfg_scale": -0.1}, 1201, "cfg_scale"),
    ({"cfg_scale": "0.5"}, 1201, "cfg_scale"),
    ({"cfg_scale": True}, 1201, "cfg_scale"),
    ({"mode": "ultra"}, 1201, "mode"),
    ({"duration": 5}, 1201, "duration"),
    ({"duration": "7"}, 1201, "duration"),
    ({"duration": "15"}, 1201, "duration"),
    ({"model_name": "kling-v9"}, 1201, "model_name"),
    ({"aspect_ratio": "21:9"}, 1201, "aspect_ratio"),
    ({"callback_url": 7}, 1201, "callback_url"),
    ({"external_task_id": 7}, 1201, "external_task_id"),
    ({"external_task_id": ""}, 1201, "external_task_id"),
    ({"camera_control": "zoom"}, 1201, "camera_control"),
    ({"camera_control": {"type": "spin"}}, 1201, "camera_control.type"),
    ({"camera_control": {"type": "simple"}}, 1201, "camera_control.config"),
    (
        {"camera_control": {"type": "down_back", "config": {"zoom": 5}}},
        1201,
        "camera_control.config",
    ),
    (
        {"camera_control": {"type": "simple", "config": {"zoom": 11}}},
        1201,
        "camera_control.config.zoom",
    ),
    (
        {"camera_control": {"type": "simple", "config": {"zoom": 5, "pan": 1}}},
        1201,
        "camera_control.config",
    ),
    (
        {"camera_control": {"type": "simple", "config": dict.fromkeys(["pan", "zoom"], 0)}},
        1201,
        "camera_control.config",
    ),
    (
        {"camera_control": {"type": "simple", "config": {"spin": 1}}},
        1201,
        "camera_control.config.spin",
    ),
]

ALWAYS_VALID: list[dict[str, Any]] = [
    {"model_name": "kling-v3", "duration": "15"},
    {"model_name": "kling-v3", "duration": "3"},
    {"model_name": "kling-v2-5-turbo", "mode": "pro", "duration": "10", "aspect_ratio": "9:16"},
    {"cfg_scale": 0},
    {"cfg_scale": 1},
    {"cfg_scale": 0.25},
    {"camera_control": {"type": "simple", "config": {"zoom": -10}}},
    {
        "camera_control": {
            "type": "simple",
            "config": {"horizontal": 0, "vertical": 0, "pan": 0, "tilt": 2.5, "roll": 0, "zoom": 0},
        }
    },
    {"camera_control": {"type": "forward_up"}},
    {"callback_url": "http://10.1.2.3/not-called"},
    {"sound": "on", "watermark_info": {"enabled": False}, "multi_shot": True},
]


async def _check_rejected(
    api: Api, emu: Emulator, changes: dict[str, Any], code: int, field: str
) -> None:
    body = {"prompt": "A cat surfing a wave", **changes}
    status, answer = await call(
        api.session, "POST", f"{api.base}/videos/text2video", headers=api.headers, json=body
    )
    assert status == 400, (changes, answer)
    assert_error(answer, code)
    assert answer["message"].startswith(field), (field, answer["message"])
    assert emu.stats.tasks_created == 0


@pytest.mark.parametrize("profile", ["cometapi", "official"])
async def test_validation_rules_name_the_field(
    session: aiohttp.ClientSession, profile: str
) -> None:
    async with Emulator(time_scale=0.001) as emu:
        token = emu.api_key
        if profile == "official":
            token = mint_jwt(emu.access_key, emu.secret_key, time.time())
        api = Api(session, emu, token=token)
        for changes, code, field in ALWAYS_INVALID:
            await _check_rejected(api, emu, changes, code, field)
        for changes in ALWAYS_VALID:
            status, answer = await api.create(**changes)
            assert status == 200, (changes, answer)


async def test_validation_limits_follow_the_auth_mode(session: aiohttp.ClientSession) -> None:
    async with Emulator(time_scale=0.001) as emu:
        comet = Api(session, emu)
        official = Api(session, emu, token=mint_jwt(emu.access_key, emu.secret_key, time.time()))
        for family in FAMILIES:
            comet_other = Api(session, emu, family=family)
            await _check_rejected(comet_other, emu, {"prompt": LONG}, 1201, "prompt")
        await _check_rejected(comet, emu, {"negative_prompt": "x" * 201}, 1201, "negative_prompt")
        for ratio in COMET_ONLY_RATIOS:
            await _check_rejected(official, emu, {"aspect_ratio": ratio}, 1201, "aspect_ratio")

        assert (await comet.create(prompt="x" * 500, negative_prompt="x" * 200))[0] == 200
        assert (await official.create(prompt=LONG, negative_prompt="x" * 2500))[0] == 200
        assert (await official.create(prompt="x" * 2500))[0] == 200
        for ratio in COMET_ONLY_RATIOS:
            assert (await comet.create(aspect_ratio=ratio))[0] == 200


async def test_body_must_be_a_json_object(session: aiohttp.ClientSession) -> None:
    async with Emulator(time_scale=0.001) as emu:
        headers = {**bearer(emu.api_key), "Content-Type": "application/json"}
        for raw in [b"[1, 2]", b'"prompt"', b"{not json", b"", b'{"prompt": NaN}']:
            status, answer = await call(
                session, "POST", emu.url + CREATE, headers=headers, data=raw
            )
            assert status == 400, raw
            assert_error(answer, 1200)
        assert emu.stats.tasks_created == 0


async def test_unknown_fields_are_kept_and_ignored(session: aiohttp.ClientSession) -> None:
    async with Emulator(time_scale=0.001) as emu:
        task_id = await Api(session, emu).task_id(sound="on", multi_shot={"shots": 2})
        request = emu.tasks[task_id].request
        assert request["sound"] == "on"
        assert request["multi_shot"] == {"shots": 2}


# -- auth --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
async def test_missing_or_malformed_authorization(
    session: aiohttp.ClientSession, family: str
) -> None:
    async with Emulator(time_scale=0.001) as emu:
        url = emu.url + family + "/videos/text2video"
        for headers, code in [
            ({}, 1001),
            ({"Authorization": ""}, 1001),
            ({"Authorization": f"Basic {emu.api_key}"}, 1002),
            ({"Authorization": "Bearer"}, 1002),
            ({"Authorization": "Bearer not.a.jwt"}, 1002),
        ]:
            for method in ("GET", "POST"):
                status, answer = await call(session, method, url, headers=headers, json={})
                assert status == 401, headers
                assert_error(answer, code)
        assert emu.stats.sent_errors[1001] == 4
        assert emu.stats.tasks_created == 0


async def test_unknown_bearer_key(session: aiohttp.ClientSession) -> None:
    async with Emulator(time_scale=0.001, api_keys=("sk-a", "sk-b")) as emu:
        assert emu.api_key == "sk-a"
        status, answer = await call(session, "GET", emu.url + CREATE, headers=bearer("sk-wrong"))
        assert status == 401
        assert_error(answer, 1000)
        status, answer = await call(
            session, "GET", emu.url + "/kling" + CREATE, headers=bearer("sk-wrong")
        )
        assert status == 401
        assert answer["error"]["type"] == "comet_api_error"
        assert set(answer["error"]) == {"message", "type", "param", "code"}
        for key in ("sk-a", "sk-b"):
            status, _ = await call(session, "GET", emu.url + CREATE, headers=bearer(key))
            assert status == 200


async def test_jwt_lifetime_is_checked_against_the_wall_clock(
    session: aiohttp.ClientSession,
) -> None:
    wall = [1_800_000_000.0]
    async with Emulator(time_scale=0.001, wall_clock=lambda: wall[0]) as emu:

        async def status_with(token: str) -> tuple[int, Any]:
            return await call(session, "GET", emu.url + CREATE, headers=bearer(token))

        token = mint_jwt(emu.access_key, emu.secret_key, wall[0])
        assert (await status_with(token))[0] == 200
        assert (await status_with(token))[0] == 200
        assert emu.stats.tokens_seen == 1

        wall[0] += 1799  # still valid one second before exp
        assert (await status_with(token))[0] == 200
        wall[0] += 1  # exp reached
        status, answer = await status_with(token)
        assert status == 401
        assert_error(answer, 1004)

        future = mint_jwt(emu.access_key, emu.secret_key, wall[0], nbf=+60)
        status, answer = await status_with(future)
        assert status == 401
        assert_error(answer, 1003)
        wall[0] += 60
        assert (await status_with(future))[0] == 200
        assert emu.stats.tokens_seen == 2

        forged = mint_jwt(emu.access_key, "x" * 40, wall[0])
        status, answer = await status_with(forged)
        assert status == 401
        assert_error(answer, 1000)
        stranger = mint_jwt("ak-stranger", emu.secret_key, wall[0])
        status, answer = await status_with(stranger)
        assert status == 401
        assert_error(answer, 1000)
        assert emu.stats.tokens_seen == 2

        # A JWT works on both families and for creates.
        fresh = mint_jwt(emu.access_key, emu.secret_key, wall[0])
        api = Api(session, emu, family="/kling/v1", token=fresh)
        assert (await api.create())[0] == 200


async def test_short_user_secrets_do_not_warn(session: aiohttp.ClientSession) -> None:
    async with Emulator(time_scale=0.001, access_keys={"ak": "short"}) as emu:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # minting with a short key warns in PyJWT
            token = mint_jwt("ak", "short", time.time())
        status, _ = await call(session, "GET", emu.url + CREATE, headers=bearer(token))
        assert status == 200


# -- files -------------------------------------------------------------------------------------


async def test_download_serves_the_known_bytes_without_auth(
    session: aiohttp.ClientSession,
) -> None:
    async with Emulator(time_scale=0.001, median_duration=0) as emu:
        api = Api(session, emu)
        task_id = await api.task_id()
        _, answer = await api.get(f"/{task_id}")
        (video,) = answer["data"]["task_result"]["videos"]
        async with session.get(video["url"]) as response:
            assert response.status == 200
            assert response.content_type == "video/mp4"
            body = await response.read()
            assert response.content_length == len(body)
        assert body == emu.video_bytes(video["id"])
        assert hashlib.sha256(body).hexdigest() == emu.video_sha256(video["id"])
        assert body[4:8] == b"ftyp"
        assert 1500 < len(body) < 9000
        assert emu.stats.requests_per_route["download"] == 1

        async with session.get(f"{emu.files_url}/files/{uuid.uuid4()}.mp4") as response:
            assert response.status == 404
        with pytest.raises(KeyError):
            emu.video_bytes("nope")


async def test_video_urls_expire_and_a_fresh_get_renews_them(
    session: aiohttp.ClientSession,
) -> None:
    async with Emulator(time_scale=0.01, median_duration=0, url_ttl=20) as emu:
        api = Api(session, emu)
        task_id = await api.task_id()
        _, answer = await api.get(f"/{task_id}")
        url = answer["data"]["task_result"]["videos"][0]["url"]
        assert "expires=" in url
        assert "sig=" in url
        async with session.get(url) as response:
            assert response.status == 200
            assert await response.read() == emu.video_bytes(emu.tasks[task_id].video_ids[0])

        tampered = re.sub(r"sig=\w", "sig=Z", url)
        async with session.get(tampered) as response:
            assert response.status == 403
        async with session.get(url.split("?")[0]) as response:
            assert response.status == 403

        await sleep_until(emu, emu.now() + 21)
        async with session.get(url) as response:
            assert response.status == 403
        _, answer = await api.get(f"/{task_id}")
        fresh = answer["data"]["task_result"]["videos"][0]["url"]
        assert fresh != url
        async with session.get(fresh) as response:
            assert response.status == 200


async def test_files_differ_per_video_and_follow_the_seed(session: aiohttp.ClientSession) -> None:
    async with Emulator(time_scale=0.001, median_duration=0) as emu:
        api = Api(session, emu)
        ids = [emu.tasks[await api.task_id()].video_ids[0] for _ in range(3)]
        assert len({emu.video_sha256(video_id) for video_id in ids}) == 3


# -- scope -------------------------------------------------------------------------------------


async def test_start_and_aclose_without_a_block(session: aiohttp.ClientSession) -> None:
    emu = Emulator(time_scale=0.001, port=0)
    with pytest.raises(RuntimeError, match="not started"):
        _ = emu.url
    await emu.start()
    try:
        assert (await Api(session, emu).create())[0] == 200
        with pytest.raises(RuntimeError, match="already started"):
            await emu.start()
    finally:
        await emu.aclose()
        await emu.aclose()  # idempotent
    with pytest.raises(aiohttp.ClientConnectionError):
        await Api(session, emu).create()
    assert emu.stats.tasks_created == 1  # ground truth stays readable


async def test_a_taken_port_fails_start() -> None:
    async with Emulator(time_scale=0.001) as first:
        port = int(first.url.rsplit(":", 1)[1])
        second = Emulator(port=port)
        with pytest.raises(OSError, match="address already in use"):
            await second.start()


def emulator_tasks() -> list[str]:
    """The live tasks of emulators: their services, callback workers, a start() host.

    They go by name: the emulator names its own, and anyio names the rest after their function.
    """
    mine = ("kling-emulator", f"{testing.__name__}.")
    return sorted(t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith(mine))


async def test_the_block_owns_everything_the_emulator_runs() -> None:
    async with Emulator(time_scale=0.001) as emu:
        running = emulator_tasks()
        assert "kling-emulator" in running  # the service: a child of the block's task group
        assert "kling-emulator-host" not in running  # no free-standing task behind the block
        assert emu.url
    assert emulator_tasks() == []


async def test_a_failure_inside_the_emulator_ends_its_block(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The service is a child of the block's task group, so its failure is the block's."""

    async def broken(self: CallbackScheduler) -> None:
        raise RuntimeError("the callback scheduler broke")

    async def serve_forever() -> None:
        async with Emulator(time_scale=0.001):
            with anyio.fail_after(30):  # a hang guard: the failure cancels this wait at once
                await anyio.sleep_forever()

    monkeypatch.setattr(CallbackScheduler, "_dispatch", broken)
    with pytest.raises(ExceptionGroup) as raised:
        await serve_forever()
    assert raised.group_contains(RuntimeError, match="the callback scheduler broke")
    assert emulator_tasks() == []


async def test_a_failure_inside_a_started_emulator_comes_out_of_aclose(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def broken(self: CallbackScheduler) -> None:
        raise RuntimeError("the callback scheduler broke")

    monkeypatch.setattr(CallbackScheduler, "_dispatch", broken)
    emu = Emulator(time_scale=0.001)
    await emu.start()
    with pytest.raises(ExceptionGroup) as raised:
        await emu.aclose()
    assert raised.group_contains(RuntimeError, match="the callback scheduler broke")
    assert emulator_tasks() == []


async def test_an_error_in_the_block_comes_out_as_itself(session: aiohttp.ClientSession) -> None:
    apis: list[Api] = []

    async def fail_inside() -> None:
        async with Emulator(time_scale=0.001) as emu:
            apis.append(Api(session, emu))
            raise LookupError("the test's own")

    with pytest.raises(LookupError, match="the test's own") as raised:
        await fail_inside()
    assert type(raised.value) is LookupError  # not wrapped in an ExceptionGroup
    assert emulator_tasks() == []
    with pytest.raises(aiohttp.ClientConnectionError):
        await apis[0].create()


async def test_cancelling_at_any_point_leaves_nothing_behind() -> None:
    problems: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: problems.append(context))
    try:
        with anyio.CancelScope() as before_start:
            before_start.cancel()
            async with Emulator(time_scale=0.001):
                pytest.fail("entered a cancelled scope")
        assert before_start.cancelled_caught
        with anyio.CancelScope() as while_serving:
            async with Emulator(time_scale=0.001, median_duration=3600) as emu:
                async with aiohttp.ClientSession() as session:
                    await Api(session, emu).task_id(callback_url="http://127.0.0.1:9/hook")
                while_serving.cancel()
                await anyio.sleep_forever()
        assert while_serving.cancelled_caught
        assert emulator_tasks() == []
        gc.collect()  # a task destroyed while pending, an unretrieved error: reported here
    finally:
        loop.set_exception_handler(None)
    assert problems == []


async def test_aclose_inside_the_block_stops_it_early(session: aiohttp.ClientSession) -> None:
    async with Emulator(time_scale=0.001) as emu:
        api = Api(session, emu)
        assert (await api.create())[0] == 200
        await emu.aclose()
        assert emulator_tasks() == []
        with pytest.raises(aiohttp.ClientConnectionError):
            await api.create()
    assert emu.stats.tasks_created == 1


async def test_start_and_aclose_may_run_in_different_tasks() -> None:
    """The non-block form (a portal, a fixture split across tasks) hosts the group itself."""
    emu = Emulator(time_scale=0.001)
    async with anyio.create_task_group() as task_group:
        task_group.start_soon(emu.start)
    assert "kling-emulator" in emulator_tasks()
    async with anyio.create_task_group() as task_group:
        task_group.start_soon(emu.aclose)
    assert emulator_tasks() == []


async def test_a_taken_port_fails_the_block_with_the_os_error() -> None:
    async with Emulator(time_scale=0.001) as first:
        port = int(first.url.rsplit(":", 1)[1])
        with pytest.raises(OSError, match="address already in use"):
            async with Emulator(port=port):
                pytest.fail("served on a taken port")
        assert emulator_tasks().count("kling-emulator") == 1  # the first one's service
    assert emulator_tasks() == []


def test_only_loopback_hosts() -> None:
    with pytest.raises(ValueError, match="loopback"):
        Emulator(host="0.0.0.0")  # noqa: S104 - checking that it is refused
    with pytest.raises(ValueError, match="loopback"):
        Emulator(host="example.com")
    Emulator(host="localhost")
    Emulator(host="::1")


def test_many_tasks_are_cheap() -> None:
    """Status is derived, slots are a heap: many tasks need no timers and no scans."""
    store = TaskStore(seed=1, lifecycle=Lifecycle(median_duration=100, duration_sigma=0.5))
    for index in range(20_000):
        store.create(
            now=index * 0.01,
            model_name="kling-v1",
            mode="std",
            duration="5",
            aspect_ratio="16:9",
            external_task_id=f"job-{index}",
            callback_url=None,
            request={"prompt": "p"},
        )
    now = 250.0  # after the last creation
    expected = sum(task.is_active(now) for task in store.tasks.values())
    assert store.active_count(now) == expected
    assert 0 < expected < 20_000
    page = list(store.newest_first(1, 500))
    assert page[0].external_task_id == "job-19999"
    assert len(page) == 500
    by_external = store.by_external_id("job-5")
    assert by_external is not None
    assert by_external.external_task_id == "job-5"


async def test_nothing_outlives_the_scope() -> None:
    """Callbacks planned, a reply stalled, a connection open: closing ends all of it."""
    before = asyncio.all_tasks()
    faults = Faults(query={FaultKind.STALL_AFTER_COMMIT: 1.0}, stall_seconds=60)
    async with aiohttp.ClientSession() as session:
        emu = Emulator(time_scale=1.0, median_duration=3600, faults=faults)
        async with emu:
            api = Api(session, emu)
            await api.task_id(callback_url="http://127.0.0.1:9/hook")
            stalled = asyncio.ensure_future(api.get())
            await eventually(lambda: emu.stats.faults_injected["STALL_AFTER_COMMIT"] == 1)
        status, _ = await stalled  # answered when the emulator closed, not after 60 s
        assert status == 200
    assert asyncio.all_tasks() <= before


async def test_localhost_means_127_0_0_1(session: aiohttp.ClientSession) -> None:
    async with Emulator(host="localhost", time_scale=0.001) as emu:
        assert emu.url.startswith("http://127.0.0.1:")
        assert (await Api(session, emu).create())[0] == 200
