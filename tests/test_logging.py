"""Logging as users expect: a quiet package logger, ``KLING_LOG``, one DEBUG line per HTTP
attempt, INFO for how an ambiguous create was resolved, and never a secret in any record."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable

import pytest

import kling_async as ka
from kling_async.testing import Emulator, FaultKind, Faults
from tests.hostile import GarbageHTTPServer, HostileServer

from .conftest import SCALE, client_for

pytestmark = pytest.mark.anyio

KEY = "sk-canary-logs-4c1e9b7a2d6f"
ACCESS = "ak-canary-logs-83b1"
SECRET = "secret-canary-logs-0f9e8d7c6b5a4321"


def record_texts(records: list[logging.LogRecord]) -> list[str]:
    """Everything a handler could print of each record: the message, its arguments, any
    exception text."""
    texts = []
    for record in records:
        texts.append(record.getMessage())
        texts.extend(repr(arg) for arg in (record.args or ()))
        if record.exc_info and record.exc_info[1] is not None:
            texts.append(repr(record.exc_info[1]))
    return texts


def http_lines(records: list[logging.LogRecord]) -> list[str]:
    return [
        r.getMessage()
        for r in records
        if r.levelno == logging.DEBUG and " -> " in r.getMessage() and "attempt" in r.getMessage()
    ]


async def test_one_debug_line_per_http_attempt_with_its_context(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="kling_async")
    async with Emulator(time_scale=SCALE) as emu, client_for(emu) as kling:
        task = await kling.text2video.create(ka.Text2VideoRequest(prompt="a cat"))
        await kling.text2video.get(task.task_id)
        await kling.text2video.get(external_task_id=task.external_task_id)
        sent = kling._transport.api_requests
    lines = http_lines(caplog.records)
    assert len(lines) == sent == 3
    post, get, lookup = lines
    assert post.startswith("POST /v1/videos/text2video -> HTTP 200, request_id ")
    assert get.startswith(f"GET /v1/videos/text2video/{task.task_id} -> HTTP 200")
    # Query values stay out of the log; their names say what was asked.
    assert lookup.startswith("GET /v1/videos/text2video?external_task_id=... -> HTTP 200")
    assert str(task.external_task_id) not in lookup
    for line in lines:
        assert line.endswith("attempt 1")
        assert " ms, " in line
        assert "request_id -" not in line  # the emulator sends one: it is shown


async def test_a_retried_read_numbers_its_attempts(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="kling_async")
    faults = Faults(query={FaultKind.ERROR_5XX_BEFORE_COMMIT: 1.0})
    retry = ka.RetryPolicy(attempts=3, timeout=5, initial=0.001, maximum=0.002, budget_ratio=None)
    async with Emulator(time_scale=SCALE, faults=faults) as emu, client_for(emu, retry=retry) as k:
        with pytest.raises(ka.ServerError):
            await k.text2video.get("123")
    lines = http_lines(caplog.records)
    assert [line.rsplit(" ", 1)[1] for line in lines] == ["1", "2", "3"]
    assert all(" -> HTTP 5" in line for line in lines)


async def test_an_ambiguous_create_says_how_it_was_resolved(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="kling_async")
    faults = Faults(create={FaultKind.DROP_AFTER_COMMIT: 1.0})
    async with Emulator(time_scale=SCALE, faults=faults) as emu, client_for(emu) as kling:
        task = await kling.text2video.create(ka.Text2VideoRequest(prompt="p", external_task_id="j"))
    resolved = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.INFO and "resolved" in r.getMessage()
    ]
    assert resolved == [
        f"create for external_task_id=j resolved: found by lookup, task {task.task_id}"
    ]


async def test_an_unresolvable_create_says_it_gave_up(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kling_async")
    async with HostileServer(api_mode="html_500") as hostile:
        async with ka.KlingClient(
            base_url=hostile.url,
            api_key=KEY,
            retry=ka.RetryPolicy(attempts=2, timeout=1, initial=0.001, maximum=0.002),
            settle_window=0.01,
            external_id_lookup=None,
        ) as kling:
            with pytest.raises(ka.AmbiguousSubmissionError):
                await kling.text2video.create(
                    ka.Text2VideoRequest(prompt="p", external_task_id="g")
                )
    given_up = [r.getMessage() for r in caplog.records if "given up" in r.getMessage()]
    assert len(given_up) == 1
    assert given_up[0].startswith("create for external_task_id=g given up: outcome unknown")


@pytest.mark.parametrize(
    "credentials", [{"api_key": KEY}, {"access_key": ACCESS, "secret_key": SECRET}]
)
@pytest.mark.parametrize("mode", ["kling_400", "kling_401", "html_500", "failed_task", "garbage"])
async def test_no_secret_in_any_record_at_debug(
    credentials: dict[str, str], mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Servers that echo the request headers (Authorization too) into every part of their
    answers, request ids included: nothing of a key, secret or token reaches a record."""
    caplog.set_level(logging.DEBUG, logger="kling_async")
    async with HostileServer() as hostile, GarbageHTTPServer() as garbage:
        hostile.api_mode = "kling_400" if mode == "garbage" else mode  # type: ignore[assignment]
        base_url = garbage.url if mode == "garbage" else hostile.url
        async with ka.KlingClient(
            base_url=base_url,
            retry=ka.RetryPolicy(attempts=2, timeout=1, initial=0.001, maximum=0.002),
            timeout=2.0,
            settle_window=0.02,
            **credentials,  # type: ignore[arg-type]
        ) as kling:
            token = kling._auth.header().removeprefix("Bearer ")
            calls: list[Callable[[], Awaitable[object]]] = [
                lambda: kling.text2video.get("123"),
                lambda: kling.text2video.get(external_task_id="job-1"),
                lambda: kling.text2video.create(ka.Text2VideoRequest(prompt="p")),
            ]
            for call in calls:
                with contextlib.suppress(ka.KlingError):
                    await call()
    texts = record_texts(caplog.records)
    assert http_lines(caplog.records), "no HTTP attempt was logged"
    secrets = [KEY, ACCESS, SECRET, token]
    for text in texts:
        for secret in secrets:
            assert secret not in text


