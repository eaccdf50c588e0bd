"""The callback receiver under abuse, over real HTTP: ``POST {prefix}/callbacks/{token}``.

Anyone on the internet can POST there. The receiver must answer a wrong token with 404, an
oversize body with 413 (without reading it all), anything that is not a Kling task with 400,
and take a task only as a hint: a forged ``succeed`` changes no job, sends nothing to the URL
it names, and costs about one authenticated GET per ``min_interval`` per task, however many
come. Each property runs thousands of generated bodies through ONE app and emulator: the
async test starts them, then runs Hypothesis in a worker thread that calls back into the
event loop for each request (``anyio.from_thread``).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import anyio.abc
import anyio.from_thread
import anyio.to_thread
import pytest
import yarl
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

import kling_async as ka
import kling_async.fastapi as kf
from kling_async.testing import Emulator

from .conftest import SCALE
from .fastapi_helpers import (
    DONE,
    SseComment,
    SseEvent,
    SseItem,
    eventually,
    job_view,
    kling_app,
    recorded,
    sse_items,
    wait_for_status,
    wire_task,
)

pytestmark = pytest.mark.anyio

LIMIT = kf.CALLBACK_BODY_LIMIT
HOUR = 3600.0
#: Real seconds between two GETs a hint may bring for one task.
MIN_INTERVAL = 0.25
#: Polls only when a hint asks: the tasks' own schedule is an hour away, in real seconds.
HINTS_ONLY = ka.PollPolicy(
    min_interval=MIN_INTERVAL, max_interval=HOUR, initial_estimate=HOUR, safety_interval=HOUR
)
#: Emulated seconds: tasks that outlive every test here (an hour of real time at SCALE).
FOREVER = HOUR / SCALE


class Attacker:
    """A second local server, where forged callbacks point: it counts what reaches it."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.hits[request.path] += 1
        return web.Response(body=b"\x00\x00\x00\x18ftypmp42" + bytes(64), content_type="video/mp4")


@asynccontextmanager
async def attacker_server() -> AsyncIterator[Attacker]:
    attacker = Attacker()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", attacker.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        attacker.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        yield attacker
    finally:
        await runner.cleanup()


@dataclass
class Target:
    """One running app with real tasks, and the ways to hit its receiver."""

    base: str
    token: str
    emu: Emulator
    session: aiohttp.ClientSession
    attacker: Attacker
    running: dict[str, str] = field(default_factory=dict)  # job id -> task id, never ending
    finished: dict[str, str] = field(default_factory=dict)  # job id -> task id, succeeded

    def url(self, token: str) -> yarl.URL:
        """The receiver's URL for ``token``, every byte of it percent-encoded as needed
        (dots too, so that no client or server reads ``..`` as a parent directory)."""
        quoted = urllib.parse.quote(token, safe="").replace(".", "%2E")
        return yarl.URL(f"{self.base}/callbacks/{quoted}", encoded=True)

    async def post(
        self,
        body: bytes,
        *,
        token: str | None = None,
        chunk: int | None = None,
        follow: bool = False,
    ) -> tuple[int, bytes]:
        """POST ``body`` (with Content-Length, or chunked in pieces of ``chunk`` bytes);
        ``follow`` redirects."""
        data: Any = body
        if chunk is not None:

            async def pieces() -> AsyncIterator[bytes]:
                for start in range(0, len(body), chunk):
                    yield body[start : start + chunk]

            data = pieces()
        async with self.session.post(
            self.url(self.token if token is None else token),
            data=data,
            headers={"Content-Type": "application/json"},
            allow_redirects=follow,
        ) as response:
            return response.status, await response.read()

    def gets(self) -> int:
        return self.emu.stats.requests_per_route["get"]

    def forged(self, task_id: str, status: str) -> bytes:
        """A snapshot of one of the tasks claiming ``status``, a success with the attacker's
        video, a failure with its message."""
        job_id = {**self.running, **self.finished}
        external = next((j for j, t in job_id.items() if t == task_id), None)
        body = wire_task(
            task_id,
            status,
            external_task_id=external,
            video_url=f"{self.attacker.url}/stolen.mp4" if status == "succeed" else None,
            message="forged failure" if status == "failed" else "",
        )
        return json.dumps(body).encode()

    async def check_untouched(self) -> None:
        """The running jobs are where the emulator says, the finished one as it ended, and
        none shows anything of the attacker's."""
        now = self.emu.now()
        for job_id, task_id in self.running.items():
            view = await job_view(self.session, self.base, job_id)
            assert view["status"] in ("submitted", "processing"), view
            assert self.emu.tasks[task_id].status_at(now) == "processing"
            assert self.attacker.url not in json.dumps(view)
        for job_id in self.finished:
            view = await job_view(self.session, self.base, job_id)
            assert view["status"] == "succeed", view
            assert view["task"]["videos"][0]["url"].startswith(self.emu.files_url)
        assert sum(self.attacker.hits.values()) == 0


