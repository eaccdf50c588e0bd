"""``kf.router()`` over real HTTP: a uvicorn server on 127.0.0.1, the emulator behind it.

Every test drives the routes as a web client would (aiohttp, raw Server-Sent Events) and
judges by what the emulator saw (tasks created, per external id) and what the routes answer.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import aiohttp
import anyio
import attrs
import pytest
from fastapi import Depends, FastAPI, Header, HTTPException, Request

import kling_async as ka
import kling_async.fastapi as kf
from kling_async.testing import Emulator

from .conftest import SCALE
from .fastapi_helpers import (
    DONE,
    PREFIX,
    SseComment,
    SseEvent,
    SseItem,
    StartupFailed,
    client_options,
    event_number,
    events_only,
    eventually,
    get_json,
    job_view,
    kling_app,
    recorded,
    serving,
    sse_items,
    wait_for_status,
)

pytestmark = pytest.mark.anyio

#: The order a job's statuses come in (``processing`` may be skipped: a poll may miss it).
ORDER = ["queued", "submitting", "submitted", "processing", "succeed"]
LONG = 400.0  # emulated seconds: 0.4 s of real time at SCALE


async def post(session: aiohttp.ClientSession, url: str, payload: Any) -> tuple[int, Any, str]:
    """POST JSON; (status, JSON answer, Location)."""
    async with session.post(url, json=payload) as response:
        return (
            response.status,
            await response.json(content_type=None),
            response.headers.get("Location", ""),
        )


async def read_stream(
    session: aiohttp.ClientSession,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    within: float = 20.0,
) -> tuple[int, list[SseItem]]:
    """A whole stream, until the server closes it."""
    items: list[SseItem] = []
    with anyio.fail_after(within):
        async with session.get(url, headers=headers) as response:
            if response.status == 200:
                assert response.content_type == "text/event-stream"
                items = [item async for item in sse_items(response)]
            return response.status, items


def statuses_of(events: list[SseEvent]) -> list[str]:
    return [event.json()["status"] for event in events]


def check_ids(events: list[SseEvent]) -> None:
    """Every event has an ``<epoch>-<n>`` id, one epoch, ``n`` strictly increasing."""
    numbers = [event_number(event.id) for event in events]
    assert len({epoch for epoch, _ in numbers}) == 1, numbers
    assert all(a[1] < b[1] for a, b in itertools.pairwise(numbers)), numbers


# --- submitting -------------------------------------------------------------------------------


async def test_post_one_request_and_a_list(session: aiohttp.ClientSession) -> None:
    async with Emulator(time_scale=SCALE, seed=11) as emu, kling_app(emu) as (base, _):
        status, one, location = await post(session, f"{base}/jobs", {"prompt": "a cat"})
        assert status == 202, one
        assert one["status"] in ("queued", "submitting", "submitted")
        assert location == one["links"]["self"] == f"{PREFIX}/jobs/{one['id']}"
        assert one["links"]["events"] == f"{PREFIX}/jobs/{one['id']}/events"
        assert one["request"]["prompt"] == "a cat"

        batch = [{"prompt": "a dog", "external_task_id": "dog-1"}, {"prompt": "a cow"}]
        status, many, location = await post(session, f"{base}/jobs", batch)
        assert status == 202, many
        assert location == f"{PREFIX}/jobs"
        ids = [job["id"] for job in many["jobs"]]
        assert ids[0] == "dog-1"
        assert [job["request"]["prompt"] for job in many["jobs"]] == ["a dog", "a cow"]

        for job_id in [one["id"], *ids]:
            view = await wait_for_status(session, base, job_id, DONE)
            assert view["status"] == "succeed", view
            assert view["task_id"] in emu.tasks
        # One task per job, created under the job's id.
        assert emu.stats.created_per_external_id == dict.fromkeys([one["id"], *ids], 1)


@pytest.mark.parametrize(
    ("payload", "loc", "field"),
    [
        ({"prompt": ""}, ["body", "prompt"], "prompt"),
        ({"prompt": 5}, ["body", "prompt"], "prompt"),
        ({}, ["body", "prompt"], "prompt"),
        ({"prompt": "x", "duration": "7"}, ["body", "duration"], "duration"),
        ({"prompt": "x", "cfg_scale": 3}, ["body", "cfg_scale"], "cfg_scale"),
        ({"prompt": "x", "bogus": 1}, ["body", "bogus"], "bogus"),
        (
            {"prompt": "x", "camera_control": {"type": "sideways"}},
            ["body", "camera_control", "type"],
            "camera_control.type",
        ),
        ("just a string", ["body"], "request"),  # the whole body is the bad value
        # Whoever calls the app must not point Kling's callbacks elsewhere.
        (
            {"prompt": "x", "callback_url": "https://attacker.example/hook"},
            ["body", "callback_url"],
            "callback_url",
        ),
        ([{"prompt": "x"}, 7], ["body", 1], "request"),
        # In a list, the index of the bad one; the good one before it is not queued either.
        ([{"prompt": "fine"}, {"prompt": "x", "mode": "turbo"}], ["body", 1, "mode"], "mode"),
        (
            [
                {"prompt": "a", "external_task_id": "twin"},
                {"prompt": "b", "external_task_id": "twin"},
            ],
            ["body", 1, "external_task_id"],
            "external_task_id",
        ),
    ],
)
async def test_bad_input_is_422_naming_the_field_before_any_network_call(
    session: aiohttp.ClientSession, payload: Any, loc: list[Any], field: str
) -> None:
    async with Emulator(time_scale=SCALE, seed=12) as emu, kling_app(emu) as (base, _):
        status, answer, _ = await post(session, f"{base}/jobs", payload)
        assert status == 422, answer
        [detail] = answer["detail"]
        assert detail["loc"] == loc
        assert detail["field"] == field
        assert detail["type"] == "value_error"
        assert field in detail["msg"]
        assert detail["rule"] and detail["rule"] in detail["msg"]
        assert emu.stats.requests_per_route["create"] == 0
        assert (await get_json(session, f"{base}/jobs"))[1]["jobs"] == []


async def test_an_empty_list_and_a_body_that_is_not_json_are_422(
    session: aiohttp.ClientSession,
) -> None:
    async with Emulator(time_scale=SCALE, seed=13) as emu, kling_app(emu) as (base, _):
        status, answer, _ = await post(session, f"{base}/jobs", [])
        assert status == 422
        assert answer["detail"][0]["loc"] == ["body"]
        assert "empty" in answer["detail"][0]["msg"]
        for body in (b"{not json", b"", b"\xff\xfe", b'{"prompt": "x"'):
            async with session.post(
                f"{base}/jobs", data=body, headers={"Content-Type": "application/json"}
            ) as response:
                assert response.status == 422, body
                answer = await response.json()
                assert answer["detail"][0]["msg"] == "the body is not JSON"
        assert emu.stats.requests_per_route["create"] == 0


async def test_a_resubmitted_request_is_the_same_job_and_another_request_is_409(
    session: aiohttp.ClientSession,
) -> None:
    async with Emulator(time_scale=SCALE, seed=14) as emu, kling_app(emu) as (base, _):
        request = {"prompt": "a dog", "external_task_id": "dog-1"}
        status, first, _ = await post(session, f"{base}/jobs", request)
        assert status == 202
        again_status, again, location = await post(session, f"{base}/jobs", request)
        assert again_status == 202
        assert again["id"] == first["id"] == "dog-1"
        assert location == f"{PREFIX}/jobs/dog-1"
        done = await wait_for_status(session, base, "dog-1", DONE)
        # Once it ended with its task, the same POST still answers that job, with its task.
        status, later, _ = await post(session, f"{base}/jobs", request)
        assert status == 202
        assert later["task_id"] == done["task_id"]
        assert later["status"] == "succeed"
        # The same id with another request: 409, alone or in a list (nothing of it queued).
        status, answer, _ = await post(session, f"{base}/jobs", {**request, "prompt": "a doge"})
        assert status == 409, answer
        assert "dog-1" in answer["detail"]
        status, answer, _ = await post(
            session,
            f"{base}/jobs",
            [{"prompt": "innocent", "external_task_id": "cat-1"}, {**request, "mode": "pro"}],
        )
        assert status == 409, answer
        assert (await get_json(session, f"{base}/jobs/cat-1"))[0] == 404
        assert emu.stats.created_per_external_id == {"dog-1": 1}


async def test_an_id_that_is_another_jobs_task_id_is_refused_before_anything_is_queued(
    session: aiohttp.ClientSession,
) -> None:
    """A request whose ``external_task_id`` is the task id of another job names that job:
    it is refused, and the good requests of its list are not queued either."""
    async with Emulator(time_scale=SCALE, seed=15) as emu, kling_app(emu) as (base, _):
        _, first, _ = await post(session, f"{base}/jobs", {"prompt": "first"})
        done = await wait_for_status(session, base, first["id"], DONE)
        task_id = done["task_id"]
        status, answer, _ = await post(
            session,
            f"{base}/jobs",
            [
                {"prompt": "fresh", "external_task_id": "fresh-1"},
                {"prompt": "x", "external_task_id": task_id},
            ],
        )
        assert status == 409, answer
        assert (await get_json(session, f"{base}/jobs/fresh-1"))[0] == 404
        status, answer, _ = await post(
            session, f"{base}/jobs", {"prompt": "x", "external_task_id": task_id}
        )
        assert status == 409, answer
        assert emu.stats.created_per_external_id == {first["id"]: 1}


# --- looking up -------------------------------------------------------------------------------


async def test_get_a_job_by_its_id_or_its_task_id_and_404(session: aiohttp.ClientSession) -> None:
    async with Emulator(time_scale=SCALE, seed=16) as emu, kling_app(emu) as (base, _):
        await post(session, f"{base}/jobs", {"prompt": "x", "external_task_id": "j1"})
        done = await wait_for_status(session, base, "j1", DONE)
        by_task = await job_view(session, base, done["task_id"])
        assert by_task["id"] == "j1"
        assert by_task == done
        assert by_task["task"]["task_id"] == done["task_id"]
        for missing in ("nope", "j1x", "%20"):
            status, answer = await get_json(session, f"{base}/jobs/{missing}")
            assert status == 404, (missing, answer)
            assert "no job" in answer["detail"]
        assert emu.stats.created_per_external_id == {"j1": 1}


async def test_list_by_status_and_group_in_pages(session: aiohttp.ClientSession) -> None:
    async with Emulator(time_scale=SCALE, seed=17) as emu, kling_app(emu) as (base, _):
        _, many, _ = await post(session, f"{base}/jobs", [{"prompt": f"p{i}"} for i in range(5)])
        ids = [job["id"] for job in many["jobs"]]
        for job_id in ids:
            await wait_for_status(session, base, job_id, DONE)

        async def listed(query: str) -> list[str]:
            status, answer = await get_json(session, f"{base}/jobs?{query}")
            assert status == 200, (query, answer)
            return [job["id"] for job in answer["jobs"]]

        assert await listed("") == ids  # oldest first
        assert await listed("status=succeed") == ids
        assert await listed("status=done") == ids
        assert await listed("status=active") == []
        assert await listed("status=queued,failed") == []
        assert await listed("status=failed&status=succeed") == ids
        assert await listed("status=processing,%20succeed") == ids

        pages: list[list[str]] = []
        after: str | None = None
        while True:
            query = "limit=2" + (f"&after={after}" if after else "")
            status, answer = await get_json(session, f"{base}/jobs?{query}")
            assert status == 200
            pages.append([job["id"] for job in answer["jobs"]])
            _, number = event_number(answer["last_event_id"])
            assert number >= 5 * 4  # queued, submitting, submitted, succeed at least
            after = answer["next"]
            if after is None:
                break
            assert after == pages[-1][-1]
        assert pages == [ids[0:2], ids[2:4], ids[4:]]

        for query in ("status=bogus", "status=succeed,nope", "limit=0", "after=nobody"):
            status, answer = await get_json(session, f"{base}/jobs?{query}")
            assert status == 422, (query, answer)
        status, answer = await get_json(session, f"{base}/jobs?status=bogus")
        [detail] = answer["detail"]
        assert detail["loc"] == ["query", "status"]
        assert "'bogus'" in detail["msg"] and "active" in detail["msg"]


async def test_paging_a_status_goes_on_when_the_last_job_seen_changes_status(
    session: aiohttp.ClientSession,
) -> None:
    """``after`` is a place in the list, not a member of the filtered page: paging the
    active jobs must not fail because the job that ended the previous page has ended."""
    async with Emulator(time_scale=SCALE, seed=18, median_duration=300) as emu:
        async with kling_app(emu) as (base, _):
            _, quick, _ = await post(session, f"{base}/jobs", {"prompt": "quick"})
            await wait_for_status(session, base, quick["id"], {"submitted", "processing", *DONE})
            emu.set_lifecycle(median_duration=1_000_000)  # the next ones outlive the test
            _, slow, _ = await post(session, f"{base}/jobs", [{"prompt": "s1"}, {"prompt": "s2"}])
            slow_ids = [job["id"] for job in slow["jobs"]]
            status, page = await get_json(session, f"{base}/jobs?status=active&limit=1")
            assert status == 200
            assert [job["id"] for job in page["jobs"]] == [quick["id"]]
            assert page["next"] == quick["id"]
            await wait_for_status(session, base, quick["id"], DONE)
            status, page = await get_json(
                session, f"{base}/jobs?status=active&limit=1&after={quick['id']}"
            )
            assert status == 200, page
            assert [job["id"] for job in page["jobs"]] == slow_ids[:1]
            status, page = await get_json(
                session, f"{base}/jobs?status=active&limit=1&after={page['next']}"
            )
            assert [job["id"] for job in page["jobs"]] == slow_ids[1:]
            assert page["next"] is None


# --- Server-Sent Events -----------------------------------------------------------------------


async def test_a_jobs_stream_goes_from_queued_to_its_end_and_closes(
    session: aiohttp.ClientSession,
) -> None:
    async with Emulator(time_scale=SCALE, seed=21) as emu, kling_app(emu) as (base, _):
        _, job, _ = await post(session, f"{base}/jobs", {"prompt": "x"})
        status, items = await read_stream(
            session, base + job["links"]["events"].removeprefix(PREFIX)
        )
        assert status == 200
        events = events_only(items)
        statuses = statuses_of(events)
        assert statuses[0] == "queued"
        assert statuses[-1] == "succeed"
        assert statuses == sorted(set(statuses), key=ORDER.index), statuses  # no repeats
        assert {"submitting", "submitted"} <= set(statuses)
        check_ids(events)
        views = [event.json() for event in events]
        assert all(view["id"] == job["id"] for view in views)
        assert views[0]["task_id"] is None and views[0]["task"] is None
        assert views[-1]["task"]["status"] == "succeed"
        assert views[-1]["task_id"] in emu.tasks
        assert views[-1]["ended_at"] is not None
        assert all(view["ended_at"] is None for view in views[:-1])
        assert all(event.event is None for event in events)  # plain "message" events
        assert all(view["links"] == job["links"] for view in views)  # as GET and POST give


async def test_a_reconnect_with_last_event_id_loses_nothing_and_repeats_nothing(
    session: aiohttp.ClientSession,
) -> None:
    async with Emulator(time_scale=SCALE, seed=22, median_duration=LONG) as emu:
        async with kling_app(emu) as (base, _):
            _, job, _ = await post(session, f"{base}/jobs", {"prompt": "slow"})
            url = f"{base}/jobs/{job['id']}/events"
            first: list[SseEvent] = []
            with anyio.fail_after(10):
                async with session.get(url) as response:
                    async for item in sse_items(response):
                        if isinstance(item, SseEvent):
                            first.append(item)
                        if len(first) == 2:
                            break  # the connection drops here
            assert statuses_of(first) == ["queued", "submitting"]
            # It is still running: the rest is yet to happen.
            assert (await job_view(session, base, job["id"]))["status"] not in DONE
            status, items = await read_stream(
                session, url, headers={"Last-Event-ID": first[-1].id or ""}
            )
            assert status == 200
            second = events_only(items)
            assert second, "nothing after the reconnect"
            assert second[-1].json()["status"] == "succeed"
            # Replayed whole afterwards, the job's stream is exactly the two parts.
            status, items = await read_stream(session, url)
            whole = events_only(items)
            assert [e.id for e in first + second] == [e.id for e in whole]
            assert [e.data for e in first + second] == [e.data for e in whole]
            check_ids(whole)
            # ?after= is the same cursor (for clients that cannot set headers).
            status, items = await read_stream(session, f"{url}?after={first[-1].id}")
            assert [e.id for e in events_only(items)] == [e.id for e in second]


async def test_a_reconnect_after_the_end_gets_204(session: aiohttp.ClientSession) -> None:
    async with Emulator(time_scale=SCALE, seed=23) as emu, kling_app(emu) as (base, _):
        _, job, _ = await post(session, f"{base}/jobs", {"prompt": "x"})
        url = f"{base}/jobs/{job['id']}/events"
        status, items = await read_stream(session, url)
        last = events_only(items)[-1]
        assert last.json()["status"] == "succeed"
        status, items = await read_stream(session, url, headers={"Last-Event-ID": last.id or ""})
        assert (status, items) == (204, [])
        status, items = await read_stream(session, f"{url}?after={last.id}")
        assert (status, items) == (204, [])
        # One event short of the end: the end is sent again, then the stream closes.
        before = events_only((await read_stream(session, url))[1])[-2]
        status, items = await read_stream(session, url, headers={"Last-Event-ID": before.id or ""})
        assert status == 200
        assert [e.id for e in events_only(items)] == [last.id]
        assert (await get_json(session, f"{base}/jobs/nobody/events"))[0] == 404


async def test_an_idle_stream_sends_heartbeat_comments(session: aiohttp.ClientSession) -> None:
    async with Emulator(time_scale=SCALE, seed=24, median_duration=1_000_000) as emu:
        async with kling_app(emu, router_options={"heartbeat": 0.2}) as (base, _):
            _, job, _ = await post(session, f"{base}/jobs", {"prompt": "forever"})
            await wait_for_status(session, base, job["id"], {"submitted", "processing"})
            items: list[SseItem] = []
            with anyio.fail_after(10):
                async with session.get(f"{base}/jobs/{job['id']}/events") as response:
                    async for item in sse_items(response):
                        items.append(item)
                        if sum(isinstance(i, SseComment) for i in items) == 3:
                            break
            comments = [item for item in items if isinstance(item, SseComment)]
            assert {comment.text for comment in comments} == {"heartbeat"}
            # The job's events came first (replayed), then only heartbeats.
            kinds = [isinstance(item, SseComment) for item in items]
            assert kinds == sorted(kinds)
            assert statuses_of(events_only(items))[-1] in ("submitted", "processing")


async def collect_events(
    response: aiohttp.ClientResponse, *, until: Any, within: float = 20.0
) -> list[SseItem]:
    """Items of a stream until ``until(items)`` is true."""
    items: list[SseItem] = []
    with anyio.fail_after(within):
        async for item in sse_items(response):
            items.append(item)
            if until(items):
                break
    return items


async def test_all_events_carry_every_job_and_resume_after_an_id(
    session: aiohttp.ClientSession,
) -> None:
    async with Emulator(time_scale=SCALE, seed=25) as emu:
        async with kling_app(emu, router_options={"heartbeat": 0.2}) as (base, _):
            # The dashboard's way: the list first, then its events from there on.
            _, listing = await get_json(session, f"{base}/jobs")
            start = listing["last_event_id"]

            def both_ended(items: list[SseItem]) -> bool:
                ended = {e.json()["id"] for e in events_only(items) if e.json()["status"] in DONE}
                return len(ended) == 2

            async with session.get(f"{base}/events?after={start}") as response:
                assert response.status == 200
                _, many, _ = await post(session, f"{base}/jobs", [{"prompt": "a"}, {"prompt": "b"}])
                ids = {job["id"] for job in many["jobs"]}
                events = events_only(await collect_events(response, until=both_ended))
            check_ids(events)
            assert {event.json()["id"] for event in events} == ids
            for job_id in ids:
                statuses = [e.json()["status"] for e in events if e.json()["id"] == job_id]
                assert statuses[0] == "queued" and statuses[-1] == "succeed", statuses
            # Resuming from the middle gives exactly the rest: drained when the first
            # heartbeat comes (a backlog is sent before any heartbeat).
            middle = len(events) // 2
            async with session.get(f"{base}/events?after={events[middle].id}") as response:
                rest = await collect_events(
                    response, until=lambda items: isinstance(items[-1], SseComment)
                )
            assert [e.id for e in events_only(rest)] == [e.id for e in events[middle + 1 :]]
            assert [e.data for e in events_only(rest)] == [e.data for e in events[middle + 1 :]]
            # The header works the same way.
            async with session.get(
                f"{base}/events", headers={"Last-Event-ID": events[-2].id or ""}
            ) as response:
                rest = await collect_events(
                    response, until=lambda items: isinstance(items[-1], SseComment)
                )
            assert [e.id for e in events_only(rest)] == [events[-1].id]


@pytest.mark.parametrize("stale", ["deadbeef-3", "nonsense", "deadbeef-999999", "x-"])
async def test_an_unknown_or_old_event_id_gives_a_reset(
    session: aiohttp.ClientSession, stale: str
) -> None:
    async with Emulator(time_scale=SCALE, seed=26) as emu:
        async with kling_app(emu, router_options={"heartbeat": 0.2}) as (base, _):
            _, job, _ = await post(session, f"{base}/jobs", {"prompt": "x"})
            await wait_for_status(session, base, job["id"], DONE)
            _, listing = await get_json(session, f"{base}/jobs")
            for how in ("header", "query"):
                if how == "header":
                    request = session.get(f"{base}/events", headers={"Last-Event-ID": stale})
                else:
                    request = session.get(f"{base}/events", params={"after": stale})
                async with request as response:
                    items = await collect_events(
                        response, until=lambda items: isinstance(items[-1], SseComment)
                    )
                events = events_only(items)
                assert [event.event for event in events] == ["reset"], (how, items)
                assert "GET /jobs" in events[0].json()["reason"]
                # The reset's id is where to go on from: now.
                assert events[0].id == listing["last_event_id"]


# --- the clip ---------------------------------------------------------------------------------


async def test_video_redirects_to_the_result_url_and_is_409_before_the_end(
    session: aiohttp.ClientSession,
) -> None:
    async with Emulator(time_scale=SCALE, seed=31) as emu, kling_app(emu) as (base, _):
        _, job, _ = await post(session, f"{base}/jobs", {"prompt": "x"})
        done = await wait_for_status(session, base, job["id"], DONE)
        async with session.get(f"{base}/jobs/{job['id']}/video", allow_redirects=False) as answer:
            assert answer.status == 307
            location = answer.headers["Location"]
        assert location == done["task"]["videos"][0]["url"]
        assert location.startswith(emu.files_url)
        async with session.get(location) as answer:
            assert answer.status == 200
            data = await answer.read()
        assert data[4:8] == b"ftyp"
        assert data == emu.video_bytes(done["task"]["videos"][0]["id"])

        emu.set_lifecycle(median_duration=1_000_000)
        _, slow, _ = await post(session, f"{base}/jobs", {"prompt": "slow"})
        async with session.get(f"{base}/jobs/{slow['id']}/video", allow_redirects=False) as answer:
            assert answer.status == 409
            assert "has no clip" in (await answer.json())["detail"]
        assert (await get_json(session, f"{base}/jobs/nobody/video"))[0] == 404


async def test_video_from_the_download_dir_once_downloaded(
    session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    async with Emulator(time_scale=SCALE, seed=32) as emu:
        emu.set_download_rate(4000)  # bytes per second: a clip (2-5 KB) takes half a second or more
        async with kling_app(emu, download_dir=tmp_path / "clips") as (base, _):
            _, job, _ = await post(session, f"{base}/jobs", {"prompt": "x"})
            url = f"{base}/jobs/{job['id']}/video"
            async with session.get(url) as answer:
                assert answer.status == 409  # not yet
            done = await wait_for_status(session, base, job["id"], DONE)
            video_id = done["task"]["videos"][0]["id"]
            answers: list[int] = []

            async def downloaded() -> bytes | None:
                async with session.get(url, allow_redirects=False) as answer:
                    answers.append(answer.status)
                    if answer.status == 503:
                        assert answer.headers["Retry-After"].isdigit()
                        assert "downloading" in (await answer.json())["detail"]
                        return None
                    assert answer.status == 200, await answer.text()
                    assert answer.content_type == "video/mp4"
                    return await answer.read()

            data = await eventually(downloaded, within=30, interval=0.05)
            assert 503 in answers  # it was seen on its way
            assert data == emu.video_bytes(video_id)
            assert data[4:8] == b"ftyp"
            assert (tmp_path / "clips").is_dir()
            assert [p.read_bytes() for p in (tmp_path / "clips").iterdir()] == [data]


async def test_a_clip_that_cannot_be_downloaded_is_502(
    session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    async with Emulator(time_scale=SCALE, seed=33) as emu:
        # A result URL the client must never fetch (a cloud metadata address).
        emu.set_result_url("http://169.254.169.254/latest/meta-data/{video_id}")
        async with kling_app(emu, download_dir=tmp_path) as (base, _):
            _, job, _ = await post(session, f"{base}/jobs", {"prompt": "x"})
            await wait_for_status(session, base, job["id"], DONE)

            async def refused() -> str | None:
                async with session.get(f"{base}/jobs/{job['id']}/video") as answer:
                    if answer.status == 503:
                        return None
                    assert answer.status == 502, await answer.text()
                    detail: str = (await answer.json())["detail"]
                    return detail

            detail = await eventually(refused)
            assert "could not be downloaded" in detail
            assert [path async for path in anyio.Path(tmp_path).iterdir()] == []


# --- the app around it ------------------------------------------------------------------------


async def test_the_auth_dependency_guards_the_jobs_routes_but_not_the_callback(
    session: aiohttp.ClientSession,
) -> None:
    seen: list[str | None] = []

    async def auth(authorization: Annotated[str | None, Header()] = None) -> None:
        seen.append(authorization)
        if authorization is None:
            raise HTTPException(401, "log in first", headers={"WWW-Authenticate": "Bearer"})
        if authorization != "Bearer let-me-in":
            raise HTTPException(403, "not you")

    token = "t" * 10 + "_callback-token-1234"
    async with Emulator(time_scale=SCALE, seed=41, median_duration=LONG) as emu:
        async with kling_app(
            emu, router_options={"dependencies": [Depends(auth)]}, callback_token=token
        ) as (base, _):
            routes = [
                ("POST", "/jobs"),
                ("GET", "/jobs"),
                ("GET", "/jobs/any"),
                ("GET", "/jobs/any/events"),
                ("GET", "/jobs/any/video"),
                ("GET", "/events"),
            ]
            for headers, code in (({}, 401), ({"Authorization": "Bearer guess"}, 403)):
                for method, path in routes:
                    async with session.request(
                        method, base + path, json={"prompt": "x"}, headers=headers
                    ) as answer:
                        assert answer.status == code, (method, path, headers)
            assert emu.stats.requests_per_route["create"] == 0
            mine = {"Authorization": "Bearer let-me-in"}
            async with session.post(f"{base}/jobs", json={"prompt": "x"}, headers=mine) as answer:
                assert answer.status == 202
                job = await answer.json()
            async with session.get(f"{base}/jobs/{job['id']}", headers=mine) as answer:
                assert answer.status == 200
            async with session.get(f"{base}/jobs/{job['id']}") as answer:
                assert answer.status == 401

            # Kling cannot log in: the receiver is guarded by its token alone.
            async with session.get(f"{base}/jobs/{job['id']}", headers=mine) as answer:
                task_id = (await answer.json())["task_id"]
            assert task_id is not None
            before = len(seen)
            body = {
                "task_id": task_id,
                "task_status": "processing",
                "created_at": 1,
                "updated_at": 2,
            }
            async with session.post(f"{base}/callbacks/{token}", json=body) as answer:
                assert answer.status == 200
                assert await answer.json() == {"received": True}
            assert len(seen) == before  # the dependency was not asked
            # ...and the emulator's own callbacks reached it.
            assert emu.stats.callbacks_failed == 0
            assert emu.stats.requests_per_route["callback_sent"] >= 1


async def test_kling_is_the_shared_client_in_the_apps_own_handlers(
    session: aiohttp.ClientSession,
) -> None:
    def routes(app: FastAPI) -> None:
        @app.post("/my-clip")
        async def my_clip(kling: kf.Kling, prompt: str) -> dict[str, Any]:
            return kling.submit(ka.Text2VideoRequest(prompt=prompt)).to_dict()

        @app.get("/count")
        async def count(kling: kf.Kling) -> dict[str, int]:
            return {"jobs": len(kling.jobs()), "done": len(kling.jobs(ka.JobStatus.SUCCEEDED))}

    async with Emulator(time_scale=SCALE, seed=42) as emu:
        async with kling_app(emu, routes=routes) as (base, _):
            root = base.removesuffix(PREFIX)
            async with session.post(f"{root}/my-clip", params={"prompt": "mine"}) as answer:
                assert answer.status == 200
                mine = await answer.json()
            # The router sees the handler's job: one client for the whole app.
            done = await wait_for_status(session, base, mine["id"], DONE)
            assert done["request"]["prompt"] == "mine"
            assert await get_json(session, f"{root}/count") == (200, {"jobs": 1, "done": 1})
            assert emu.stats.created_per_external_id == {mine["id"]: 1}


async def test_the_apps_own_lifespan_runs_inside_with_its_state(
    session: aiohttp.ClientSession,
) -> None:
    calls: list[str] = []

    @asynccontextmanager
    async def mine(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        calls.append("start")
        yield {"greeting": "hello", "started": len(calls)}
        calls.append("stop")

    def routes(app: FastAPI) -> None:
        @app.get("/hello")
        async def hello(request: Request, kling: kf.Kling) -> dict[str, Any]:
            return {
                "greeting": request.state.greeting,
                "started": request.state.started,
                "client": type(kling).__name__,
            }

    async with Emulator(time_scale=SCALE, seed=43) as emu:
        async with kling_app(emu, app_lifespan=mine, routes=routes) as (base, _):
            assert calls == ["start"]
            root = base.removesuffix(PREFIX)
            assert await get_json(session, f"{root}/hello") == (
                200,
                {"greeting": "hello", "started": 1, "client": "KlingClient"},
            )
            _, job, _ = await post(session, f"{base}/jobs", {"prompt": "x"})
            await wait_for_status(session, base, job["id"], DONE)
        assert calls == ["start", "stop"]


async def test_the_router_without_the_lifespan_is_a_clear_error() -> None:
    app = FastAPI()
    app.include_router(kf.router(), prefix=PREFIX)
    # uvicorn closes a connection after a 500 without saying so: one connection a request.
    connector = aiohttp.TCPConnector(force_close=True)
    with recorded("uvicorn.error", level=logging.ERROR) as records:
        async with aiohttp.ClientSession(connector=connector) as session, serving(app) as root:
            for method, path in (("GET", "/jobs"), ("POST", "/callbacks/" + "x" * 30)):
                async with session.request(method, root + PREFIX + path) as answer:
                    assert answer.status == 500
                    assert "lifespan" not in await answer.text()  # no internals to a client
    errors = [r.exc_info[1] for r in records if r.exc_info is not None]
    assert len(errors) == 2
    for error in errors:
        assert isinstance(error, ka.UsageError)
        assert "needs its lifespan" in str(error)
        assert "kf.lifespan(" in str(error)


async def test_public_url_without_the_router_fails_at_startup() -> None:
    async with Emulator(time_scale=SCALE, seed=44) as emu:
        options = client_options(emu, public_url="https://clips.example.com")
        app = FastAPI(lifespan=kf.lifespan(**options))
        with pytest.raises(ka.UsageError, match=r"needs the router"):
            async with kf.lifespan(**options)(app):
                pass
        with recorded("uvicorn.error", level=logging.ERROR) as records:
            with pytest.raises(StartupFailed):
                async with serving(app):
                    pass
        text = "\n".join(record.getMessage() for record in records)
        assert "UsageError" in text and "needs the router" in text
        assert emu.stats.requests_per_route["create"] == 0


# --- the moment a job ends --------------------------------------------------------------------


async def asgi_get(
    app: Any, scope: MutableMapping[str, Any], path: str, headers: dict[str, str]
) -> Any:
    """``GET path`` through ``app`` in this very task, as uvicorn would call it (with the
    lifespan's state of ``scope``): (status, body) once the response is complete."""
    messages: list[dict[str, Any]] = []
    complete = anyio.Event()
    asked = False

    async def receive() -> dict[str, Any]:
        nonlocal asked
        if not asked:
            asked = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await complete.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            complete.set()

    inner = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "state": dict(scope["state"]),
    }
    with anyio.fail_after(10):
        await app(inner, receive, send)
    [start] = [m for m in messages if m["type"] == "http.response.start"]
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return start["status"], body.decode()


