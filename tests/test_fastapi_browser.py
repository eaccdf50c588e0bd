"""The FastAPI example as a person uses it: the app started by its one command, its page in a
real headless Chromium, two prompts typed and submitted, both jobs followed live over
EventSource to ``succeeded``, and both clips loaded by the browser's own ``<video>`` player.

The browser is Debian's Chromium (``.ci/run`` installs it), driven by Playwright without any
browser download. Without one on the machine the test is skipped, except in CI, where it is
required. Set ``KLING_SCREENSHOT=path.png`` to keep a screenshot of the finished page.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, sync_playwright

from tests.cli_helpers import ROOT, child_env

APP = ROOT / "examples" / "fastapi_app" / "app.py"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# The machine's network is closed: nothing in the background may try to reach out.
BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PROMPTS = (
    "a red fox running through fresh snow at dawn",
    "a paper boat drifting down a rainy street",
)
#: What a card may show before ``succeed`` (``processing`` may be skipped with callbacks).
LIVE = {"queued", "submitting", "submitted", "processing"}
#: Generous: the example's emulator takes about 6 s a clip.
JOBS_TIMEOUT_MS = 45_000


def browser_path() -> str:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    missing = f"no Chromium on PATH (looked for {', '.join(BROWSERS)})"
    if os.environ.get("CI"):
        pytest.fail(f"{missing}: CI requires it (.ci/run installs Debian's chromium)")
    pytest.skip(f"{missing}: apt-get install chromium")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def example_app(log: Path, **env: str) -> Iterator[str]:
    """``python examples/fastapi_app/app.py`` on a free port, stopped with Ctrl+C (SIGINT)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        process = subprocess.Popen(  # noqa: S603
            [sys.executable, str(APP)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=child_env(PORT=str(port), **env),
            cwd=ROOT,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                assert process.poll() is None, f"the app exited:\n{log.read_text()}"
                assert time.monotonic() < deadline, f"the app did not start:\n{log.read_text()}"
                try:
                    with urllib.request.urlopen(url + "/", timeout=2) as answer:  # noqa: S310
                        if answer.status == 200:
                            break
                except (urllib.error.URLError, ConnectionError):
                    time.sleep(0.1)
            yield url
        finally:
            process.send_signal(signal.SIGINT)
            try:
                code = process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                raise AssertionError(f"Ctrl+C did not stop the app:\n{log.read_text()}") from None
    assert code == 0, f"the app exited with {code}:\n{log.read_text()}"


def job_states(page: Page) -> list[dict[str, Any]]:
    states: list[dict[str, Any]] = page.evaluate(
        """() => [...document.querySelectorAll("#jobs .job")].map((el) => {
            const video = el.querySelector("video");
            return {
                prompt: el.querySelector(".prompt").textContent,
                status: el.dataset.status,
                badge: el.querySelector(".badge").textContent,
                elapsed: el.querySelector(".elapsed").textContent,
                error: el.querySelector(".error").textContent,
                video: video && {
                    src: video.currentSrc,
                    readyState: video.readyState,
                    duration: video.duration,
                    width: video.videoWidth,
                    height: video.videoHeight,
                    error: video.error && video.error.code + " " + video.error.message,
                },
            };
        })"""
    )
    return states


def test_the_example_page_makes_two_clips_and_plays_them(tmp_path: Path) -> None:
    executable = browser_path()
    token = secrets.token_urlsafe(32)
    log = tmp_path / "app.log"
    with example_app(log, KLING_CALLBACK_TOKEN=token) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            tmp_path / "profile",  # a fresh user data dir
            executable_path=executable,
            args=BROWSER_ARGS,
            headless=True,
            viewport={"width": 1000, "height": 640},
        )
        try:
            page = browser.new_page()
            problems: list[str] = []
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.on(
                "console",
                lambda message: (
                    problems.append(f"console: {message.text}") if message.type == "error" else None
                ),
            )
            page.goto(url + "/")
            page.wait_for_function("document.querySelector('#backend').textContent !== ''")
            assert "emulator" in page.inner_text("#backend")

            # Every status each card shows, in order, as the page changes it.
            page.evaluate(
                """() => {
                    window.seen = {};
                    new MutationObserver(() => {
                        for (const el of document.querySelectorAll("#jobs .job")) {
                            const list = (window.seen[el.dataset.id] ||= []);
                            if (list.at(-1) !== el.dataset.status) list.push(el.dataset.status);
                        }
                    }).observe(document.querySelector("#jobs"),
                               {subtree: true, childList: true, attributes: true});
                }"""
            )
            page.fill("#prompts", "\n".join(PROMPTS) + "\n\n")  # a blank line is no prompt
            page.click("#submit")
            page.wait_for_function(
                """() => {
                    const jobs = [...document.querySelectorAll("#jobs .job")];
                    const done = jobs.filter((el) => el.dataset.status === "succeed");
                    return jobs.some((el) => ["failed", "error"].includes(el.dataset.status))
                        || (jobs.length === 2 && done.length === 2);
                }""",
                timeout=JOBS_TIMEOUT_MS,
            )
            states = job_states(page)
            assert sorted(state["prompt"] for state in states) == sorted(PROMPTS), states
            assert [state["badge"] for state in states] == ["succeeded"] * 2, states
            assert all(not state["error"] for state in states), states
            assert page.input_value("#prompts") == "", "the form keeps what it submitted"

            # Each card went through live states before its end: the page only learns them
            # from its EventSource (it never polls), and each ends with exactly one succeed.
            seen: dict[str, list[str]] = page.evaluate("window.seen")
            assert len(seen) == 2, seen
            for statuses in seen.values():
                assert statuses[-1] == "succeed" and statuses.count("succeed") == 1, seen
                assert len(statuses) >= 2, f"no live state before the end: {seen}"
                assert set(statuses[:-1]) <= LIVE, seen
            # ... and the page closed each job's EventSource at its end.
            assert page.evaluate("[...cards.values()].every((card) => card.stream === null)")

            # The elapsed time stopped at the end, and is about what the emulator takes.
            for state in states:
                match = re.fullmatch(r"(\d+\.\d) s", state["elapsed"])
                assert match is not None, state
                assert 0.5 < float(match[1]) < 40, state
            page.wait_for_timeout(500)
            assert [s["elapsed"] for s in job_states(page)] == [s["elapsed"] for s in states]

            # Both clips play in the browser's player: metadata and a decoded frame.
            page.wait_for_function(
                """() => {
                    const videos = [...document.querySelectorAll("#jobs video")];
                    return videos.length === 2 && videos.every(
                        (v) => v.error || (v.readyState >= 2 && v.duration > 0));
                }""",
                timeout=15_000,
            )
            for state in job_states(page):
                video = state["video"]
                assert video is not None, state
                assert video["error"] is None, f"Chromium cannot play the clip: {state}"
                assert video["readyState"] >= 2 and video["duration"] > 0, state
                assert video["width"] > 0 and video["height"] > 0, state
                # The page plays the job's video link (the app redirects it to the result URL).
                assert re.fullmatch(url + r"/kling/jobs/[^/]+/video", video["src"]), state

            page.screenshot(path=tmp_path / "fastapi-example.png")
            if target := os.environ.get("KLING_SCREENSHOT"):
                Path(target).parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=target)
            assert problems == [], problems
        finally:
            browser.close()

    text = log.read_text()
    # The emulator's callbacks reached the app (public_url), and the token never hit the log.
    assert '"POST /kling/callbacks/*** HTTP/1.1" 200' in text, text
    assert token not in text
    assert "Traceback" not in text, text
    assert len(re.findall(r'"GET /kling/jobs/[^/ ]+/video HTTP/1.1" 307', text)) >= 2, text