def run_python(code: str, kling_log: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "KLING_LOG"}
    if kling_log is not None:
        env["KLING_LOG"] = kling_log
    return subprocess.run(  # noqa: S603 (our own interpreter and code)
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


LOG_SOME = (
    "import logging, kling_async\n"
    "log = logging.getLogger('kling_async')\n"
    "log.debug('debug-line'); log.info('info-line'); log.warning('warning-line')\n"
)


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (None, []),
        ("", []),
        ("debug", ["debug-line", "info-line", "warning-line"]),
        ("DEBUG", ["debug-line", "info-line", "warning-line"]),
        ("info", ["info-line", "warning-line"]),
    ],
)
def test_kling_log_attaches_a_stderr_handler_at_its_level(
    value: str | None, shown: list[str]
) -> None:
    """Unset, the logger is silent (a NullHandler: not even Python's last-resort handler
    prints its warnings); KLING_LOG=debug or info prints at that level, on stderr."""
    result = run_python(LOG_SOME, value)
    assert result.stdout == ""
    printed = [
        word for word in ("debug-line", "info-line", "warning-line") if word in result.stderr
    ]
    assert printed == shown
    if shown:
        assert "kling_async" in result.stderr  # the logger's name is on each line


def test_an_unknown_kling_log_value_is_ignored_with_one_warning() -> None:
    result = run_python(LOG_SOME, "verbose")
    assert result.stderr.count("KLING_LOG='verbose' is ignored") == 1
    assert "debug=" not in result.stderr
    for word in ("debug-line", "info-line", "warning-line"):
        assert word not in result.stderr


def test_kling_log_debug_shows_http_attempts_on_stderr() -> None:
    code = (
        "import anyio, kling_async as ka\n"
        "from kling_async.testing import Emulator\n"
        "async def main():\n"
        "    async with Emulator(time_scale=0.001) as emu:\n"
        "        async with ka.KlingClient(base_url=emu.url, api_key=emu.api_key) as kling:\n"
        "            await kling.text2video.create(ka.Text2VideoRequest(prompt='p'))\n"
        "anyio.run(main)\n"
    )
    result = run_python(code, "debug")
    assert "POST /v1/videos/text2video -> HTTP 200" in result.stderr
    assert "Bearer" not in result.stderr
