"""Callbacks: the bare task object POSTed to a loopback receiver, in each delivery mode."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import anyio
import pytest
from aiohttp import web

from kling_async.testing import Emulator
from tests.test_emulator import TASK_KEYS, Api, emulator_tasks, eventually, sleep_until

pytestmark = pytest.mark.anyio

TERMINAL = {"succeed", "failed"}


class Receiver:
    """A webhook endpoint on 127.0.0.1 that records what it was sent."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.status = 200
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        assert request.query["token"] == "t0k"
        self.bodies.append(await request.json())
        return web.Response(status=self.status)

    def by_task(self) -> dict[str, list[str]]:
        statuses: dict[str, list[str]] = defaultdict(list)
        for body in self.bodies:
            statuses[body["task_id"]].append(body["task_status"])
        return statuses


@asynccontextmanager
async def receiver() -> AsyncIterator[Receiver]:
    recorder = Receiver()
    app = web.Application()
    app.router.add_post("/hook", recorder.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        recorder.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook?token=t0k"
        yield recorder
    finally:
        await runner.cleanup()


async def settle(emu: Emulator, hook: Receiver, slack: float) -> None:
    """Wait until every planned callback is due (``slack`` x duration after the last end)."""
    last = max(
        task.completes_at + slack * (task.completes_at - task.created_at)
        for task in emu.tasks.values()
    )
    await sleep_until(emu, last)
    await eventually(lambda: len(hook.bodies) >= emu.stats.requests_per_route["callback_sent"])
    await anyio.sleep(0.02)
    assert len(hook.bodies) == emu.stats.requests_per_route["callback_sent"]


async def test_every_status_change_in_order() -> None:
    async with (
        receiver() as hook,
        Emulator(time_scale=0.001, median_duration=50, queue_fraction=0.4, failure_rate=0.3) as emu,
        aiohttp.ClientSession() as session,
    ):
        api = Api(session, emu)
        ids = [await api.task_id(callback_url=hook.url) for _ in range(6)]
        await api.task_id()  # no callback_url: never called
        await settle(emu, hook, 0.0)
        statuses = hook.by_task()
        assert set(statuses) == set(ids)
        for task_id in ids:
            outcome = emu.tasks[task_id].outcome
            assert statuses[task_id] == ["submitted", "processing", outcome]
        assert emu.stats.requests_per_route["callback_sent"] == 18
        assert emu.stats.callbacks_failed == 0
        for body in hook.bodies:
            assert set(body) == TASK_KEYS  # the bare task object, no envelope
        finals = [body for body in hook.bodies if body["task_status"] == "succeed"]
        assert finals
        for body in finals:
            (video,) = body["task_result"]["videos"]
            assert video["url"].startswith(emu.files_url + "/files/")
        for task_id in ids:
            stamps = [body["updated_at"] for body in hook.bodies if body["task_id"] == task_id]
            assert stamps == sorted(stamps)
            assert len(set(stamps)) == 3


async def test_terminal_only() -> None:
    async with (
        receiver() as hook,
        Emulator(time_scale=0.001, median_duration=30, callbacks="terminal") as emu,
        aiohttp.ClientSession() as session,
    ):
        api = Api(session, emu)
        ids = [await api.task_id(callback_url=hook.url) for _ in range(4)]
        await settle(emu, hook, 0.0)
        assert hook.by_task() == {task_id: ["succeed"] for task_id in ids}


async def test_chaotic_duplicates_and_reorders() -> None:
    async with (
        receiver() as hook,
        Emulator(time_scale=0.001, median_duration=40, callbacks="chaotic", seed=11) as emu,
        aiohttp.ClientSession() as session,
    ):
        api = Api(session, emu)
        ids = [await api.task_id(callback_url=hook.url) for _ in range(12)]
        await settle(emu, hook, 0.6)
        statuses = hook.by_task()
        assert set(statuses) == set(ids)
        duplicated = out_of_order = 0
        for task_id in ids:
            seen = statuses[task_id]
            assert set(seen) == {"submitted", "processing", "succeed"}
            duplicated += len(seen) > len(set(seen))
            first_terminal = seen.index("succeed")
            out_of_order += any(status not in TERMINAL for status in seen[first_terminal:])
        assert duplicated > 0
        assert out_of_order > 0


async def test_failed_deliveries_are_counted_and_ignored() -> None:
    async with (
        receiver() as hook,
        Emulator(time_scale=0.001, median_duration=20, callbacks="terminal") as emu,
        aiohttp.ClientSession() as session,
    ):
        hook.status = 500
        api = Api(session, emu)
        await api.task_id(callback_url=hook.url)
        await api.task_id(callback_url="http://127.0.0.1:9/closed")  # discard port: refused
        await sleep_until(emu, max(task.completes_at for task in emu.tasks.values()))
        await eventually(lambda: emu.stats.callbacks_failed >= 2)
        assert emu.stats.requests_per_route["callback_sent"] == 2
        assert len(hook.bodies) == 1


async def test_only_loopback_targets_are_called() -> None:
    async with (
        Emulator(time_scale=0.001, median_duration=0) as emu,
        aiohttp.ClientSession() as session,
    ):
        api = Api(session, emu)
        for url in ("http://192.0.2.1/hook", "https://example.com/hook", "ftp://127.0.0.1/x"):
            await api.task_id(callback_url=url)
        await anyio.sleep(0.05)
        assert emu.stats.callbacks_skipped == 3
        assert emu.stats.requests_per_route["callback_sent"] == 0


async def test_pending_callbacks_do_not_outlive_the_emulator() -> None:
    async with receiver() as hook:
        async with (
            Emulator(time_scale=1.0, median_duration=3600) as emu,
            aiohttp.ClientSession() as session,
        ):
            await Api(session, emu).task_id(callback_url=hook.url)
            await eventually(lambda: len(hook.bodies) == 1)  # "submitted", sent at once
            assert "kling-emulator-callbacks" in emulator_tasks()
        # Closed with two callbacks still planned an hour away: nothing is left that could
        # send them (the scheduler and its workers have ended with the emulator).
        assert emulator_tasks() == []
        assert [body["task_status"] for body in hook.bodies] == ["submitted"]
        assert emu.stats.requests_per_route["callback_sent"] == 1
