"""The FastAPI integration and push delivery against hostile or odd input: job ids that do not
fit a URL, deeply nested JSON, odd event ids, callbacks that never stop, forged ends during a
back-off, a server quoting the callback URL, bad download options, access logs of other servers.

Each test states a promise of ``docs/fastapi.md`` (or of the project's standards); each was
written failing, from a review, before its fix.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import attrs
import pytest
from fastapi import FastAPI

import kling_async as ka
import kling_async.fastapi as kf
from kling_async.engine.durations import LearnedDurations
from kling_async.engine.jobs import EventHub
from kling_async.engine.pollers import PollerPool
from kling_async.engine.tracker import Tracker
from kling_async.testing import Emulator

from .conftest import SCALE
from .fastapi_helpers import (
    DONE,
    PREFIX,
    SseEvent,
    StartupFailed,
    client_options,
    get_json,
    job_view,
    kling_app,
    recorded,
    refusing_kling,
    sse_items,
    wait_for_status,
    wire_task,
)

pytestmark = pytest.mark.anyio

TOKEN = "review_" + "k" * 30


@asynccontextmanager
async def closing_session() -> AsyncIterator[aiohttp.ClientSession]:
    """A session that opens a connection per request: uvicorn closes one after a 500."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        yield session


async def post_job(session: aiohttp.ClientSession, base: str, payload: Any) -> tuple[int, Any, str]:
    async with session.post(f"{base}/jobs", json=payload) as response:
        text = await response.text()
        try:
            answer: Any = await response.json(content_type=None)
        except ValueError:
            answer = text
        return response.status, answer, response.headers.get("Location", "")


# --- job ids that are not URL-safe ------------------------------------------------------------


async def test_a_job_id_the_links_cannot_carry_is_refused_before_anything_is_sent() -> None:
    async with Emulator(time_scale=SCALE, seed=101) as emu:
        async with kling_app(emu, router_options={"heartbeat": 0.2}) as (base, _):
            async with closing_session() as session:
                answers = {}
                for job_id in ("a/b", "snow\u2603"):
                    status, answer, _ = await post_job(
                        session, base, {"prompt": "x", "external_task_id": job_id}
                    )
                    answers[job_id] = (status, answer)
                await anyio.sleep(0.3)  # the creates have gone out by now, if queued
                # One odd id must not take the listing away from every other user.
                async with session.get(f"{base}/jobs") as response:
                    listing = await response.text()
                    assert response.status == 200, ("GET /jobs", response.status, listing)
                for job_id, (status, answer) in answers.items():
                    assert status in (202, 422), (job_id, status, answer)
                    if status == 422:
                        assert answer["detail"][0]["field"] == "external_task_id"
                        assert emu.stats.created_per_external_id[job_id] == 0, job_id


async def test_the_location_of_a_job_leads_back_to_that_job() -> None:
    async with Emulator(time_scale=SCALE, seed=102) as emu, kling_app(emu) as (base, _):
        async with closing_session() as session:
            status, _, _ = await post_job(session, base, {"prompt": "x", "external_task_id": "q"})
            assert status == 202
            root = base.removesuffix(PREFIX)
            for job_id in ("q?x=1", "q#1"):
                status, answer, location = await post_job(
                    session, base, {"prompt": "y", "external_task_id": job_id}
                )
                if status == 422:  # refusing the id is a fix too
                    assert answer["detail"][0]["field"] == "external_task_id"
                    continue
                assert status == 202, answer
                status, found = await get_json(session, root + location)
                assert (status, found.get("id")) == (200, job_id), (job_id, location, found)


# --- untrusted event ids ----------------------------------------------------------------------