@asynccontextmanager
async def target(
    *, running: int = 1, finished: int = 0, seed: int = 1, **options: Any
) -> AsyncIterator[Target]:
    """An app whose client polls only when a hint asks (:data:`HINTS_ONLY`), with
    ``finished`` succeeded jobs and ``running`` jobs whose tasks outlive the test. The
    emulator calls back only at a task's end: during a test, every hint is ours."""
    token = secrets.token_urlsafe(32)
    async with (
        attacker_server() as attacker,
        # Processing from its create on: a confirming GET moves a job there at once.
        Emulator(
            time_scale=SCALE,
            seed=seed,
            # Long enough for the client to follow a task before its one callback comes.
            median_duration=300,
            queue_fraction=0.0,
            callbacks="terminal",
        ) as emu,
        kling_app(emu, callback_token=token, poll=HINTS_ONLY, **options) as (base, _),
        aiohttp.ClientSession() as session,
    ):
        hit = Target(base, token, emu, session, attacker)
        for index in range(finished + running):
            if index == finished:
                emu.set_lifecycle(median_duration=FOREVER)
            async with session.post(f"{base}/jobs", json={"prompt": f"clip {index}"}) as answer:
                assert answer.status == 202
                job_id = (await answer.json())["id"]
            view = await wait_for_status(session, base, job_id, {"submitted", "processing", *DONE})
            (hit.finished if index < finished else hit.running)[job_id] = view["task_id"]
        for job_id in hit.finished:  # the emulator's terminal callback ends them
            await wait_for_status(session, base, job_id, {"succeed"})
        yield hit


async def in_thread(run: Callable[[], None]) -> None:
    """Run a Hypothesis property (a blocking function) in a worker thread, whose examples
    call into this event loop with ``anyio.from_thread.run``."""
    await anyio.to_thread.run_sync(run)


# --- wrong tokens ------------------------------------------------------------------------------


def near_misses(token: str) -> st.SearchStrategy[str]:
    """The token with one character changed, dropped or added, cut short, extended, in
    another case, padded, or percent-encoded once more."""
    at = st.integers(0, len(token) - 1)
    # No lone surrogate: it has no UTF-8 form, so no URL (and no request) can carry one.
    char = st.characters(exclude_categories=["Cs"])
    return st.one_of(
        st.builds(lambda i, c: token[:i] + c + token[i + 1 :], at, char),
        st.builds(lambda i: token[:i] + token[i + 1 :], at),
        st.builds(lambda i, c: token[:i] + c + token[i:], st.integers(0, len(token)), char),
        st.builds(lambda i: token[:i], at),
        st.builds(lambda s: token + s, st.text(min_size=1, max_size=4)),
        st.builds(lambda s: s + token, st.text(min_size=1, max_size=4)),
        st.sampled_from(
            [
                token.upper(),
                token.lower(),
                token.swapcase(),
                f" {token}",
                f"{token} ",
                f"{token}\n",
                urllib.parse.quote(token, safe="").replace("-", "%2D"),
                token[::-1],
                token * 2,
            ]
        ),
    )


