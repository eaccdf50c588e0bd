"""``state_path``: tasks kept in SQLite, so a restarted emulator (after ``kill -9`` too) is the
same account; plus the command-line flags of the new options."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import anyio.abc
import pytest

from kling_async.testing import Emulator, StateFileError
from kling_async.testing._cli import build_parser, emulator_from_args, main
from tests.test_emulator import (
    Api,
    assert_envelope,
    assert_error,
    bearer,
    call,
    eventually,
    mint_jwt,
    sleep_until,
)
from tests.test_emulator_callbacks import receiver

pytestmark = pytest.mark.anyio

SCALE = 0.001
ROOT = Path(__file__).resolve().parent.parent
LOOKUP_FORMS: list[tuple[str, dict[str, str]]] = [
    ("/{ext}", {}),
    ("", {"external_task_id": "{ext}"}),
    ("/{ext}", {"external_task_id": "true"}),
]


async def lookup(api: Api, ext: str) -> list[str]:
    """The task id each of the three external-id lookup forms answers."""
    found = []
    for path, params in LOOKUP_FORMS:
        query = {key: value.format(ext=ext) for key, value in params.items()}
        status, answer = await api.get(path.format(ext=ext), **query)
        assert status == 200, (path, query, answer)
        found.append(assert_envelope(answer)["task_id"])
    return found


def snapshot(emu: Emulator) -> dict[str, tuple[Any, ...]]:
    return {
        task.task_id: (
            task.external_task_id,
            task.video_ids,
            task.outcome,
            task.model_name,
            task.mode,
            task.duration,
            task.callback_url,
            dict(task.request),
        )
        for task in emu.tasks.values()
    }


async def test_tasks_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "emulator.db"
    async with aiohttp.ClientSession() as session:
        async with Emulator(
            time_scale=SCALE, median_duration=0, url_ttl=1e9, state_path=path, seed=9
        ) as first:
            api = Api(session, first)
            done = await api.task_id(external_task_id="done", sound="on", extra={"ü": [1]})
            first.set_lifecycle(failure_rate=1.0)
            failed = await api.task_id(external_task_id="failed", mode="pro")
            first.set_lifecycle(failure_rate=0.0, median_duration=1e9)
            running = await api.task_id(external_task_id="running", duration="10")
            before = snapshot(first)
            _, answer = await api.get(f"/{done}")
            old = assert_envelope(answer)
            signed = old["task_result"]["videos"][0]["url"]
            digest = first.video_sha256(first.tasks[done].video_ids[0])
            old_files = first.files_url

        assert path.exists()
        async with Emulator(time_scale=SCALE, url_ttl=1e9, state_path=path) as second:
            assert second.seed == 9  # the file's seed, since none was given
            assert snapshot(second) == before
            assert second.stats.tasks_created == 3
            assert second.stats.created_per_external_id == {"done": 1, "failed": 1, "running": 1}
            api = Api(session, second)
            statuses = {}
            for task_id in (done, failed, running):
                _, answer = await api.get(f"/{task_id}")
                statuses[task_id] = assert_envelope(answer)["task_status"]
            assert statuses == {done: "succeed", failed: "failed", running: "submitted"}
            _, answer = await api.get(f"/{done}")
            again = assert_envelope(answer)
            assert (again["created_at"], again["updated_at"]) == (
                old["created_at"],
                old["updated_at"],
            )
            for ext, task_id in (("done", done), ("failed", failed), ("running", running)):
                assert await lookup(api, ext) == [task_id] * 3
            _, answer = await api.get()
            assert [task["task_id"] for task in assert_envelope(answer)] == [running, failed, done]

            status, answer = await api.create(external_task_id="done")  # the loaded task counts
            assert status == 400
            assert_error(answer, 1201, "already exists")

            # Same bytes, and a URL signed by the first process is still good (same key).
            video_id = second.tasks[done].video_ids[0]
            assert second.video_sha256(video_id) == digest
            async with session.get(signed.replace(old_files, second.files_url)) as response:
                assert response.status == 200
                assert await response.read() == second.video_bytes(video_id)

            # A new session draws new ids: nothing collides with the loaded tasks.
            fresh = await api.task_id(external_task_id="fresh")
            assert fresh not in before
            assert not set(second.tasks[fresh].video_ids) & {
                video for _, videos, *_ in before.values() for video in videos
            }

        async with Emulator(time_scale=SCALE, state_path=path) as third:
            assert len(third.tasks) == 4
            assert third.stats.tasks_created == 4


async def test_a_restart_with_another_time_scale_keeps_real_instants(tmp_path: Path) -> None:
    """600 emulated s at 0.001 is 0.6 real s; the second run (0.01) sees the same 0.6 s."""
    path = tmp_path / "emulator.db"
    async with aiohttp.ClientSession() as session:
        async with Emulator(
            time_scale=0.001,
            median_duration=600,
            duration_sigma=0,
            visibility_lag=300,
            state_path=path,
        ) as first:
            status, answer = await Api(session, first).create(external_task_id="slow")
            created = assert_envelope(answer)
            assert status == 200

        async with Emulator(time_scale=0.01, state_path=path) as second:
            api = Api(session, second)
            task = second.tasks[created["task_id"]]
            assert task.completes_at - task.created_at == pytest.approx(60)  # 0.6 s / 0.01
            assert task.visible_at - task.created_at == pytest.approx(30)
            _, answer = await api.get(f"/{task.task_id}")
            data = assert_envelope(answer)
            assert data["created_at"] == pytest.approx(created["created_at"], abs=1)
            assert data["task_status"] in ("submitted", "processing")
            status, _ = await api.get(external_task_id="slow")
            assert status == 400  # still inside the lag, in real time
            assert second.now() < task.visible_at

            await sleep_until(second, task.visible_at)
            assert await lookup(api, "slow") == [task.task_id] * 3
            await sleep_until(second, task.completes_at)
            _, answer = await api.get(f"/{task.task_id}")
            data = assert_envelope(answer)
            assert data["task_status"] == "succeed"
            assert data["updated_at"] - data["created_at"] == pytest.approx(600, abs=2)


async def test_a_restarted_emulator_delivers_the_callbacks_still_to_come(tmp_path: Path) -> None:
    path = tmp_path / "emulator.db"
    async with receiver() as hook, aiohttp.ClientSession() as session:
        async with Emulator(
            time_scale=SCALE, median_duration=300, duration_sigma=0, state_path=path
        ) as first:
            task_id = await Api(session, first).task_id(callback_url=hook.url)
            await eventually(lambda: len(hook.bodies) == 1)  # "submitted", from the first
        async with Emulator(time_scale=SCALE, state_path=path) as second:
            await sleep_until(second, second.tasks[task_id].completes_at)
            await eventually(lambda: hook.by_task()[task_id][-1] == "succeed")
        assert hook.by_task()[task_id][0] == "submitted"
        assert hook.by_task()[task_id].count("succeed") == 1


# -- refusals ------------------------------------------------------------------------------------


async def test_bad_state_files_are_refused(tmp_path: Path) -> None:
    real = tmp_path / "real.db"
    async with (
        Emulator(time_scale=SCALE, state_path=real, seed=1) as emu,
        aiohttp.ClientSession() as session,
    ):
        with pytest.raises(StateFileError, match="in use"):
            Emulator(state_path=real)
        assert (await Api(session, emu).create())[0] == 200

    link = tmp_path / "link.db"
    link.symlink_to(real)
    with pytest.raises(StateFileError, match="symbolic link"):
        Emulator(state_path=link)

    journal = tmp_path / "journal.db"
    with sqlite3.connect(journal) as connection:
        connection.execute("CREATE TABLE rows (key TEXT)")
    connection.close()
    untouched = journal.read_bytes()
    with pytest.raises(StateFileError, match="not an emulator state file"):
        Emulator(state_path=journal)
    assert journal.read_bytes() == untouched

    text = tmp_path / "notes.txt"
    text.write_text("hello\n" * 100)
    with pytest.raises(StateFileError, match="not an emulator state file"):
        Emulator(state_path=text)
    with pytest.raises(StateFileError, match="not a regular file"):
        Emulator(state_path=tmp_path)
    with pytest.raises(StateFileError, match="not a directory"):
        Emulator(state_path=tmp_path / "missing" / "state.db")
    with pytest.raises(ValueError, match="seed 1, not 2"):
        Emulator(state_path=real, seed=2)
    assert isinstance(StateFileError("x"), ValueError)

    empty = tmp_path / "empty.db"
    empty.touch()  # e.g. from mktemp: taken as a new state file
    async with Emulator(time_scale=SCALE, state_path=str(empty)) as emu:
        assert len(emu.tasks) == 0
    assert empty.stat().st_size > 0


# -- kill -9 ---------------------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }


async def read_announcement(process: anyio.abc.Process) -> dict[str, str]:
    assert process.stdout is not None
    output = b""
    with anyio.fail_after(30):
        while output.count(b"\n") < 5:
            output += await process.stdout.receive()
    return dict(line.split("=", 1) for line in output.decode().splitlines())


async def test_kill_9_right_after_an_answer_loses_no_task(tmp_path: Path) -> None:
    """Creates race in parallel; the process dies the moment the 40th answer arrives."""
    path = tmp_path / "killed.db"
    command = [sys.executable, "-m", "kling_async.testing", "--state", str(path)]
    command += ["--time-scale", "0.001", "--median-duration", "1000000"]
    answered: dict[str, str] = {}  # external id -> task id, for every 200 received
    async with await anyio.open_process(command, env=child_env(), cwd=ROOT) as process:
        try:
            lines = await read_announcement(process)
            killed = asyncio.Event()

            async def creates(worker: int, session: aiohttp.ClientSession) -> None:
                for index in range(1000):
                    ext = f"w{worker}-{index}"
                    try:
                        status, answer = await call(
                            session,
                            "POST",
                            lines["url"] + "/v1/videos/text2video",
                            headers=bearer(lines["api_key"]),
                            json={"prompt": "p", "external_task_id": ext},
                        )
                    except aiohttp.ClientError:
                        return  # the server is gone
                    if killed.is_set():
                        return
                    assert status == 200, answer
                    answered[ext] = answer["data"]["task_id"]
                    if len(answered) == 40:
                        process.send_signal(signal.SIGKILL)  # at once, before the next answer
                        killed.set()
                        return

            async with aiohttp.ClientSession() as session, anyio.create_task_group() as tg:
                for worker in range(8):
                    tg.start_soon(creates, worker, session)
            with anyio.fail_after(10):
                assert await process.wait() == -signal.SIGKILL
        finally:
            if process.returncode is None:
                process.kill()

    assert len(answered) >= 40
    async with Emulator(time_scale=SCALE, state_path=path) as emu, aiohttp.ClientSession() as s:
        api = Api(s, emu)
        for ext, task_id in answered.items():
            assert emu.tasks[task_id].external_task_id == ext
            status, answer = await api.get(external_task_id=ext)
            assert status == 200
            assert answer["data"]["task_id"] == task_id
        assert emu.stats.tasks_created >= len(answered)


# -- command line ----------------------------------------------------------------------------


async def test_cli_flags_for_the_new_options(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        [
            "--time-scale",
            "0.001",
            "--median-duration",
            "0",
            "--visibility-lag",
            "1000000",
            "--strict-auth",
            "--no-cometapi-lookups",
            "--files-tls",
            "--state",
            str(tmp_path / "cli.db"),
        ]
    )
    assert args.seed is None
    emu = emulator_from_args(args)
    connector = aiohttp.TCPConnector(ssl=emu.ssl_context())
    async with emu, aiohttp.ClientSession(connector=connector) as session:
        assert emu.files_url.startswith("https://127.0.0.1:")
        comet = Api(session, emu, family="/kling/v1")
        task_id = await comet.task_id(external_task_id="cli")
        status, answer = await comet.get()
        assert status == 404
        assert answer["error"]["code"] == "invalid_url"
        jwt = mint_jwt(emu.access_key, emu.secret_key, time.time())
        official = Api(session, emu, family="/v1", token=jwt)
        status, _ = await official.get(external_task_id="cli")
        assert status == 400  # hidden by the lag
        _, answer = await official.get(f"/{task_id}")
        url = answer["data"]["task_result"]["videos"][0]["url"]
        async with session.get(url) as response:
            assert response.status == 200
        status, _ = await Api(session, emu, family="/v1").get()
        assert status == 401  # strict: no bearer key on the official family
    assert (tmp_path / "cli.db").stat().st_size > 0


def test_cli_refuses_a_bad_state_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "target.db").touch()
    (tmp_path / "link.db").symlink_to(tmp_path / "target.db")
    assert main(["--state", str(tmp_path / "link.db")]) == 2
    assert "symbolic link" in capsys.readouterr().err