async def test_an_odd_event_id_is_treated_as_foreign_not_a_500() -> None:
    async with Emulator(time_scale=SCALE, seed=103) as emu:
        async with kling_app(emu, router_options={"heartbeat": 0.2}) as (base, _):
            async with closing_session() as session:
                _, job, _ = await post_job(session, base, {"prompt": "x"})
                await wait_for_status(session, base, job["id"], DONE)
                _, listing = await get_json(session, f"{base}/jobs")
                epoch = listing["last_event_id"].partition("-")[0]
                for odd in (f"{epoch}-\u00b2", f"{epoch}-" + "9" * 5000):
                    # A job's stream: as for an id of another process, its states replayed.
                    url = f"{base}/jobs/{job['id']}/events"
                    with anyio.fail_after(10):
                        async with session.get(url, params={"after": odd}) as response:
                            assert response.status == 200, (odd[:12], response.status)
                            items = [item async for item in sse_items(response)]
                    events = [item for item in items if isinstance(item, SseEvent)]
                    assert events and events[-1].json()["status"] == "succeed"
                    # The dashboard's stream: a reset, as for any id it does not know.
                    first: SseEvent | None = None
                    try:
                        with anyio.fail_after(10):
                            async with session.get(
                                f"{base}/events", headers={"Last-Event-ID": odd}
                            ) as response:
                                async for item in sse_items(response):
                                    if isinstance(item, SseEvent):
                                        first = item
                                        break
                    except aiohttp.ClientPayloadError:
                        first = None
                    assert first is not None and first.event == "reset", odd[:12]


# --- the token --------------------------------------------------------------------------------


async def test_the_token_is_masked_in_hypercorns_access_log() -> None:
    async with Emulator(time_scale=SCALE, seed=104) as emu:
        async with kling_app(emu, callback_token=TOKEN):
            path = f"{PREFIX}/callbacks/{TOKEN}"
            # What hypercorn.logging.Logger.access() logs: its format, and AccessLogAtoms
            # (a dict subclass) as the one argument.
            atoms = {
                "h": "203.0.113.9:4242",
                "r": f"POST {path} 1.1",
                "U": path,
                "s": 200,
                "b": "16",
            }
            with recorded("hypercorn.access") as records:
                logging.getLogger("hypercorn.access").info('%(h)s "%(r)s" %(s)s %(b)s', atoms)
            assert len(records) == 1
            line = records[0].getMessage()
            assert "/callbacks/***" in line
            assert TOKEN not in line, line


def _quoting_callback_url(body: Mapping[str, Any]) -> str:
    """Kling's 1201 messages name the parameter at fault, and servers quote values."""
    return f"invalid parameter callback_url: {body.get('callback_url')}"


async def test_a_server_quoting_the_callback_url_does_not_leak_the_token(tmp_path: Path) -> None:
    store = tmp_path / "jobs.sqlite3"
    async with (
        refusing_kling(_quoting_callback_url) as fake,
        Emulator(time_scale=SCALE, seed=105) as emu,
    ):
        with recorded("kling_async", level=logging.DEBUG) as records:
            async with (
                kling_app(emu, base_url=fake, callback_token=TOKEN, store=store) as (base, _),
                aiohttp.ClientSession() as session,
            ):
                _, job, _ = await post_job(session, base, {"prompt": "x"})
                view = await wait_for_status(session, base, job["id"], DONE)
                assert view["status"] == "error"
                assert "callback_url" in view["error"]["message"]  # the server's words, kept
                leaks = {"GET /jobs/{id}": TOKEN in str(view)}
        leaks["log"] = any(TOKEN in record.getMessage() for record in records)
        leaks["store"] = False
        async for path in anyio.Path(tmp_path).iterdir():  # the store and its journal files
            leaks["store"] |= TOKEN.encode() in await path.read_bytes()
        assert not any(leaks.values()), leaks


# --- the download directory -------------------------------------------------------------------


