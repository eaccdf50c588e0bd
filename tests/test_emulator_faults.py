"""Every fault kind, seen from the client side, with the ground truth it leaves behind."""

from __future__ import annotations

import json
import logging
from typing import Any

import aiohttp
import anyio
import pytest

from kling_async.testing import Emulator, FaultKind, Faults, _emulator
from tests.test_emulator import CREATE, Api, bearer, eventually

pytestmark = pytest.mark.anyio

API_KINDS = [kind for kind in FaultKind if kind is not FaultKind.DROP_MID_DOWNLOAD]


@pytest.fixture(autouse=True)
def _no_server_errors(caplog: pytest.LogCaptureFixture) -> object:
    """Injected faults are deliberate: the server must not log them as its own errors."""
    caplog.set_level(logging.DEBUG)
    yield None
    records = caplog.get_records("setup") + caplog.get_records("call")
    errors = [record for record in records if record.levelno >= logging.ERROR]
    assert errors == []


async def test_error_5xx_before_commit() -> None:
    faults = Faults(create={FaultKind.ERROR_5XX_BEFORE_COMMIT: 1.0})
    async with Emulator(time_scale=0.001, faults=faults) as emu, aiohttp.ClientSession() as session:
        api = Api(session, emu)
        seen = set()
        for _ in range(20):
            status, answer = await api.create(external_task_id="x")
            assert (status, answer["code"]) in {(500, 5000), (503, 5001), (504, 5002)}
            assert set(answer) == {"code", "message", "request_id"}
            seen.add(status)
        assert len(seen) > 1
        assert emu.stats.tasks_created == 0
        assert emu.stats.faults_injected[FaultKind.ERROR_5XX_BEFORE_COMMIT.value] == 20
        assert sum(emu.stats.sent_errors[code] for code in (5000, 5001, 5002)) == 20


async def test_drop_after_commit_creates_then_closes_the_connection() -> None:
    faults = Faults(create={FaultKind.DROP_AFTER_COMMIT: 1.0})
    async with Emulator(time_scale=0.001, faults=faults) as emu, aiohttp.ClientSession() as session:
        api = Api(session, emu)
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await api.create(external_task_id="dropped")
        assert emu.stats.tasks_created == 1
        assert emu.stats.created_per_external_id["dropped"] == 1
        assert emu.stats.faults_injected["DROP_AFTER_COMMIT"] == 1
        # The client's recovery path: the task is there, by its external id.
        emu.set_faults(None)
        status, answer = await api.get(external_task_id="dropped")
        assert status == 200
        assert answer["data"]["task_info"] == {"external_task_id": "dropped"}


async def test_stall_after_commit_outlasts_a_short_read_timeout() -> None:
    faults = Faults(create={FaultKind.STALL_AFTER_COMMIT: 1.0}, stall_seconds=30)
    emu = Emulator(time_scale=0.001, faults=faults)
    impatient = aiohttp.ClientTimeout(total=0.2)
    async with emu, aiohttp.ClientSession(timeout=impatient) as session:
        api = Api(session, emu)
        with pytest.raises(TimeoutError):
            await api.create()
        assert emu.stats.tasks_created == 1
        assert emu.stats.faults_injected["STALL_AFTER_COMMIT"] == 1


