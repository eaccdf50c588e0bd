"""``python -m kling_async.testing``: prints where it serves, serves, exits 0 on SIGINT."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import aiohttp
import anyio
import anyio.abc
import pytest

from kling_async.testing._cli import main
from tests.test_emulator import bearer, call, mint_jwt

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.anyio
async def test_cli_serves_until_sigint() -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    command = [
        sys.executable,
        "-m",
        "kling_async.testing",
        "--time-scale",
        "0.001",
        "--median-duration",
        "1000000",
        "--concurrency-limit",
        "1",
    ]
    async with await anyio.open_process(command, env=env, cwd=ROOT) as process:
        try:
            await _use_the_served_emulator(process)
            process.send_signal(signal.SIGINT)
            with anyio.fail_after(10):
                assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()


async def _use_the_served_emulator(process: anyio.abc.Process) -> None:
    assert process.stdout is not None
    output = b""
    with anyio.fail_after(30):
        while output.count(b"\n") < 5:
            output += await process.stdout.receive()
    lines = dict(line.split("=", 1) for line in output.decode().splitlines())
    assert list(lines) == ["url", "api_key", "access_key", "secret_key", "files_url"]
    url = lines["url"]
    assert url.startswith("http://127.0.0.1:")
    assert lines["files_url"].startswith("http://127.0.0.1:")
    assert lines["files_url"] != url

    async with aiohttp.ClientSession() as session:
        create = url + "/v1/videos/text2video"
        body = {"prompt": "p"}
        status, _ = await call(session, "POST", create, headers=bearer(lines["api_key"]), json=body)
        assert status == 200
        token = mint_jwt(lines["access_key"], lines["secret_key"], time.time())
        status, answer = await call(session, "POST", create, headers=bearer(token), json=body)
        assert status == 429
        assert answer["code"] == 1303


def test_cli_rejects_a_non_loopback_host(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--host", "0.0.0.0"]) == 2  # noqa: S104 - checking that it is refused
    assert "loopback" in capsys.readouterr().err