def test_two_jobs_never_share_a_clip_file(tmp_path: Path) -> None:
    """A long id is stored under its hash: never the file name of a job whose id is it."""
    downloads = kf.Downloads(None, tmp_path)  # type: ignore[arg-type]  # names only
    long_id = "L" * 200
    hex_id = hashlib.sha256(long_id.encode()).hexdigest()
    names = {downloads.path_of(job_id) for job_id in (long_id, hex_id, "a/b", "..", "a%2Fb")}
    assert len(names) == 5
    assert all(path.parent == tmp_path for path in names)


# --- the lifespan -----------------------------------------------------------------------------


async def test_a_client_callback_url_passes_through_the_lifespan() -> None:
    async with Emulator(time_scale=SCALE, seed=107) as emu:
        options = client_options(emu, callback_url="https://hooks.example.com/kling/abc")
        app = FastAPI()
        async with kf.lifespan(**options)(app) as state:
            assert isinstance(state["kling_async"], kf.Integration)


# --- the engine: the safety net ---------------------------------------------------------------


async def test_progress_callbacks_never_put_the_safety_net_off_for_ever() -> None:
    safety = 0.6
    poll = attrs.evolve(ka.PollPolicy().scaled(SCALE), safety_interval=safety)
    async with Emulator(
        time_scale=SCALE, seed=108, median_duration=300, duration_sigma=0.05
    ) as emu:
        # No public_url: Kling's callbacks are lost; those that come are the test's own.
        async with (
            kling_app(emu, push=False, callback_token=TOKEN, poll=poll) as (base, _),
            aiohttp.ClientSession() as session,
        ):
            _, job, _ = await post_job(session, base, {"prompt": "x"})
            view = await wait_for_status(session, base, job["id"], {"submitted", "processing"})
            task_id = view["task_id"]
            hook = f"{base}/callbacks/{TOKEN}"
            ended_at: float | None = None  # when the task ended at Kling
            seen_at: float | None = None  # when the job saw it
            with anyio.move_on_after(3.0):
                while seen_at is None:
                    async with session.post(hook, json=wire_task(task_id, "processing")) as r:
                        assert r.status == 200
                    if ended_at is None and emu.tasks[task_id].status_at(emu.now()) in DONE:
                        ended_at = time.monotonic()
                    if (await job_view(session, base, job["id"]))["status"] in DONE:
                        seen_at = time.monotonic()
                    await anyio.sleep(0.05)  # well within safety / 2
            assert ended_at is not None, "the task did not end at the emulator"
            assert seen_at is not None, "the end was never seen: no safety-net poll went out"
            assert seen_at - ended_at <= safety * 1.1 + 0.2


async def test_tasks_from_before_a_restart_are_not_left_to_the_safety_net(
    tmp_path: Path,
) -> None:
    store = tmp_path / "jobs.sqlite3"
    poll = attrs.evolve(ka.PollPolicy().scaled(SCALE), safety_interval=60.0)
    async with Emulator(
        time_scale=SCALE, seed=109, median_duration=1200, duration_sigma=0.05
    ) as emu:
        # The first app asks for no callbacks: its task will never call back.
        async with (
            kling_app(emu, push=False, store=store, poll=poll) as (base, _),
            aiohttp.ClientSession() as session,
        ):
            await post_job(session, base, {"prompt": "old", "external_task_id": "old"})
            await wait_for_status(session, base, "old", {"submitted", "processing"})
        emu.set_lifecycle(median_duration=30)
        # The second one does (a new random token): callbacks come, for the new task only.
        async with (
            kling_app(emu, store=store, poll=poll) as (base, _),
            aiohttp.ClientSession() as session,
        ):
            await post_job(session, base, {"prompt": "new", "external_task_id": "new"})
            await wait_for_status(session, base, "new", DONE)
            assert emu.stats.requests_per_route["callback_sent"] >= 1
            assert (await job_view(session, base, "old"))["status"] not in DONE
            # The old task ends ~1.2 s after its create; its polls must go on as before.
            try:
                view = await wait_for_status(session, base, "old", DONE, within=4.0)
            except TimeoutError:
                view = await job_view(session, base, "old")
            assert view["status"] == "succeed", f"not seen within 4 s of its end: {view['status']}"