async def test_a_wrong_token_is_404_and_nothing_is_observed() -> None:
    async with target(running=1) as hit:
        [task_id] = hit.running.values()
        claim = hit.forged(task_id, "succeed")
        gets = hit.gets()
        tokens = st.one_of(st.text(max_size=80), near_misses(hit.token)).filter(
            # Starlette redirects a path ending in slashes to the path without them (307,
            # followed here): the right token with slashes after it is the right token.
            lambda token: token.rstrip("/") != hit.token
        )
        tried: list[str] = []

        @settings(max_examples=700, deadline=None, database=None)
        @given(token=tokens)
        def wrong_token_is_404(token: str) -> None:
            tried.append(token)
            status, _ = anyio.from_thread.run(lambda: hit.post(claim, token=token, follow=True))
            assert status == 404, token

        await in_thread(wrong_token_is_404)
        assert len(tried) >= 500
        assert any(len(t) == len(hit.token) for t in tried)  # the near misses were tried
        assert hit.gets() == gets  # no hint reached the client
        await hit.check_untouched()
        # The same body with the right token is a hint: it brings a GET forward at once.
        assert await hit.post(claim) == (200, b'{"received":true}')

        async def polled() -> bool:
            return hit.gets() > gets

        await eventually(polled)
        await hit.check_untouched()


# --- oversize bodies --------------------------------------------------------------------------


async def test_a_body_over_64_kib_is_413_with_or_without_content_length() -> None:
    async with target(running=1) as hit:
        stranger = json.dumps(wire_task("9" * 18, "processing")).encode()
        counts: Counter[int] = Counter()

        @settings(max_examples=160, deadline=None, database=None)
        @given(
            size=st.one_of(st.integers(LIMIT - 64, LIMIT + 64), st.integers(LIMIT + 1, 4 * LIMIT)),
            chunk=st.none() | st.integers(512, 64 * 1024),
        )
        def capped(size: int, chunk: int | None) -> None:
            body = stranger.ljust(size)  # a valid task, padded with JSON whitespace
            status, answer = anyio.from_thread.run(lambda: hit.post(body, chunk=chunk))
            counts[status] += 1
            if size > LIMIT:
                assert status == 413, (size, chunk)
                assert json.loads(answer) == {"detail": f"a callback body is at most {LIMIT} bytes"}
            else:
                assert (status, answer) == (200, b'{"received":true}'), (size, chunk)

        await in_thread(capped)
        assert counts[413] > 50 and counts[200] > 5, counts
        await hit.check_untouched()


async def test_a_slow_body_over_64_kib_is_cut_off_before_the_rest_is_sent() -> None:
    """A sender trickling a chunked body gets its 413 once it has sent a little over the
    limit, while it still has most of its body to send; one that declares a length over
    the limit gets it before sending any."""
    async with target(running=1) as hit:
        url = hit.url(hit.token)
        head = (
            f"POST {url.raw_path} HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n"
            "Content-Type: application/json\r\n"
        )
        piece = b" " * 4096
        to_send = 1024 * 1024  # what it would go on to send
        async with await anyio.connect_tcp("127.0.0.1", url.port or 80) as stream:
            await stream.send(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode())
            sent = 0

            async def trickle(until: int) -> None:
                nonlocal sent
                while sent < until:
                    await stream.send(b"%x\r\n%s\r\n" % (len(piece), piece))
                    sent += len(piece)
                    await anyio.sleep(0.002)  # a slow sender

            await trickle(LIMIT)
            early = b""
            with anyio.move_on_after(0.3):
                early = await stream.receive()
            assert early == b""  # exactly the limit: still reading
            await trickle(LIMIT + 2 * len(piece))
            with anyio.fail_after(5):
                answer = await stream.receive()
            assert answer.startswith(b"HTTP/1.1 413 "), answer[:100]
            assert sent == LIMIT + 2 * len(piece) < to_send  # answered mid-body

        for declared in (LIMIT + 1, 100 * LIMIT):
            async with await anyio.connect_tcp("127.0.0.1", url.port or 80) as stream:
                await stream.send(f"{head}Content-Length: {declared}\r\n\r\n".encode())
                with anyio.fail_after(5):
                    answer = await stream.receive()
                assert answer.startswith(b"HTTP/1.1 413 "), (declared, answer[:100])
        await hit.check_untouched()


