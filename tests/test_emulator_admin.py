"""The emulator's control endpoints (``/_emulator``), which the crash tests drive from outside
the emulator's process, and the runtime knobs behind them."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import pytest

import kling_async as ka
from kling_async.testing import Emulator, FaultKind
from kling_async.testing._cli import build_parser, emulator_from_args

from .conftest import SCALE, client_for

pytestmark = pytest.mark.anyio


async def admin(
    session: aiohttp.ClientSession, emu: Emulator, method: str, path: str, body: Any = None
) -> tuple[int, Any]:
    async with session.request(method, f"{emu.url}/_emulator{path}", json=body) as response:
        return response.status, await response.json()


async def test_stats_and_tasks_give_the_ground_truth() -> None:
    async with (
        Emulator(time_scale=SCALE, admin=True) as emu,
        client_for(emu) as kling,
        aiohttp.ClientSession() as session,
    ):
        task = await kling.text2video.create(
            ka.Text2VideoRequest(prompt="p", external_task_id="e-1")
        )
        await kling.text2video.wait(task.task_id, timeout=5)
        status, stats = await admin(session, emu, "GET", "/stats")
        assert status == 200
        assert stats["created_per_external_id"] == {"e-1": 1}
        assert stats["tasks_created"] == 1
        status, tasks = await admin(session, emu, "GET", "/tasks")
        [only] = tasks
        assert only["task_id"] == task.task_id
        assert only["status"] == "succeed"
        [video] = only["videos"]
        assert video["sha256"] == emu.video_sha256(video["id"])
        # Control requests are not API traffic: they are never counted.
        before = dict(emu.stats.requests_per_route)
        await admin(session, emu, "GET", "/stats")
        assert dict(emu.stats.requests_per_route) == before


async def test_faults_and_settings_can_be_changed_at_runtime() -> None:
    async with (
        Emulator(time_scale=SCALE, admin=True) as emu,
        client_for(emu) as kling,
        aiohttp.ClientSession() as session,
    ):
        status, _ = await admin(
            session, emu, "POST", "/faults", {"create": {"HTML_502": 1.0}, "stall_seconds": 1}
        )
        assert status == 200
        headers = {"Authorization": f"Bearer {emu.api_key}"}
        body = {"prompt": "p"}
        async with session.post(f"{emu.url}/v1/videos/text2video", json=body, headers=headers) as r:
            assert r.status == 502
        assert emu.stats.faults_injected[FaultKind.HTML_502.name] == 1
        assert (await admin(session, emu, "POST", "/faults", None))[0] == 200
        status, settings = await admin(
            session,
            emu,
            "POST",
            "/settings",
            {"account_error": 1102, "failure_rate": 1.0, "median_duration": 5, "url_ttl": 30},
        )
        assert status == 200
        assert settings["account_error"] == 1102
        with pytest.raises(ka.AccountError):
            await kling.text2video.create(ka.Text2VideoRequest(prompt="p"))
        await admin(session, emu, "POST", "/settings", {"account_error": None})
        task = await kling.text2video.create(ka.Text2VideoRequest(prompt="p"))
        with pytest.raises(ka.TaskFailedError):
            await kling.text2video.wait(task.task_id, timeout=5)
        _, current = await admin(session, emu, "GET", "/settings")
        assert current == settings | {"account_error": None}


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/faults", {"create": {"NOPE": 1}}, "unknown fault kind 'NOPE'"),
        ("/faults", {"download": {"TRUNCATED_JSON": 1}}, "does not apply to download"),
        ("/faults", {"create": {"HTML_502": 0.7, "DROP_AFTER_COMMIT": 0.7}}, "add up to"),
        ("/faults", [1], "must be a JSON object"),
        ("/settings", {"failure_rate": 2}, "failure_rate must be in [0, 1]"),
        ("/settings", {"account_error": 42}, "code must be one of"),
        ("/settings", {"colour": "blue"}, "unknown setting 'colour'"),
        ("/settings", {"download_rate": -1}, "download_rate must be"),
    ],
)
async def test_bad_control_requests_are_refused_with_a_reason(
    path: str, body: Any, message: str
) -> None:
    async with Emulator(time_scale=SCALE, admin=True) as emu, aiohttp.ClientSession() as session:
        status, answer = await admin(session, emu, "POST", path, body)
        assert status == 400
        assert message in answer["error"]


async def test_control_endpoints_are_off_unless_asked_for(emu: Emulator) -> None:
    async with aiohttp.ClientSession() as session:
        status, answer = await admin(session, emu, "GET", "/stats")
        assert status == 404
        assert answer["code"] == 1203


async def test_download_rate_trickles_files_and_url_ttl_expires_old_urls() -> None:
    async with Emulator(time_scale=SCALE) as emu, client_for(emu) as kling:
        task = await kling.text2video.create(ka.Text2VideoRequest(prompt="p"))
        task = await kling.text2video.wait(task.task_id, timeout=5)
        assert task.video is not None
        url = task.video.url
        emu.set_download_rate(20_000)
        async with aiohttp.ClientSession() as session:
            started = time.monotonic()
            async with session.get(url) as response:
                body = await response.read()
            took = time.monotonic() - started
            assert body == emu.video_bytes(task.video.id)
            assert took >= len(body) / 20_000 - 0.05  # the last twentieth is not waited for
            emu.set_download_rate(None)
            emu.set_url_ttl(100)
            async with session.get(url) as response:
                assert response.status == 403
            fresh = await kling.text2video.get(task.task_id)
            assert fresh.video is not None
            async with session.get(fresh.video.url) as response:
                assert response.status == 200


def test_the_command_line_turns_the_admin_endpoints_on() -> None:
    args = build_parser().parse_args(["--admin", "--download-rate", "1000"])
    emulator = emulator_from_args(args)
    assert emulator.settings_snapshot()["download_rate"] == 1000
    assert emulator._admin is True