async def test_a_reconnect_as_the_job_ends_gets_the_end_not_204(
    session: aiohttp.ClientSession,
) -> None:
    """The job has ended in the client, its end not yet numbered in the event log (that is
    the log's task's next turn): a reader reconnecting with the last id it saw gets the end
    (then the stream closes), never a 204 that would leave its page on "processing"."""

    def routes(app: FastAPI) -> None:
        @app.post("/end-and-reconnect/{job_id}")
        async def end_and_reconnect(
            job_id: str, last_event_id: str, request: Request, kling: kf.Kling
        ) -> dict[str, Any]:
            job = kling.job(job_id)
            assert job is not None and job.task is not None
            done = attrs.evolve(
                job.task,
                status=ka.TaskStatus.SUCCEEDED,
                videos=(ka.Video(id="v", url="https://cdn.example/v.mp4", duration=5.0),),
            )
            kling.observe(done, confirmed=True)  # as if the app had fetched it itself
            assert job.done
            # No await between the end and the reconnect's dependencies.
            status, body = await asgi_get(
                request.app,
                request.scope,
                f"{PREFIX}/jobs/{job_id}/events",
                {"Last-Event-ID": last_event_id},
            )
            return {"status": status, "body": body}

    async with Emulator(time_scale=SCALE, seed=27, median_duration=1_000_000) as emu:
        async with kling_app(emu, routes=routes, router_options={"heartbeat": 0.2}) as (base, _):
            _, job, _ = await post(session, f"{base}/jobs", {"prompt": "x"})
            await wait_for_status(session, base, job["id"], {"submitted", "processing"})
            async with session.get(f"{base}/jobs/{job['id']}/events") as response:
                items = await collect_events(
                    response, until=lambda items: isinstance(items[-1], SseComment)
                )
            last = events_only(items)[-1]
            assert last.json()["status"] in ("submitted", "processing")
            async with session.post(
                f"{base.removesuffix(PREFIX)}/end-and-reconnect/{job['id']}",
                params={"last_event_id": last.id or ""},
            ) as answer:
                assert answer.status == 200, await answer.text()
                result = await answer.json()
            assert result["status"] == 200, result
            assert '"status": "succeed"' in result["body"]