# --- bodies that are not a task ---------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
TASK_KEYS = [
    "task_id",
    "task_status",
    "task_status_msg",
    "task_info",
    "task_result",
    "created_at",
    "updated_at",
]


@st.composite
def almost_tasks(draw: st.DrawFn) -> Any:
    """A task object of a task no job has, broken in one or two places (some breaks are
    harmless: the decoder's answer is the oracle)."""
    task: Any = wire_task(
        draw(st.integers(10**17, 10**18 - 1).map(str)),
        draw(st.sampled_from(["submitted", "processing", "succeed", "failed", "paused"])),
        external_task_id=draw(st.none() | st.text(max_size=10)),
        video_url=draw(st.none() | st.just("https://cdn.example/v.mp4")),
    )
    for _ in range(draw(st.integers(1, 2))):
        how = draw(st.sampled_from(["drop", "retype", "wrap", "envelope", "videos", "extra"]))
        key = draw(st.sampled_from(TASK_KEYS))
        if how == "wrap":
            task = [task]
        elif how == "envelope":
            task = {"code": 0, "message": "SUCCEED", "data": task}
        elif not isinstance(task, dict):
            continue
        elif how == "drop":
            task.pop(key, None)
        elif how == "retype":
            task[key] = draw(json_values)
        elif how == "videos":
            task["task_result"] = {"videos": draw(json_values)}
        else:
            task[draw(st.text(max_size=10))] = draw(json_values)
    return task


async def comment_after(items: list[SseItem], mark: int) -> bool:
    """A heartbeat came after the first ``mark`` items (all sent before it are in)."""
    return any(isinstance(item, SseComment) for item in items[mark:])


def decodes(body: bytes) -> bool:
    try:
        ka.Task.from_wire(body)
    except ka.ResponseDecodeError:
        return False
    return True


async def test_a_body_that_is_not_a_kling_task_is_400() -> None:
    async with target(running=1) as hit:
        gets = hit.gets()
        counts: Counter[str] = Counter()
        bodies = st.one_of(
            st.binary(max_size=200),
            st.text(max_size=60).map(str.encode),
            json_values.map(lambda value: json.dumps(value).encode()),
            almost_tasks().map(lambda value: json.dumps(value).encode()),
        )

        @settings(max_examples=1500, deadline=None, database=None)
        @given(body=bodies)
        def answered(body: bytes) -> None:
            status, answer = anyio.from_thread.run(lambda: hit.post(body))
            try:
                parsed: Any = json.loads(body)
            except ValueError:
                parsed = ValueError
            if parsed is ValueError or not isinstance(parsed, dict) or "task_id" not in parsed:
                assert status == 400, body  # not JSON, not an object, or no task id
            ok = decodes(body)
            counts["task" if ok else "not a task"] += 1
            if ok:
                assert (status, answer) == (200, b'{"received":true}'), body
            else:
                assert status == 400, (body, status, answer)
                assert json.loads(answer) == {"detail": "the body is not a Kling task object"}

        await in_thread(answered)
        assert counts["not a task"] > 1000, counts
        # Broken snapshots of the real task (it claims an end) are no hint either.
        [task_id] = hit.running.values()
        for broken in (
            {"task_id": task_id, "task_status": "succeed", "task_result": {"videos": [{"url": 5}]}},
            {"task_id": "", "task_status": "succeed"},
            {"code": 0, "data": {"task_id": task_id, "task_status": "succeed"}},
            [{"task_id": task_id, "task_status": "succeed"}],
            {"task_status": "succeed", "task_info": {"external_task_id": task_id}},
        ):
            status, _ = await hit.post(json.dumps(broken).encode())
            assert status == 400, broken
        assert hit.gets() == gets
        await hit.check_untouched()


