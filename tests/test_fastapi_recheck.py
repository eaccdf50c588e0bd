"""A second look at the review fixes of fb277dd: defects the fixes left or brought in.

Each test states a promise (of ``docs/fastapi.md``, of the SDK's docstrings, or the one a fix
claimed); each was written failing. The one still marked ``xfail(strict=True)`` is open: it
needs the submitter to say whether a POST of this run made the task.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import aiohttp
import anyio
import attrs
import pytest
from fastapi import FastAPI

import kling_async as ka
import kling_async.fastapi as kf
from kling_async.testing import Emulator

from .conftest import SCALE
from .fastapi_helpers import DONE, client_options, kling_app, recorded, refusing_kling, serving

pytestmark = pytest.mark.anyio

TOKEN = "recheck_" + "k" * 30


# --- the redactor: the callback URL's last segment ---------------------------------------------


async def test_a_callback_url_ending_in_a_word_does_not_mangle_server_messages() -> None:
    message = "invalid parameter callback_url: must be reachable"
    async with (
        refusing_kling(lambda _body: message) as fake,
        ka.KlingClient(
            api_key="k" * 32,
            base_url=fake,
            callback_url="https://hooks.example.com/kling/callback",
            retry=ka.RetryPolicy(attempts=1, timeout=5.0, initial=0.01, maximum=0.1),
            max_requests_per_second=None,
        ) as kling,
    ):
        job = kling.submit(ka.Text2VideoRequest(prompt="x"))
        with anyio.fail_after(5), pytest.raises(ka.InvalidRequestError):
            await job.wait()
        assert job.status is ka.JobStatus.ERROR
        assert "callback_url" in str(job.error), str(job.error)


# --- the access-log filter: mapping-style arguments ------------------------------------------


class SafeAtoms(dict[str, Any]):
    """What gunicorn's ``glogging.SafeAtoms`` (and hypercorn's ``AccessLogAtoms``) are: a
    dict whose ``[]`` answers ``-`` for an atom it lacks and looks header atoms
    (``{name}i``) up case-insensitively, as the servers' documented formats rely on."""

    def __getitem__(self, key: str) -> Any:
        if key.startswith("{"):
            key = key.lower()
        return super().__getitem__(key) if key in self else "-"


async def test_masked_access_log_atoms_keep_the_servers_lookups() -> None:
    async with Emulator(time_scale=SCALE, seed=201) as emu:
        async with kling_app(emu, callback_token=TOKEN):
            path = f"/kling/callbacks/{TOKEN}"
            atoms = SafeAtoms(
                {"h": "203.0.113.9", "r": f"POST {path} HTTP/1.1", "s": 200, "{user-agent}i": "k"}
            )
            # A format of gunicorn's docs: a proxy's header (absent here), a header by name.
            fmt = '%({X-Forwarded-For}i)s %(h)s "%(r)s" %(s)s "%({User-Agent}i)s"'
            with recorded("gunicorn.access") as records:
                logging.getLogger("gunicorn.access").info(fmt, atoms)
            assert len(records) == 1
            line = records[0].getMessage()
            assert TOKEN not in line
            assert line == '- 203.0.113.9 "POST /kling/callbacks/*** HTTP/1.1" 200 "k"', line


# --- links under a prefix holding the placeholder ---------------------------------------------


async def test_links_are_right_under_any_prefix() -> None:
    prefix = "/kling-async-job-id-admin"
    async with Emulator(time_scale=SCALE, seed=202, median_duration=30) as emu:
        app = FastAPI(lifespan=kf.lifespan(**client_options(emu)))
        app.include_router(kf.router(), prefix=prefix)
        async with serving(app) as root, aiohttp.ClientSession() as session:
            body = {"prompt": "x", "external_task_id": "j1"}
            async with session.post(f"{root}{prefix}/jobs", json=body) as response:
                assert response.status == 202
                job = await response.json()
            assert job["links"]["self"] == f"{prefix}/jobs/j1", job["links"]
            assert response.headers["Location"] == f"{prefix}/jobs/j1"


# --- entry.pushed: a create of an earlier run, found by a lookup --------------------------------


async def test_a_resumed_create_found_by_lookup_is_not_left_to_the_safety_net() -> None:
    poll = attrs.evolve(ka.PollPolicy().scaled(SCALE), safety_interval=60.0)
    async with Emulator(
        time_scale=SCALE, seed=203, median_duration=1500, duration_sigma=0.05
    ) as emu:
        old = ka.Text2VideoRequest(prompt="old", external_task_id="old")
        # The earlier run: no callbacks asked for. Its create went out; it stopped before it
        # learned the task id (what a store's "sent" mark without a task id means).
        async with ka.KlingClient(**client_options(emu, poll=poll)) as first:
            created = first.submit(old)
            with anyio.fail_after(5):
                while created.task_id is None:
                    await anyio.sleep(0.01)
        emu.set_lifecycle(median_duration=300_000)
        # This run asks for callbacks (to a host the emulator does not call: the test's own
        # hints stand for them), and callbacks come for its own task.
        options = client_options(
            emu, poll=poll, callback_url=f"https://hooks.example.com/callbacks/{TOKEN}"
        )
        async with ka.KlingClient(**options) as kling, anyio.create_task_group() as group:
            new = kling.submit(ka.Text2VideoRequest(prompt="new", external_task_id="new"))
            with anyio.fail_after(5):
                while new.task_id is None:
                    await anyio.sleep(0.01)
            new_task = new.task_id

            async def hint() -> None:
                while True:
                    snapshot = ka.Task(task_id=new_task, status=ka.TaskStatus.PROCESSING)
                    kling.observe(snapshot, confirmed=False)
                    await anyio.sleep(0.05)

            group.start_soon(hint)
            await anyio.sleep(0.1)
            job = kling.submit(old, resume=True)  # looked up first: the earlier task is found
            with anyio.fail_after(5):
                while job.task_id is None:
                    await anyio.sleep(0.01)
            assert job.task_id == created.task_id
            ended_at: float | None = None
            with anyio.move_on_after(4.0):
                while True:
                    # Looked at first: on a busy machine the task may have ended before the
                    # lookup found it, and the job be done from its first snapshot.
                    if ended_at is None and emu.tasks[job.task_id].status_at(emu.now()) in DONE:
                        ended_at = time.monotonic()
                    if job.status.value in DONE:
                        break
                    await anyio.sleep(0.02)
            group.cancel_scope.cancel()
            assert ended_at is not None, "the old task did not end at the emulator"
            assert job.status is ka.JobStatus.SUCCEEDED, f"not seen within 4 s: {job.status}"