async def test_closing_ends_a_stall_and_the_reply_goes_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stall never outlives the emulator: closing ends it and the stalled answer is sent.

    The handlers' shutdown grace is raised past the stall, so only the stall's own end at close
    can answer: were it to wait out its hour, the close would hang (and the test time out)."""
    monkeypatch.setattr(_emulator, "_SHUTDOWN_TIMEOUT", 7200.0)
    faults = Faults(create={FaultKind.STALL_AFTER_COMMIT: 1.0}, stall_seconds=3600)
    answers: list[tuple[int, dict[str, Any]]] = []
    async with aiohttp.ClientSession() as session:
        emu = Emulator(time_scale=0.001, faults=faults)
        async with emu, anyio.create_task_group() as task_group:

            async def create() -> None:
                answers.append(await Api(session, emu).create())

            task_group.start_soon(create)
            await eventually(lambda: emu.stats.faults_injected["STALL_AFTER_COMMIT"] == 1)
            await emu.aclose()
    ((status, answer),) = answers
    assert (status, answer["code"]) == (200, 0)  # the stalled reply, whole
    assert emu.stats.tasks_created == 1


async def test_a_short_stall_still_answers() -> None:
    faults = Faults(create={FaultKind.STALL_AFTER_COMMIT: 1.0}, stall_seconds=0.05)
    async with Emulator(time_scale=0.001, faults=faults) as emu, aiohttp.ClientSession() as session:
        status, answer = await Api(session, emu).create()
        assert (status, answer["code"]) == (200, 0)
        assert answer["data"]["task_id"] in emu.tasks
        assert emu.stats.faults_injected["STALL_AFTER_COMMIT"] == 1


async def test_truncated_json() -> None:
    faults = Faults(create={FaultKind.TRUNCATED_JSON: 1.0})
    async with Emulator(time_scale=0.001, faults=faults) as emu, aiohttp.ClientSession() as session:
        headers = bearer(emu.api_key)
        async with session.post(
            emu.url + CREATE, headers=headers, json={"prompt": "p"}
        ) as response:
            assert response.status == 200
            text = await response.text()
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)
        assert text.startswith('{"code":0,')
        assert emu.stats.tasks_created == 1
        assert emu.stats.faults_injected["TRUNCATED_JSON"] == 1


async def test_cometapi_error_envelope() -> None:
    faults = Faults(create={FaultKind.COMETAPI_ERROR_ENVELOPE: 1.0})
    async with Emulator(time_scale=0.001, faults=faults) as emu, aiohttp.ClientSession() as session:
        status, answer = await Api(session, emu).create()
        assert status == 500
        assert answer == {
            "error": {
                "message": answer["error"]["message"],
                "type": "comet_api_error",
                "param": "",
                "code": "invalid_request",
            }
        }
        assert emu.stats.tasks_created == 0


async def test_html_502() -> None:
    faults = Faults(create={FaultKind.HTML_502: 1.0})
    async with Emulator(time_scale=0.001, faults=faults) as emu, aiohttp.ClientSession() as session:
        headers = bearer(emu.api_key)
        async with session.post(
            emu.url + CREATE, headers=headers, json={"prompt": "p"}
        ) as response:
            assert response.status == 502
            assert response.content_type == "text/html"
            assert "Bad Gateway" in await response.text()
        assert emu.stats.tasks_created == 0
        assert emu.stats.faults_injected["HTML_502"] == 1


async def test_after_commit_faults_only_apply_to_committed_creates() -> None:
    faults = Faults(create={FaultKind.DROP_AFTER_COMMIT: 1.0})
    async with Emulator(time_scale=0.001, faults=faults) as emu, aiohttp.ClientSession() as session:
        status, answer = await Api(session, emu).create(prompt="")
        assert status == 400
        assert answer["code"] == 1201
        assert emu.stats.faults_injected == {}


async def test_query_faults() -> None:
    async with Emulator(time_scale=0.001) as emu, aiohttp.ClientSession() as session:
        api = Api(session, emu)
        task_id = await api.task_id(external_task_id="q")

        emu.set_faults(Faults(query={FaultKind.DROP_AFTER_COMMIT: 1.0}))
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await api.get(f"/{task_id}")
        # aiohttp retries an idempotent GET once after a disconnect: two drops for one call.
        assert emu.stats.faults_injected["DROP_AFTER_COMMIT"] == 2

        emu.set_faults(Faults(query={FaultKind.TRUNCATED_JSON: 1.0}))
        for params in ({}, {"external_task_id": "q"}, {"pageSize": "5"}):
            status, text = await api.get("" if params else f"/{task_id}", **params)
            assert status == 200
            assert isinstance(text, str)  # not decodable
        status, text = await api.get("/missing")  # a computed not-found answer, truncated too
        assert status == 400
        assert isinstance(text, str)

        emu.set_faults(Faults(query={FaultKind.HTML_502: 1.0}))
        status, text = await api.get(f"/{task_id}")
        assert status == 502
        assert "Bad Gateway" in text

        emu.set_faults(Faults(query={FaultKind.STALL_AFTER_COMMIT: 1.0}, stall_seconds=30))
        impatient = aiohttp.ClientTimeout(total=0.1)
        async with aiohttp.ClientSession(timeout=impatient) as impatient_session:
            with pytest.raises(TimeoutError):
                await Api(impatient_session, emu).get(external_task_id="q")

        emu.set_faults(Faults(query={FaultKind.ERROR_5XX_BEFORE_COMMIT: 1.0}))
        status, answer = await api.get()
        assert status in (500, 503, 504)

        emu.set_faults(Faults(query={FaultKind.COMETAPI_ERROR_ENVELOPE: 1.0}))
        status, answer = await api.get()
        assert status == 500
        assert answer["error"]["type"] == "comet_api_error"

        emu.set_faults(None)
        assert (await api.get(f"/{task_id}"))[0] == 200
        assert emu.stats.tasks_created == 1


async def test_drop_mid_download() -> None:
    faults = Faults(download={FaultKind.DROP_MID_DOWNLOAD: 1.0})
    async with (
        Emulator(time_scale=0.001, median_duration=0, faults=faults) as emu,
        aiohttp.ClientSession() as session,
    ):
        api = Api(session, emu)
        task_id = await api.task_id()
        video_id = emu.tasks[task_id].video_ids[0]
        _, answer = await api.get(f"/{task_id}")
        url = answer["data"]["task_result"]["videos"][0]["url"]
        async with session.get(url) as response:
            assert response.status == 200
            assert response.content_length == len(emu.video_bytes(video_id))
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
        assert emu.stats.faults_injected["DROP_MID_DOWNLOAD"] == 1

        emu.set_faults(Faults(download={FaultKind.DROP_AFTER_COMMIT: 1.0}))
        with pytest.raises(aiohttp.ServerDisconnectedError):
            async with session.get(url) as response:
                await response.read()

        emu.set_faults(Faults(download={FaultKind.HTML_502: 1.0}))
        async with session.get(url) as response:
            assert response.status == 502

        emu.set_faults(None)
        async with session.get(url) as response:
            assert await response.read() == emu.video_bytes(video_id)


async def test_rates_are_per_request_probabilities_and_seeded() -> None:
    async def run(seed: int) -> list[int]:
        faults = Faults(create={FaultKind.ERROR_5XX_BEFORE_COMMIT: 0.3})
        async with (
            Emulator(time_scale=0.001, seed=seed, faults=faults) as emu,
            aiohttp.ClientSession() as session,
        ):
            api = Api(session, emu)
            return [(await api.create())[0] for _ in range(60)]

    first, again, other = await run(1), await run(1), await run(2)
    assert first == again
    assert first != other
    failures = sum(status != 200 for status in first)
    assert 8 <= failures <= 30


async def test_storm_mixes_every_kind() -> None:
    storm = Faults.storm(0.1, stall_seconds=0.01)
    assert set(storm.create) == set(API_KINDS)
    assert set(storm.query) == set(API_KINDS)
    assert storm.download == {}
    timeout = aiohttp.ClientTimeout(total=2)
    async with (
        Emulator(time_scale=0.001, seed=7, faults=storm) as emu,
        aiohttp.ClientSession(timeout=timeout) as session,
    ):
        api = Api(session, emu)
        outcomes = []
        for index in range(150):
            try:
                status, _ = await api.create(external_task_id=f"s-{index}")
            except aiohttp.ServerDisconnectedError:
                status = 0
            outcomes.append(status)
        assert set(emu.stats.faults_injected) == {kind.value for kind in API_KINDS}
        assert set(outcomes) <= {0, 200, 500, 502, 503, 504}
        # Stalls (short here) and truncations answer 200 after creating; drops create silently.
        dropped = emu.stats.faults_injected["DROP_AFTER_COMMIT"]
        assert outcomes.count(0) == dropped
        assert emu.stats.tasks_created == outcomes.count(200) + dropped


def test_faults_are_validated() -> None:
    with pytest.raises(ValueError, match="does not apply"):
        Faults(create={FaultKind.DROP_MID_DOWNLOAD: 0.1})
    with pytest.raises(ValueError, match="does not apply"):
        Faults(download={FaultKind.TRUNCATED_JSON: 0.1})
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        Faults(query={FaultKind.HTML_502: 1.5})
    with pytest.raises(ValueError, match="add up to"):
        Faults.storm(0.2)
    with pytest.raises(ValueError, match="stall_seconds"):
        Faults(stall_seconds=-1)
    rates = {FaultKind.HTML_502: 0.5}
    faults = Faults(create=rates)
    rates[FaultKind.HTML_502] = 1.0
    assert faults.create[FaultKind.HTML_502] == 0.5  # a private copy
