"""The hardening figures: one line per case, `NAME key=value ...`, each a defect's before/after.

``python -m benchmarks hardening`` runs them all against the emulator and the hostile servers
of ``tests/hostile.py`` (run it from the repository root):

- ``hardening_resume``: 40 jobs against ``concurrency_limit=3``, with and without ``resume=True``:
  errors, create POSTs and 1303 answers.
- ``hardening_wait``: ``wait(timeout=T)`` on a task that ends after 1 s, default poll policy.
- ``hardening_outage``: offered reads against a server that fails every request with 5xx:
  attempts per offered request, and seconds until reads succeed again after recovery.
- ``hardening_outage_engine``: jobs submitted into the same outage: attempts in all.
- ``hardening_limit_climb``: seconds for the learned slot limit to reach a cap raised from 2 to 10.
- ``hardening_download``: what a download does with hostile answers (trickle, HTML, JSON, not MP4).
- ``hardening_ssrf``: hostile result URLs: how many were connected to, and how many saved.
- ``hardening_secrets``: exceptions raised against servers that echo the request headers, and
  how many of their messages, reprs, chains and tracebacks hold the key.
- ``hardening_unreachable``: the batch tool against a refused port: seconds to the first line
  naming the host, seconds to exit, the exit status.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

import kling_async as ka
from kling_async.testing import Emulator, FaultKind, Faults

SCALE = 0.001
FAST_RETRY = ka.RetryPolicy(
    attempts=6, timeout=10.0, initial=0.01, maximum=0.1, throttle_minimum=0.01
)
SECRET = "sk-bench-CANARY-5b2d46807f3a9c1e"


def _line(name: str, **values: Any) -> None:
    def show(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    print(name, " ".join(f"{key}={show(value)}" for key, value in values.items()), flush=True)


def _client(emu: Emulator, **overrides: Any) -> ka.KlingClient:
    """The test suite's client for a scaled emulator, with the benchmark's retry policy."""
    from tests.conftest import client_for

    return client_for(emu, **{"retry": FAST_RETRY, **overrides})


async def resume_full_account() -> None:
    for resume in (False, True):
        async with Emulator(time_scale=SCALE, seed=7, concurrency_limit=3) as emu:
            async with _client(emu) as kling:
                requests = [ka.Text2VideoRequest(prompt=f"clip {i}") for i in range(40)]
                jobs = kling.submit_many(requests, resume=resume)
                with anyio.fail_after(120):
                    async for _job in kling.as_completed(jobs):
                        pass
            errors = [job.error for job in jobs if job.error is not None]
            ambiguous = sum(isinstance(e, ka.AmbiguousSubmissionError) for e in errors)
            _line(
                "hardening_resume",
                resume=resume,
                jobs=len(jobs),
                errors=len(errors),
                ambiguous=ambiguous,
                posts=emu.stats.requests_per_route["create"],
                n1303=emu.stats.sent_1303,
                max_tasks_per_external_id=max(emu.stats.created_per_external_id.values()),
            )


async def wait_deadline() -> None:
    async with Emulator(time_scale=1.0, seed=1, median_duration=1.0, duration_sigma=0.0) as emu:
        async with _client(emu, poll=None, retry=None) as kling:
            task = await kling.text2video.create(ka.Text2VideoRequest(prompt="p"))
            started = time.monotonic()
            try:
                final = await kling.text2video.wait(task.task_id, timeout=4)
                outcome = final.status.value
            except ka.WaitTimeoutError:
                outcome = "WaitTimeoutError"
            took = time.monotonic() - started
        _line(
            "hardening_wait",
            task_seconds=1.0,
            timeout_s=4,
            outcome=outcome,
            seconds=took,
            gets=emu.stats.requests_per_route["get"],
        )


async def outage() -> None:
    offered = 40
    async with Emulator(time_scale=SCALE, seed=3) as emu, _client(emu) as kling:
        task = await kling.text2video.create(ka.Text2VideoRequest(prompt="p"))
        before = emu.stats.requests_per_route["get"]
        emu.set_faults(Faults(query={FaultKind.ERROR_5XX_BEFORE_COMMIT: 1.0}))
        failed = 0

        async def read() -> None:
            nonlocal failed
            try:
                await kling.text2video.get(task.task_id)
            except ka.KlingError:
                failed += 1

        async with anyio.create_task_group() as tg:
            for _ in range(offered):
                tg.start_soon(read)
        attempts = emu.stats.requests_per_route["get"] - before
        emu.set_faults(None)
        recovered_at = time.monotonic()
        while True:
            try:
                await kling.text2video.get(task.task_id)
                break
            except ka.KlingError:
                await anyio.sleep(0.01)
        back = time.monotonic() - recovered_at
    _line(
        "hardening_outage",
        offered=offered,
        attempts=attempts,
        attempts_per_request=attempts / offered,
        bound=1.2 * offered + 3,
        failed=failed,
        seconds_back_after_recovery=back,
    )


async def outage_engine() -> None:
    """The same outage met by jobs of the engine: rounds after the first are retries too."""
    jobs_offered = 10
    faults = Faults(
        create={FaultKind.ERROR_5XX_BEFORE_COMMIT: 1.0},
        query={FaultKind.ERROR_5XX_BEFORE_COMMIT: 1.0},
    )
    retry = ka.RetryPolicy(attempts=6, timeout=2.0, initial=0.01, maximum=0.1)
    async with Emulator(time_scale=SCALE, seed=3, faults=faults) as emu:
        async with _client(emu, retry=retry) as kling:
            jobs = kling.submit_many(
                ka.Text2VideoRequest(prompt=f"p{i}") for i in range(jobs_offered)
            )
            with anyio.fail_after(300):
                async for _job in kling.as_completed(jobs):
                    pass
        routes = emu.stats.requests_per_route
        attempts = routes["create"] + routes["get_by_external_id"] + routes["get"]
    _line(
        "hardening_outage_engine",
        jobs=jobs_offered,
        attempts=attempts,
        bound=1.2 * jobs_offered + 3,
        ended_with_error=sum(job.error is not None for job in jobs),
        tasks_created=emu.stats.tasks_created,
    )


async def limit_climb() -> None:
    emu = Emulator(time_scale=SCALE, seed=5, concurrency_limit=2)
    async with emu, _client(emu) as kling:
        kling.submit_many(ka.Text2VideoRequest(prompt=f"c {i}") for i in range(400))
        with anyio.fail_after(30):
            while kling.stats.active_limit > 2 or kling.stats.submitted < 8:
                await anyio.sleep(0.005)
        emu.set_concurrency_limit(10)
        raised = time.monotonic()
        deadline = raised + 20.0
        while kling.stats.active_limit < 10 and time.monotonic() < deadline:
            await anyio.sleep(0.005)
        took = time.monotonic() - raised
        reached = kling.stats.active_limit >= 10
        n1303 = emu.stats.sent_1303
    _line(
        "hardening_limit_climb",
        cap_from=2,
        cap_to=10,
        reached=reached,
        seconds=took,
        task_seconds=emu.time_scale * 90,
        n1303=n1303,
    )


async def _download_case(
    kling: ka.KlingClient, url: str, target: Path, budget: float, **options: Any
) -> tuple[str, float, bool]:
    task = ka.Task(task_id="1", status=ka.TaskStatus.SUCCEEDED, videos=(ka.Video(id="v", url=url),))
    started = time.monotonic()
    outcome = "saved"
    with anyio.move_on_after(budget) as scope:
        try:
            await kling.download(task, target, **options)
        except ka.KlingError as exc:
            outcome = type(exc).__name__
    if scope.cancelled_caught:
        outcome = f"hung_past_{budget:g}s"
    return outcome, time.monotonic() - started, await anyio.Path(target).exists()


async def downloads() -> None:
    from tests.hostile import HostileServer

    async with HostileServer(trickle_interval=1.0) as hostile:
        # The API is the hostile server itself (as localhost), so its files are on the API's
        # host: only the body checks and the deadlines stand between it and the disk.
        api = f"http://localhost:{hostile.port}"
        async with ka.KlingClient(api_key=SECRET, base_url=api, retry=FAST_RETRY) as kling:
            with tempfile.TemporaryDirectory() as tmp:
                for case in ("trickle", "stall", "html", "json", "notmp4"):
                    # A 10 s budget and a 2 s stall timeout (the defaults are 600 s and the
                    # client's 30 s read timeout): the point is that they hold.
                    outcome, took, saved = await _download_case(
                        kling,
                        f"{api}/{case}",
                        Path(tmp) / f"{case}.mp4",
                        40.0,
                        timeout=10.0,
                        stall_timeout=2.0,
                    )
                    _line(
                        "hardening_download",
                        case=case,
                        outcome=outcome,
                        seconds=took,
                        saved=saved,
                    )


async def ssrf() -> None:
    from tests.hostile import HostileServer

    async with Emulator(time_scale=SCALE) as emu, HostileServer() as hostile:
        port = hostile.port
        api = f"http://localhost:{emu.url.rsplit(':', 1)[1]}"
        urls = {
            "metadata": "http://169.254.169.254/latest/meta-data/",
            "private": "http://10.0.0.1/clip.mp4",
            "loopback": f"http://127.0.0.1:{port}/secret",
            "decimal": f"http://2130706433:{port}/secret",
            "hex": f"http://0x7f000001:{port}/secret",
            "short": f"http://127.1:{port}/secret",
            "mapped_v6": f"http://[::ffff:127.0.0.1]:{port}/secret",
            "redirect": f"{api.rsplit(':', 1)[0]}:{port}/redirect?to=http://127.0.0.1:{port}/secret",
        }
        async with _client(emu, base_url=api, connect_timeout=2.0) as kling:
            with tempfile.TemporaryDirectory() as tmp:
                for name, url in urls.items():
                    hits = sum(hostile.hits.values())
                    outcome, took, saved = await _download_case(
                        kling, url, Path(tmp) / f"{name}.mp4", 15.0
                    )
                    reached = sum(hostile.hits.values()) - hits
                    _line(
                        "hardening_ssrf",
                        case=name,
                        outcome=outcome,
                        reached_hostile=reached,
                        saved=saved,
                        seconds=took,
                    )


def _leaks(exc: BaseException, secrets: list[str]) -> int:
    from tests.hostile import texts_of

    return sum(secret in text for text in texts_of(exc) for secret in secrets)


async def secret_chains() -> None:
    from tests.hostile import GarbageHTTPServer, HostileServer

    raised = leaks = 0

    async def attempt(
        kling: ka.KlingClient, secrets: list[str], call: Callable[[], Awaitable[Any]]
    ) -> None:
        nonlocal raised, leaks
        try:
            await call()
        except ka.KlingError as exc:
            raised += 1
            leaks += _leaks(exc, secrets)

    async with HostileServer() as hostile, GarbageHTTPServer() as garbage:
        for base in (hostile.url, garbage.url):
            for credentials in (
                {"api_key": SECRET},
                {"access_key": "ak-CANARY-1234", "secret_key": SECRET + "-signing-secret-000"},
            ):
                async with ka.KlingClient(
                    base_url=base,
                    retry=FAST_RETRY,
                    timeout=2.0,
                    settle_window=0.05,
                    **credentials,  # type: ignore[arg-type]
                ) as kling:
                    token = kling._auth.header().removeprefix("Bearer ")
                    secrets = [*credentials.values(), token]
                    modes = ("kling_400", "kling_401", "html_500", "cometapi_500", "not_a_task")
                    for mode in modes if base == hostile.url else ("garbage",):
                        hostile.api_mode = mode  # type: ignore[assignment]
                        await attempt(kling, secrets, lambda: kling.text2video.get("123"))
                        await attempt(
                            kling,
                            secrets,
                            lambda: kling.text2video.create(ka.Text2VideoRequest(prompt="p")),
                        )
    _line("hardening_secrets", exceptions=raised, leaking_texts=leaks)


def unreachable() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "p.txt"
        prompts.write_text("a cat\na dog\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("KLING_")}
        env["KLING_API_KEY"] = SECRET
        command = [
            sys.executable, "-m", "kling_async.cli", "batch", str(prompts), "--out",
            str(Path(tmp) / "out"), "--base-url", "http://127.0.0.1:9", "--progress", "plain",
        ]  # fmt: skip
        started = time.monotonic()
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        assert process.stdout is not None
        first = None
        budget = 600.0
        for line in process.stdout:
            if first is None and "127.0.0.1" in line:
                first = time.monotonic() - started
            if time.monotonic() - started > budget:
                process.kill()
                break
        code = process.wait()
        took = time.monotonic() - started
    _line(
        "hardening_unreachable",
        first_line_naming_host_s="never" if first is None else f"{first:.1f}",
        exit_s=took,
        exit_status=code,
    )


CASES: dict[str, Callable[[], Any]] = {
    "resume": resume_full_account,
    "wait": wait_deadline,
    "outage": outage,
    "outage_engine": outage_engine,
    "limit_climb": limit_climb,
    "download": downloads,
    "ssrf": ssrf,
    "secrets": secret_chains,
    "unreachable": unreachable,
}


def run(cases: list[str] | None = None) -> None:
    for name in cases or list(CASES):
        case = CASES[name]
        if name == "unreachable":
            case()
        else:
            anyio.run(case, backend="asyncio")