# --- real tasks, told lies --------------------------------------------------------------------


async def test_duplicated_and_out_of_order_callbacks_of_real_tasks_move_nothing() -> None:
    async with target(running=2, finished=1, seed=5) as hit:
        tasks = [*hit.running.values(), *hit.finished.values()]
        sent = 0
        started = time.monotonic()
        gets = hit.gets()
        snapshots = st.tuples(
            st.sampled_from(tasks),
            st.sampled_from(["submitted", "processing", "succeed", "failed", "paused"]),
        )

        @settings(max_examples=150, deadline=None, database=None)
        @given(
            order=st.lists(snapshots, min_size=1, max_size=8).flatmap(
                # Each one twice, the second time in another order.
                lambda xs: st.permutations(xs).map(lambda ys: xs + ys)
            ),
            at_once=st.booleans(),
        )
        def nothing_moves(order: list[tuple[str, str]], at_once: bool) -> None:
            nonlocal sent
            bodies = [hit.forged(task_id, status) for task_id, status in order]

            async def deliver() -> None:
                answers: list[tuple[int, bytes]] = []

                async def one(body: bytes) -> None:
                    answers.append(await hit.post(body))

                if at_once:
                    async with anyio.create_task_group() as group:
                        for body in bodies:
                            group.start_soon(one, body)
                else:
                    for body in bodies:
                        await one(body)
                assert answers == [(200, b'{"received":true}')] * len(bodies)
                await hit.check_untouched()

            anyio.from_thread.run(deliver)
            sent += len(bodies)

        await in_thread(nothing_moves)
        # Let the confirmations still due happen, then count them.
        with anyio.fail_after(10):
            await anyio.sleep(2 * MIN_INTERVAL)
        await hit.check_untouched()
        elapsed = time.monotonic() - started
        polls = hit.gets() - gets
        bound = len(hit.running) * (elapsed / MIN_INTERVAL + 2)
        assert sent >= 1000
        assert 1 <= polls <= bound, (polls, bound, sent, elapsed)