# --- the downloads' task group ----------------------------------------------------------------


async def test_a_bad_download_option_is_refused_at_startup_or_costs_only_the_clip(
    tmp_path: Path,
) -> None:
    async with Emulator(time_scale=SCALE, seed=110, median_duration=30) as emu:
        try:
            async with (
                kling_app(emu, download_dir=tmp_path, download_options={"max_size": 10}) as (
                    base,
                    _,
                ),
                aiohttp.ClientSession() as session,
            ):
                _, job, _ = await post_job(session, base, {"prompt": "first"})
                await wait_for_status(session, base, job["id"], DONE)
                await anyio.sleep(0.3)  # its download has been tried by now
                status, answer, _ = await post_job(session, base, {"prompt": "second"})
                assert status == 202, ("the app no longer takes jobs", status, answer)
        except (ka.ValidationError, StartupFailed):
            pass  # refused before serving, naming the option: a fix too


# --- the engine: hints and a task the index does not show yet ---------------------------------


class LaggingTasks:
    """A task resource whose GET says "not found" for ``lag`` seconds (a fresh task the index
    does not show yet: what ``_MISSES_ALLOWED`` is there for), then "processing"."""

    def __init__(self, lag: float) -> None:
        self.visible_at = time.monotonic() + lag

    async def get(self, task_id: str) -> ka.Task:
        if time.monotonic() < self.visible_at:
            raise ka.TaskNotFoundError("Task not found", code=1201, http_status=400)
        return ka.Task(task_id=task_id, status=ka.TaskStatus.PROCESSING)


async def test_forged_ends_do_not_use_up_the_not_found_allowance() -> None:
    policy = ka.PollPolicy(
        min_interval=0.05,
        max_interval=1.0,
        initial_estimate=30.0,
        jitter=0.0,
        safety_interval=5.0,
    )
    tracker = Tracker(EventHub(), ka.AdaptiveLimit(None), LearnedDurations(policy))
    # Unforged, the misses come at 0, 0.1 and 0.3 s: the task is seen at 0.3 s.
    pool = PollerPool(LaggingTasks(lag=0.2), policy, tracker)  # type: ignore[arg-type]
    job = tracker.track("t-1")
    forged = ka.Task(task_id="t-1", status=ka.TaskStatus.SUCCEEDED)
    async with anyio.create_task_group() as group:
        group.start_soon(pool.run, 1)
        with anyio.move_on_after(0.6):
            while not job.done:
                tracker.observe(forged, confirmed=False)
                await anyio.sleep(0.01)
        group.cancel_scope.cancel()
    assert job.status is ka.JobStatus.PROCESSING, (job.status, job.error)


# --- deeply nested JSON -----------------------------------------------------------------------


async def test_deeply_nested_json_is_422_and_breaks_nothing(tmp_path: Path) -> None:
    deep = "[" * 600 + "]" * 600
    async with Emulator(time_scale=SCALE, seed=111, median_duration=30) as emu:
        async with (
            kling_app(emu, store=tmp_path / "jobs.sqlite3") as (base, _),
            closing_session() as session,
        ):
            body = '{"prompt": "x", "external_task_id": "deep", "extra": {"k": ' + deep + "}}"
            headers = {"Content-Type": "application/json"}
            async with session.post(f"{base}/jobs", data=body, headers=headers) as response:
                assert response.status in (202, 422), ("POST", response.status)
            async with session.get(f"{base}/jobs") as response:
                assert response.status == 200, ("GET /jobs", response.status)
            _, job, _ = await post_job(session, base, {"prompt": "after"})
            done = await wait_for_status(session, base, job["id"], DONE)
            assert done["status"] == "succeed", done["error"]
            async with session.post(f"{base}/jobs", data="[" * 100_000, headers=headers) as r:
                assert r.status == 422, ("a body nested past the parser's limit", r.status)