async def test_a_forged_success_is_never_believed(tmp_path: Path) -> None:
    """Hundreds of forged ``succeed`` (and ``failed``, and unknown) callbacks for running
    tasks: no state change (no event on the jobs' streams), nothing fetched from the forged
    URL (though the app downloads every clip that succeeds), no clip to serve, and about one
    GET per ``min_interval`` per task."""
    async with target(
        running=2, seed=6, download_dir=tmp_path, router_options={"heartbeat": 0.1}
    ) as hit:
        # First hint: the confirming GET moves each job to what the emulator says.
        for task_id in hit.running.values():
            assert (await hit.post(hit.forged(task_id, "succeed")))[0] == 200
        for job_id in hit.running:
            await wait_for_status(hit.session, hit.base, job_id, {"processing"})
        streams: dict[str, list[SseItem]] = {job_id: [] for job_id in hit.running}

        async def listen(job_id: str, *, task_status: anyio.abc.TaskStatus[None]) -> None:
            items, live = streams[job_id], False
            async with hit.session.get(f"{hit.base}/jobs/{job_id}/events") as response:
                async for item in sse_items(response):
                    items.append(item)
                    if not live and isinstance(item, SseComment):
                        live = True  # the replay comes before any heartbeat: now it is live
                        task_status.started()

        async with anyio.create_task_group() as group:
            for job_id in hit.running:
                await group.start(listen, job_id)
            replayed = {job_id: list(items) for job_id, items in streams.items()}
            gets, started = hit.gets(), time.monotonic()
            sent = 0
            for round_ in range(15):
                async with anyio.create_task_group() as burst:
                    for task_id in hit.running.values():
                        for status in ("succeed", "succeed", "failed", "paused"):
                            for _ in range(5):
                                burst.start_soon(hit.post, hit.forged(task_id, status))
                                sent += 1
                if round_ % 5 == 0:
                    await hit.check_untouched()
                    for job_id in hit.running:
                        async with hit.session.get(f"{hit.base}/jobs/{job_id}/video") as answer:
                            assert answer.status == 409
            elapsed = time.monotonic() - started
            # Confirmations still due, then a heartbeat on each stream after them.
            with anyio.fail_after(10):
                await anyio.sleep(2 * MIN_INTERVAL)
            for items in streams.values():
                await eventually(partial(comment_after, items, len(items)))
            group.cancel_scope.cancel()

        for job_id, items in streams.items():
            new = [i for i in items[len(replayed[job_id]) :] if isinstance(i, SseEvent)]
            assert new == [], new  # no state change at all
            assert [e.json()["status"] for e in replayed[job_id] if isinstance(e, SseEvent)][
                -1
            ] == "processing"
        await hit.check_untouched()
        assert sum(hit.attacker.hits.values()) == 0
        assert [path async for path in anyio.Path(tmp_path).iterdir()] == []
        polls = hit.gets() - gets
        bound = len(hit.running) * ((elapsed + 2 * MIN_INTERVAL) / MIN_INTERVAL + 2)
        assert sent == 600
        assert 1 <= polls <= bound, (polls, bound, elapsed)


# --- the token stays out of the logs ---------------------------------------------------------


async def test_the_token_never_appears_in_the_access_log() -> None:
    token = secrets.token_urlsafe(32)
    with recorded("uvicorn.access", "uvicorn.error", "kling_async", level=logging.DEBUG) as records:
        async with (
            Emulator(time_scale=SCALE, seed=8) as emu,
            kling_app(emu, callback_token=token) as (base, _),
            aiohttp.ClientSession() as session,
        ):
            async with session.post(f"{base}/jobs", json=[{"prompt": "a"}, {"prompt": "b"}]) as r:
                ids = [job["id"] for job in (await r.json())["jobs"]]
            for job_id in ids:
                await wait_for_status(session, base, job_id, {"succeed"})

            async def called_back() -> bool:  # the emulator's callbacks, of both tasks
                answered = [r for r in records if "/callbacks/" in r.getMessage()]
                return len(answered) >= 2 * len(ids)

            await eventually(called_back)
            body = json.dumps(wire_task("1", "processing")).encode()
            for path in (f"/callbacks/{token}", f"/callbacks/{token}x", f"/callbacks/x{token}"):
                async with session.post(base + path, data=body) as answer:
                    assert answer.status in (200, 404)
            async with session.get(f"{base}/jobs", params={"after": token}) as answer:
                assert answer.status == 422
            filters = logging.getLogger("uvicorn.access").filters
            assert filters  # the lifespan's mask, while the app runs
        assert logging.getLogger("uvicorn.access").filters == []  # ...and only then
    # The emulator (a test tool, not the app) logs the URLs of callbacks it failed to make.
    records = [r for r in records if not r.name.startswith("kling_async.testing")]
    lines = [record.getMessage() for record in records]
    access = [r.getMessage() for r in records if r.name == "uvicorn.access"]
    callbacks = [line for line in access if "/callbacks/" in line]
    assert len(callbacks) >= 2 * len(ids) + 3, access
    assert all("***" in line for line in callbacks), callbacks
    assert any("after=***" in line for line in access), access
    assert not [line for line in lines if token in line]
    assert not [r for r in records if token in repr(r.args) or token in str(r.msg)]
